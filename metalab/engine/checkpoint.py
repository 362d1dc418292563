"""Checkpoints: one safetensors file with model, optimiser and progress, written atomically and
verified by a SHA-256 checksum when read back — of its tensors and of the metadata the loader
trusts (progress, input shape and type, the optimiser's settings)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from metalab.errors import CheckpointError, StorageError, disk_failure

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)\.safetensors$")
FORMAT = "2"  #: 2: ``sha256_all`` covers tensors and metadata; files without ``format`` (1) have ``sha256`` of the tensors only


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 of the tensors (names, types, shapes, bytes) and, from format 2, of ``metadata``."""
    h = hashlib.sha256()
    for key in sorted(metadata or {}):
        h.update(f"meta/{key}={len(metadata[key])}:".encode())
        h.update(metadata[key].encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        plain["state"][str(pid)] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{name}"] = value
            else:
                plain["state"][str(pid)][name] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict = {int(pid): dict(entry) for pid, entry in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(path: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict | None, info: dict) -> None:
    """Write ``path`` atomically: temporary file in the same folder, fsync, rename, fsync folder."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    plain_optim = None
    if optimizer_state is not None:
        optim_tensors, plain_optim = _flatten_optimizer(optimizer_state)
        tensors.update({k: v.detach().cpu().contiguous() for k, v in optim_tensors.items()})
    meta = {"info": json.dumps(info), "optimizer": json.dumps(plain_optim), "format": FORMAT, "sha256": _digest(tensors)}
    meta["sha256_all"] = _digest(tensors, meta)  # (``sha256`` alone, of the tensors, is what metalab < 0.2 checks)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        _maybe_die_mid_write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except Exception as exc:
        if (why := disk_failure(exc)) is None:
            raise
        kept = [p.name for _, p in list_checkpoints(path.parent)]
        keeps = f"the run folder keeps {kept[-1]}" if kept else "the run folder has no checkpoint yet"
        raise StorageError(f"Checkpoint '{path}' could not be written ({why}); {keeps}. Free disk space, then "
                           f"continue with `metalab train --resume {path.parent}`.") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_writes = 0  #: checkpoints this process has written (for the fault injection below)


def _maybe_die_mid_write(tmp: str) -> None:
    """Fault injection for the fault-tolerance tests (off unless set): with
    ``METALAB_FAULT_CHECKPOINT=N`` the process dies abruptly (``os._exit``, like ``kill -9``: no
    clean-up runs) half-way through writing its N-th checkpoint, leaving the temporary file cut short."""
    global _writes
    at = os.environ.get("METALAB_FAULT_CHECKPOINT")
    if not at:
        return
    _writes += 1
    if _writes == int(at):
        with open(tmp, "r+b") as f:
            f.truncate(os.path.getsize(tmp) // 2)
        os._exit(17)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """``(model_state, optimizer_state, info)`` from a checkpoint; :class:`CheckpointError` with the
    file's name if it is missing, truncated, not a checkpoint, or fails its checksum."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint '{path}' does not exist; check the run folder or train first.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(
            f"Checkpoint '{path}' is truncated or not a safetensors file ({type(exc).__name__}); delete it to fall back to an earlier checkpoint."
        ) from None
    if "sha256" not in meta or "info" not in meta:
        raise CheckpointError(f"Checkpoint '{path}' was not written by metalab (no checksum); pass a metalab checkpoint.")
    fmt = meta.get("format")
    if fmt not in (None, FORMAT):
        raise CheckpointError(f"Checkpoint '{path}' has format {fmt!r}, newer than this metalab's {FORMAT}; upgrade metalab to read it.")
    if fmt == FORMAT:
        expected, got = meta.get("sha256_all"), _digest(tensors, {k: v for k, v in meta.items() if k != "sha256_all"})
    else:
        expected, got = meta["sha256"], _digest(tensors)
    if got != expected:
        raise CheckpointError(f"Checkpoint '{path}' fails its checksum (the file is corrupt); delete it to fall back to an earlier checkpoint.")
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    plain_optim = json.loads(meta.get("optimizer", "null"))
    optim = _unflatten_optimizer(tensors, plain_optim) if plain_optim is not None else None
    return model_state, optim, json.loads(meta["info"])


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``folder``, oldest first."""
    found = []
    for p in Path(folder).glob("checkpoint-*.safetensors"):
        m = CHECKPOINT_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_good_checkpoint(folder: Path, warn=print) -> tuple[int, Path, tuple] | None:
    """The newest checkpoint in ``folder`` that loads and verifies; damaged ones are reported via
    ``warn`` and skipped (never deleted). ``None`` if the folder has no usable checkpoint."""
    for step, path in reversed(list_checkpoints(folder)):
        try:
            return step, path, load_checkpoint(path)
        except CheckpointError as exc:
            warn(f"warning: {exc} Using the previous checkpoint.")
    return None
