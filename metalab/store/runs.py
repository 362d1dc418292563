"""The registry's index of run folders: what was trained where, how far, and what it scored.

A run folder stays the truth (``config.yaml``, checkpoints, ``eval.json``); the index only
remembers where the folders are. ``metalab train / eval / demo`` add or update their run
(:func:`index_run`), ``metalab runs --scan DIR`` adds folders made elsewhere, and listing
(:func:`list_runs`) reads each folder again, so it shows the folder as it is now. A folder that
is gone shows as ``missing``, with what the index last saw of it.

The listing reads only small files (YAML, JSON, file names, the newest checkpoint's header),
never a checkpoint's tensors, and does not load torch, so ``metalab runs`` answers at once. A run
is ``training`` while a process holds its folder's training lock (:mod:`metalab.store.run_lock`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metalab.store import run_lock
from metalab.store.registry import Registry

#: ``RunFolder.checkpoint_path``'s names (read here without loading the engine and torch)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.safetensors$")


@dataclass
class RunRow:
    """One line of ``metalab runs``."""

    path: str
    name: str
    algo: str
    data: str
    steps: int  #: of the newest checkpoint (0: none yet)
    steps_total: int
    status: str  #: 'training' (a process holds its training lock), 'done' (all steps, or the time budget spent), 'stopped' (before either: Ctrl-C, a crash), 'missing'
    results: list[str]  #: e.g. ['5w1s 94.09 ± 0.51', …], from eval.json
    evaluated_step: int | None
    modified: str  #: when the folder was last written (config, newest checkpoint, eval.json), UTC
    #: the same figures as numbers, for scripts (``--json``): ``{"ways", "shots", "metric", "mean", "ci95", "episodes"}``
    #: (accuracy as a fraction, MSE as is; meta-RL: ``{"policy", "metric": "return", "mean", "ci95", "adaptation_steps"}``)
    figures: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _read_eval(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _result_strings(record: dict) -> list[str]:
    """``eval.json``'s figures as short strings: accuracy (%), MSE or a meta-RL return."""
    out = []
    for r in record.get("results", []):
        try:
            episodes = f", {r['episodes']} ep" if isinstance(r.get("episodes"), int) else ""
            if r.get("metric") == "mse":
                steps = "" if r.get("steps") is None else f"steps: {r['steps']}"
                detail = f" ({steps}{episodes})" if steps else (f" ({episodes[2:]})" if episodes else "")
                out.append(f"{r['shots']}-shot MSE {r['mean']:.4f} ± {r['ci95']:.4f}{detail}")
            else:
                out.append(f"{r['ways']}w{r['shots']}s {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}"
                           + (f" ({episodes[2:]})" if episodes else ""))
        except (KeyError, TypeError, ValueError):
            continue
    for name, rows in (record.get("rl") or {}).items():
        if rows and isinstance(rows, list) and isinstance(rows[-1], dict) and "return" in rows[-1]:
            last = rows[-1]
            out.append(f"{name}: return {last['return']:.2f} ± {last.get('ci95', 0.0):.2f} "
                       f"(steps: {last.get('adaptation_steps', '?')})")
    return out


def _result_figures(record: dict) -> list[dict]:
    """``eval.json``'s figures as numbers (what ``metalab runs --json`` prints)."""
    out = []
    for r in record.get("results", []):
        if isinstance(r, dict) and isinstance(r.get("mean"), (int, float)):
            out.append({"ways": r.get("ways"), "shots": r.get("shots"), "metric": r.get("metric", "accuracy"),
                        "mean": r["mean"], "ci95": r.get("ci95"), "episodes": r.get("episodes"),
                        "seed": r.get("seed"), "step": r.get("step"),
                        **({"steps": r["steps"]} if r.get("metric") == "mse" else {})})
    for name, rows in (record.get("rl") or {}).items():
        if rows and isinstance(rows, list) and isinstance(rows[-1], dict) and "return" in rows[-1]:
            last = rows[-1]
            out.append({"policy": name, "metric": "return", "mean": last["return"], "ci95": last.get("ci95"),
                        "adaptation_steps": last.get("adaptation_steps")})
    return out


def _checkpoint_info(path: Path) -> dict:
    """The ``info`` a metalab checkpoint carries (step, elapsed seconds, …), read from the
    safetensors header alone: 8 bytes of header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 16 * 1024 * 1024:
                return {}
            info = json.loads(f.read(size)).get("__metadata__", {}).get("info", "{}")
        info = json.loads(info)
    except (OSError, ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}


def _whole(value) -> int:
    """A count from a config file (0 if a hand edit left something else there)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # absent, or pruned by a training run meanwhile
        return 0.0


def read_run_folder(path: str | Path) -> dict | None:
    """What a run folder says of itself (``None`` if it is not one): name, algo, data, the steps of
    its newest checkpoint and the configured total, whether training is over (all steps, or the
    time budget spent), and ``eval.json``'s results."""
    folder = Path(path)
    config = _read_yaml(folder / "config.yaml")
    if not isinstance(config.get("train"), dict):  # not written by metalab (its config.yaml has a train section)
        return None
    train, data, rl = (config.get(k) if isinstance(config.get(k), dict) else {} for k in ("train", "data", "rl"))
    checkpoints = sorted((int(m.group(1)), p) for p in folder.glob("checkpoint-*.safetensors")
                         if (m := _CHECKPOINT.match(p.name)))
    steps, total, budget = (checkpoints[-1][0] if checkpoints else 0), _whole(train.get("steps")), train.get("time_budget")
    if checkpoints and steps < total and isinstance(budget, (int, float)):
        ended = float(_checkpoint_info(checkpoints[-1][1]).get("elapsed", 0.0)) >= budget
    else:
        ended = bool(checkpoints) and steps >= total
    record = _read_eval(folder)
    modified = max(_mtime(p) for p in (folder / "config.yaml", folder / "eval.json", *(p for _, p in checkpoints[-1:])))
    return {"name": str(config.get("name", "run")), "algo": str(train.get("algo", "?")),
            "data": str(rl.get("task") or data.get("source", "?")), "steps": steps, "steps_total": total,
            "ended": ended, "results": _result_strings(record) if record else [],
            "figures": _result_figures(record) if record else [],
            "evaluated_step": record.get("step") if record else None,
            "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(modified))}


def index_run(registry: Registry, path: str | Path) -> None:
    """Add the run folder at ``path`` to the index, or refresh its row (a folder that is not a
    run's is left out)."""
    folder = Path(path).resolve()
    seen = read_run_folder(folder)
    if seen is not None:
        summary = {k: seen[k] for k in ("steps", "steps_total", "ended", "results", "figures", "evaluated_step", "modified")}
        registry.upsert_run(str(folder), seen["name"], seen["algo"], seen["data"], summary)


def index_run_here(path: str | Path) -> str | None:
    """Add the run at ``path`` to the default registry's index (``$METALAB_HOME``; rank 0 only, as
    `metalab train` and :func:`metalab.train` do). The run folder is the record: an index that cannot
    be written is no error, and the reason is returned (``None`` when indexed or not rank 0)."""
    import sqlite3

    from metalab.errors import MetalabError
    from metalab.store.registry import default_registry_path

    if os.environ.get("RANK", "0") != "0":
        return None
    try:
        index_run(Registry(default_registry_path()), path)
    except (MetalabError, sqlite3.Error, OSError) as exc:
        return str(exc).split(";")[0].rstrip(".")  # (its advice, e.g. "pass --db", is for other commands)
    return None


def _status(seen: dict | None, folder: str) -> str:
    if seen is None:
        return "missing"
    if run_lock.holder(folder) is not None:  # a live process holds the folder's training lock
        return "training"
    return "done" if seen["ended"] else "stopped"


def list_runs(registry: Registry, algo: str | None = None, data: str | None = None) -> list[RunRow]:
    """Every indexed run, each read again from its folder, the most recently written first; ``algo``
    / ``data`` keep the runs whose algorithm / data contain that text (any case)."""
    rows = []
    for row in registry.runs():
        if algo and algo.lower() not in row["algo"].lower() or data and data.lower() not in row["data"].lower():
            continue
        seen = read_run_folder(row["path"])
        last = seen or {**row["summary"], "name": row["name"], "algo": row["algo"], "data": row["data"]}
        rows.append(RunRow(row["path"], last["name"], last["algo"], last["data"], int(last.get("steps", 0)),
                           int(last.get("steps_total", 0)), _status(seen, row["path"]), list(last.get("results", [])),
                           last.get("evaluated_step"), last.get("modified", row["updated"]), list(last.get("figures", []))))
    return sorted(rows, key=lambda r: r.modified, reverse=True)


def find_run_folders(root: str | Path, max_depth: int = 4) -> list[Path]:
    """Run folders (holding a ``config.yaml`` that reads as a run's) at most ``max_depth`` levels
    below ``root``, sorted."""
    root = Path(root)
    found = []
    for current, dirs, files in os.walk(root):
        depth = len(Path(current).relative_to(root).parts)
        if depth >= max_depth:
            dirs.clear()
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "config.yaml" in files and read_run_folder(current) is not None:
            found.append(Path(current))
            dirs.clear()  # a run folder holds no runs
    return sorted(found)


def forget_missing(registry: Registry) -> list[str]:
    """Drop the runs whose folders are gone from the index; returns their paths."""
    gone = [r["path"] for r in registry.runs() if read_run_folder(r["path"]) is None]
    registry.forget_runs(gone)
    return gone
