"""metalab: meta-learning from many small tasks, so that a new task is learned from a few examples.

The package root is the one way in (names load on first use, so ``import metalab`` and the CLI
start fast):

* product layer: :func:`train` → :class:`Run` (``Run.load(path)``, ``run.evaluate(...)``,
  ``run.adapt(examples, labels)``) → :class:`Adapter` (``predict``, ``save``, ``Adapter.load``);
* research layer: :func:`from_arrays`, :func:`split_by_class`, :class:`EpisodeSampler`,
  :func:`build_backbone`, :func:`build_algorithm`, :func:`evaluate`, :class:`RunConfig`,
  :class:`MetaTrainer`.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

#: public name → the module that defines it
_EXPORTS = {
    "train": "metalab.api", "Run": "metalab.api",
    "Adapter": "metalab.engine.adapter", "Prediction": "metalab.engine.adapter",
    "RunConfig": "metalab.engine.config", "MetaTrainer": "metalab.engine.trainer",
    "evaluate": "metalab.engine.evaluate", "EvalResult": "metalab.engine.evaluate",
    "EpisodeSampler": "metalab.data.sampler", "Episodes": "metalab.data.episodes",
    "LabelledSource": "metalab.data.source", "from_arrays": "metalab.data.folders",
    "load_image_folder": "metalab.data.folders", "split_by_class": "metalab.data.splits",
    "build_algorithm": "metalab.algorithms", "ALGORITHMS": "metalab.algorithms",
    "build_backbone": "metalab.models.backbones", "Conv4": "metalab.models.backbones", "MLP": "metalab.models.backbones",
    "MetalabError": "metalab.errors", "DataError": "metalab.errors", "ConfigError": "metalab.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metalab' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
