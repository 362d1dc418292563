"""A run is a folder: ``config.yaml``, ``metrics.jsonl``, ``checkpoint-*.safetensors``, ``eval.json``."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from metalab.engine.checkpoint import list_checkpoints
from metalab.engine.config import RunConfig
from metalab.errors import CheckpointError, ConfigError, StorageError, disk_failure
from metalab.store import run_lock


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole or not at all (temporary file, fsync, rename); a full or
    read-only disk is a :class:`StorageError` naming the file, and the old file stays as it was."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _storage_error(path, exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _storage_error(path, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _storage_error(path: Path, exc: OSError) -> Exception:
    why = disk_failure(exc)
    if why is None:
        return exc
    return StorageError(f"'{path}' could not be written ({why}); it was left as it was. Free disk space (or write the run "
                        "to another disk with --out), then run the command again.")


class RunFolder:
    """Paths and small file operations of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: int | None = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def eval_path(self) -> Path:
        return self.path / "eval.json"

    def checkpoint_path(self, step: int) -> Path:
        return self.path / f"checkpoint-{step:07d}.safetensors"

    @classmethod
    def create(cls, path: str | Path, config: RunConfig, lock: bool = False) -> "RunFolder":
        """A new run folder holding ``config``; refuses a folder that already holds a run. ``lock``:
        take the training lock first (:meth:`lock`), so two runs started at once into one folder
        cannot both write it."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"'{run.path}' is a file, not a folder; give --out a folder name for the run (e.g. runs/my-run).")
        if run.config_path.exists():
            raise ConfigError(f"Run folder '{run.path}' already holds a run; pass --resume to continue it or choose another folder.")
        run.path.mkdir(parents=True, exist_ok=True)
        if lock:
            run.lock()
            if run.config_path.exists():  # the other process got here first
                run.unlock()
                raise ConfigError(f"Run folder '{run.path}' already holds a run; pass --resume to continue it or choose another folder.")
        write_text_atomic(run.config_path, _yaml(config))
        return run

    def lock(self) -> None:
        """Hold the folder's training lock until :meth:`unlock` or the end of the process; refuses,
        naming the holder, while another process trains this run."""
        if self._lock is not None:
            return
        try:
            self._lock = run_lock.acquire(self.path)
        except BlockingIOError as exc:
            pid = getattr(exc, "pid", 0)
            if pid == os.getpid():  # (the Python API: a trainer made earlier and not yet trained or dropped)
                raise ConfigError(f"Run folder '{self.path}' is held by another trainer in this process; let its train() "
                                  "finish, or drop it, before making a new one for this folder.") from None
            who = f" (pid {pid})" if pid else ""
            raise ConfigError(f"Run folder '{self.path}' is being trained by another process{who}; wait for it to end or "
                              "stop it before resuming, or train into another --out folder.") from None
        except OSError as exc:  # a read-only folder (an archived run), or one that is gone
            raise ConfigError(f"Run folder '{self.path}' cannot be written ({exc.strerror}); copy it to a writable place "
                              "to train it.") from None
        for stale in self.path.glob(".checkpoint-*.safetensors.*.tmp"):  # left by a writer killed mid-write:
            stale.unlink(missing_ok=True)  # none is being written now, as the lock is ours

    def unlock(self) -> None:
        run_lock.release(self._lock)
        self._lock = None

    def __del__(self) -> None:  # e.g. a trainer whose set-up failed after taking the lock
        if getattr(self, "_lock", None) is not None:
            self.unlock()

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise CheckpointError(f"'{run.path}' is a file, not a run folder; pass the folder printed by 'metalab train'.")
        if not run.path.is_dir():
            raise CheckpointError(f"Run folder '{run.path}' does not exist; pass the folder printed by 'metalab train'.")
        if not run.config_path.exists():
            raise CheckpointError(f"'{run.path}' is not a metalab run folder (no config.yaml); pass the folder printed by 'metalab train'.")
        return run

    def config(self) -> RunConfig:
        return RunConfig.load(self.config_path)

    def append_metrics(self, record: dict) -> None:
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as exc:  # (a line cut short is dropped when read; a resume rewrites the file)
            raise _storage_error(self.metrics_path, exc) from None

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash is dropped, never fatal
        return out

    def truncate_metrics(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run re-logs what came after)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def prune_checkpoints(self, keep: int, newest: int | None = None) -> None:
        """Delete all but the ``keep`` latest checkpoints up to step ``newest`` (the one just written).
        Later-numbered files (damaged ones a resume skipped) are left alone: training overwrites each
        when it gets there, so they never push out the newest good checkpoint."""
        found = [(step, path) for step, path in list_checkpoints(self.path) if newest is None or step <= newest]
        for _, path in found[:-keep]:
            path.unlink(missing_ok=True)

    def write_eval(self, record: dict) -> dict:
        """Add ``record``'s results to ``eval.json`` and return what it now holds: a result replaces
        only the one of the same setting, episodes and seed (see :func:`merge_eval`), so evaluating a
        new setting, or on fewer episodes, never loses the figures already there."""
        old = None
        if self.eval_path.exists():
            try:
                old = json.loads(self.eval_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                old = None  # a damaged file is replaced (it held nothing readable)
        merged = merge_eval(old if isinstance(old, dict) else None, record)
        write_text_atomic(self.eval_path, json.dumps(merged, indent=2) + "\n")
        return merged


def result_key(result: dict) -> tuple:
    """What makes two evaluation results the same measurement: setting, episodes and seed."""
    return tuple(result.get(k) for k in ("metric", "ways", "shots", "steps", "episodes", "seed"))


def merge_eval(old: dict | None, new: dict) -> dict:
    """``new`` (the latest evaluation's record), with the results of ``old`` that it did not
    measure again kept: a result of the same :func:`result_key` is replaced where it stood, others
    are appended. Each result carries the ``step`` it was measured at."""
    results = [dict(r, step=r.get("step", old.get("step"))) for r in (old or {}).get("results", []) if isinstance(r, dict)]
    index = {result_key(r): i for i, r in enumerate(results)}
    for r in new.get("results", []):
        r = dict(r, step=r.get("step", new.get("step")))
        if result_key(r) in index:
            results[index[result_key(r)]] = r
        else:
            index[result_key(r)] = len(results)
            results.append(r)
    merged = {**(old or {}), **new}
    if "results" in new or "results" in (old or {}):
        merged["results"] = results
    return merged


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``, or with ``-2``, ``-3``, … when that folder is taken (runs
    launched side by side in the same second must not find each other's folder)."""
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _yaml(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
