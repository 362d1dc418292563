"""The training lock of a run folder: one process trains a run at a time.

Two processes writing one folder (the same command started twice, a second ``--resume``) would
interleave their checkpoints and metrics into a record of neither run. A trainer therefore holds
an exclusive ``flock`` on ``<run>/.lock`` from the moment it opens the folder until it stops; the
lock dies with the process, whatever ends it, so a crash never leaves a stale lock. The file holds
the trainer's pid, for messages and for ``metalab runs`` (whose check is this lock, not the pid).

``flock`` is POSIX; where ``fcntl`` is missing (Windows) the lock is not taken.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"


def acquire(folder: str | Path, wait: float = 2.0) -> int | None:
    """Take ``folder``'s training lock; returns its file descriptor (``None`` where locks are not
    available). Raises ``BlockingIOError`` carrying the holder's pid (``.pid``, 0 if unknown) when
    another process holds it after ``wait`` seconds (a reader such as :func:`holder` holds it for
    microseconds, and must not make a trainer fail)."""
    if fcntl is None:
        return None
    fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError as exc:
            if time.monotonic() >= deadline:
                exc.pid = _pid_in(fd)
                os.close(fd)
                raise
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int | None) -> None:
    """Give the lock back (closing the descriptor releases it)."""
    if fd is not None:
        os.close(fd)


def holder(folder: str | Path) -> int | None:
    """The pid of the process training ``folder`` now (0 if it wrote none yet), or ``None``."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file: never trained since locks exist, or not readable
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # (also releases the lock if this call took it)
    return None


def _pid_in(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0
