"""Where metalab caches decoded data, and atomic writes of cached tensors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open


def cache_dir() -> Path:
    """The user cache folder: ``$METALAB_CACHE``, else ``$XDG_CACHE_HOME/metalab``, else ``~/.cache/metalab``."""
    root = os.environ.get("METALAB_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metalab"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (+ JSON-able ``meta``) to ``path`` via a temporary file and a rename,
    so a crash never leaves a half-written cache entry behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"json": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Read a cache entry written by :func:`save_tensors_atomic`; ``None`` if absent or unreadable."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["json"])
        return load_file(str(path)), meta
    except Exception:  # a damaged cache entry is rebuilt, never trusted
        return None
