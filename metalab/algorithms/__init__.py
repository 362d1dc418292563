"""Algorithms by name. Each lives in its own module behind :class:`~metalab.algorithms.base.Algorithm`.

``build_algorithm(name, backbone, options, context)``: ``options`` are the method's
hyper-parameters (``train.algo_options``); ``context`` is what the data says (``task``:
classification or regression, ``num_classes`` and ``class_domains`` of meta-train, ``outputs``
for regression). The context is stored in checkpoints, so a run reloads without its data.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from metalab.algorithms.anil import ANIL
from metalab.algorithms.base import Algorithm, FeatureHeadAlgorithm, Predictor
from metalab.algorithms.baseline import Baseline, baseline_pp
from metalab.algorithms.maml import MAML, first_order_maml
from metalab.algorithms.matchingnet import MatchingNet
from metalab.algorithms.metasgd import MetaSGD
from metalab.algorithms.multitask import MultiTask
from metalab.algorithms.pretrained import Pretrained
from metalab.algorithms.protomaml import ProtoMAML
from metalab.algorithms.protonet import ProtoNet
from metalab.algorithms.r2d2 import R2D2
from metalab.algorithms.reptile import Reptile
from metalab.errors import ConfigError
from metalab.models.backbones import set_norm

_MAML_OPTIONS = ("inner_lr", "inner_steps", "test_inner_steps", "execution", "checkpoint_inner", "query_stats",
                 "learned_step_sizes", "multi_step_loss_until", "first_order_until")  # the last three: MAML++
_MAML_HEAD_OPTIONS = _MAML_OPTIONS + ("head", "head_ways")  # MAML and FOMAML only
_HEAD_OPTIONS = ("scale", "finetune_steps", "finetune_lr")


@dataclass(frozen=True)
class AlgorithmSpec:
    build: Callable[..., Algorithm]  #: (backbone, context, **options) -> Algorithm
    norm: str  #: the backbone normalisation it expects
    options: tuple[str, ...]  #: accepted hyper-parameters
    tasks: tuple[str, ...] = ("classification",)
    summary: str = ""
    needs_classes: bool = False  #: needs the meta-train classes (num_classes, class_domains) in its context
    cls: type | None = None  #: the class the options go to (its and its bases' signatures give their defaults)


#: the inner step size of gradient-based methods on regression when ``inner_lr`` is not given: the
#: MAML paper's alpha for sinusoids (the classification defaults, 0.1-0.4, diverge on an MSE loss)
REGRESSION_INNER_LR = 0.01


def _gradient_based(factory):
    def build(backbone, ctx, **options):
        task = ctx.get("task", "classification")
        if task == "regression":
            options.setdefault("inner_lr", REGRESSION_INNER_LR)
        return factory(backbone, task=task, outputs=ctx.get("outputs", 1), **options)
    return build


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "protonet": AlgorithmSpec(lambda b, ctx, **o: ProtoNet(b, num_classes=ctx.get("num_classes"), **o), "batch", ("test_feature_norm", "global_loss", "test_views", "metric_scale"), summary="Prototypical Networks (Snell et al. 2017)", cls=ProtoNet),
    "matchingnet": AlgorithmSpec(lambda b, ctx, **o: MatchingNet(b, **o), "batch", ("scale",), summary="Matching Networks, cosine attention (Vinyals et al. 2016)", cls=MatchingNet),
    "r2d2": AlgorithmSpec(lambda b, ctx, **o: R2D2(b, **o), "batch", ("lam", "scale"), summary="closed-form ridge head (Bertinetto et al. 2019)", cls=R2D2),
    "anil": AlgorithmSpec(lambda b, ctx, **o: ANIL(b, **o), "batch", ("inner_lr", "inner_steps", "test_inner_steps", "first_order"), summary="inner loop on the head only (Raghu et al. 2020)", cls=ANIL),
    "maml": AlgorithmSpec(_gradient_based(MAML), "task-batch", _MAML_HEAD_OPTIONS, ("classification", "regression"), "second-order MAML (Finn et al. 2017)", cls=MAML),
    "fomaml": AlgorithmSpec(_gradient_based(first_order_maml), "task-batch", _MAML_HEAD_OPTIONS, ("classification", "regression"), "first-order MAML", cls=MAML),
    "protomaml": AlgorithmSpec(lambda b, ctx, **o: ProtoMAML(b, **o), "task-batch", _MAML_OPTIONS + ("first_order",), summary="MAML with the head started from the support's prototypes (Triantafillou et al. 2020)", cls=ProtoMAML),
    "reptile": AlgorithmSpec(_gradient_based(Reptile), "task-batch", _MAML_OPTIONS, ("classification", "regression"), "Reptile (Nichol et al. 2018)", cls=Reptile),
    "metasgd": AlgorithmSpec(_gradient_based(MetaSGD), "task-batch", _MAML_OPTIONS, ("classification", "regression"), "learned per-parameter inner step sizes (Li et al. 2017)", cls=MetaSGD),
    "baseline": AlgorithmSpec(lambda b, ctx, **o: Baseline(b, ctx["num_classes"], **o), "batch", _HEAD_OPTIONS, summary="pre-train on all classes, new linear head (Chen et al. 2019)", needs_classes=True, cls=Baseline),
    "baseline++": AlgorithmSpec(lambda b, ctx, **o: baseline_pp(b, ctx["num_classes"], **o), "batch", _HEAD_OPTIONS, summary="cosine-classifier pre-training and head (Chen et al. 2019)", needs_classes=True, cls=Baseline),
    "multitask": AlgorithmSpec(lambda b, ctx, **o: MultiTask(b, torch.as_tensor(ctx["class_domains"]), **o), "batch", _HEAD_OPTIONS, summary="shared encoder, one head per training domain, new head per task", needs_classes=True, cls=MultiTask),
    "pretrained": AlgorithmSpec(_gradient_based(Pretrained), "task-batch", ("inner_lr", "test_inner_steps"), ("regression",), "pooled-data regression net, fine-tuned per task (MAML paper's baseline)", cls=Pretrained),
}


#: the numeric and yes/no options, by kind (the others are names the algorithms check themselves)
_POSITIVE_NUMBERS = ("inner_lr", "finetune_lr", "scale", "lam")
_POSITIVE_WHOLE_NUMBERS = ("inner_steps", "test_inner_steps", "finetune_steps", "head_ways")
_YES_NO = ("first_order", "checkpoint_inner", "learned_step_sizes")
_FRACTIONS = ("multi_step_loss_until", "first_order_until")


def _check_option(key: str, value) -> None:
    """One sentence naming ``train.algo_options.<key>`` when its value is of the wrong kind."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in _POSITIVE_NUMBERS and not (number and value > 0):
        raise ConfigError(f"train.algo_options.{key}={value!r} is invalid; give a positive number.")
    if key in _POSITIVE_WHOLE_NUMBERS and not (number and isinstance(value, int) and value >= 1):
        raise ConfigError(f"train.algo_options.{key}={value!r} is invalid; give a whole number of at least 1.")
    if key in _YES_NO and not isinstance(value, bool):
        raise ConfigError(f"train.algo_options.{key}={value!r} is invalid; give true or false.")
    if key in _FRACTIONS and not (number and 0 <= value <= 1):
        raise ConfigError(f"train.algo_options.{key}={value!r} is invalid; give a fraction of training from 0 to 1 (0: off).")


def algorithm_spec(name: str) -> AlgorithmSpec:
    if name not in ALGORITHMS:
        raise ConfigError(f"Unknown algorithm '{name}'; choose one of: {', '.join(sorted(ALGORITHMS))}.")
    return ALGORITHMS[name]


def algorithm_norm(name: str) -> str:
    return algorithm_spec(name).norm


def option_defaults(name: str, task: str = "classification") -> dict[str, object]:
    """Each option's default for algorithm ``name`` on ``task``, read from the signatures of the
    class it builds and of that class's bases (a subclass's own default wins); on regression,
    ``inner_lr``'s is :data:`REGRESSION_INNER_LR`."""
    spec, found = algorithm_spec(name), {}
    for klass in spec.cls.__mro__ if spec.cls is not None else ():
        if "__init__" not in vars(klass):
            continue
        for param in inspect.signature(vars(klass)["__init__"]).parameters.values():
            if param.name in spec.options and param.default is not param.empty:
                found.setdefault(param.name, param.default)
    if task == "regression" and "inner_lr" in found:
        found["inner_lr"] = REGRESSION_INNER_LR
    return {key: found[key] for key in spec.options if key in found}


def build_algorithm(name: str, backbone: nn.Module, options: dict | None = None, context: dict | None = None) -> Algorithm:
    """An algorithm by name; ``options`` are its hyper-parameters (unknown ones are an error)."""
    spec = algorithm_spec(name)
    context = dict(context or {})
    task = context.get("task", "classification")
    if task not in spec.tasks:
        raise ConfigError(f"Algorithm '{name}' does not do {task}; algorithms for {task}: "
                          f"{', '.join(sorted(n for n, s in ALGORITHMS.items() if task in s.tasks))}.")
    options = dict(options or {})
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ConfigError(
            f"Option(s) {unknown} do not apply to algorithm '{name}'; it accepts: {list(spec.options) or 'none'}."
        )
    for key, value in options.items():
        _check_option(key, value)
    if spec.needs_classes and not {"num_classes", "class_domains"} <= set(context):
        raise ConfigError(f"Algorithm '{name}' needs the meta-train classes in its context (num_classes, class_domains).")
    if task == "classification" and set_norm(backbone, spec.norm):
        warnings.warn(f"build_algorithm('{name}') switched the backbone's normalisation to '{spec.norm}', the one "
                      f"'{name}' is trained with (as `metalab train` builds it); build the backbone with "
                      f"norm='{spec.norm}' to silence this.", stacklevel=2)
    return spec.build(backbone, context, **options)


__all__ = ["ALGORITHMS", "ANIL", "Algorithm", "Baseline", "FeatureHeadAlgorithm", "MAML", "MatchingNet", "MetaSGD",
           "MultiTask", "Predictor", "ProtoMAML", "ProtoNet", "R2D2", "Reptile", "algorithm_norm", "algorithm_spec", "build_algorithm",
           "option_defaults"]
