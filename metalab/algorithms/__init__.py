"""Algorithms by name. Each lives in its own module behind :class:`~metalab.algorithms.base.Algorithm`."""

from __future__ import annotations

from typing import Callable

from torch import nn

from metalab.algorithms.base import Algorithm, Predictor
from metalab.algorithms.maml import MAML, first_order_maml
from metalab.algorithms.protonet import ProtoNet
from metalab.errors import ConfigError

#: name → (factory(backbone, **options), backbone norm it expects, options it accepts)
ALGORITHMS: dict[str, tuple[Callable[..., Algorithm], str, tuple[str, ...]]] = {
    "protonet": (ProtoNet, "batch", ()),
    "maml": (MAML, "task-batch", ("inner_lr", "inner_steps", "test_inner_steps", "execution")),
    "fomaml": (first_order_maml, "task-batch", ("inner_lr", "inner_steps", "test_inner_steps", "execution")),
}


def algorithm_norm(name: str) -> str:
    return _lookup(name)[1]


def build_algorithm(name: str, backbone: nn.Module, options: dict | None = None) -> Algorithm:
    """An algorithm by name; ``options`` are its hyper-parameters (unknown ones are an error)."""
    factory, _, accepted = _lookup(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"Option(s) {unknown} do not apply to algorithm '{name}'; it accepts: {list(accepted) or 'none'}."
        )
    return factory(backbone, **options)


def _lookup(name: str):
    if name not in ALGORITHMS:
        raise ConfigError(f"Unknown algorithm '{name}'; choose one of: {', '.join(sorted(ALGORITHMS))}.")
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "Algorithm", "Predictor", "algorithm_norm", "build_algorithm"]
