"""Proto-MAML (Triantafillou et al., ICLR 2020, "Meta-Dataset", arXiv:1903.03096).

MAML whose classifier head, at the start of every task, is the Prototypical Network's read as a
linear layer: for class prototypes ``c_k`` (mean support feature of class ``k`` under the current
backbone), ``W_k = 2 c_k`` and ``b_k = -‖c_k‖²``, so ``W z + b = ‖z‖² - ‖z - c_k‖²`` ranks the
classes as ProtoNet does. The inner loop then takes SGD steps on backbone and head together, as
in MAML. The head's start depends on the support and the backbone, and the outer gradient flows
through it in both orders: ``first_order=True`` (fo-Proto-MAML, the paper's variant) treats the
inner gradients as constants but keeps the prototypes' dependence on the backbone.

It has no head parameters of its own, adapts to any number of ways, and is invariant to the order
of labels. The inner steps take *partial* derivatives (backbone and head as independent fast
weights): the backbone entries of the starting point are fresh views of the meta-parameters, so
``autograd.grad`` with respect to them does not also run through the head's dependence on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch.func import functional_call

from metalab.algorithms.base import sub_params
from metalab.algorithms.maml import MAML, Params
from metalab.algorithms.task_threads import module_for_thread
from metalab.errors import ConfigError


class ProtoMAML(MAML):
    name = "protomaml"

    def __init__(self, backbone: nn.Module, inner_lr: float = 0.1, inner_steps: int = 1, test_inner_steps: int = 3,
                 **kwargs) -> None:
        if kwargs.get("execution") == "grouped":
            raise ConfigError("Proto-MAML runs with execution 'loop' or 'vmap' (its head starts from each task's "
                              "prototypes); remove execution='grouped'.")
        if kwargs.get("task", "classification") != "classification":
            raise ConfigError("Proto-MAML is for classification only (its head is the support's class prototypes).")
        super().__init__(backbone, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_steps=test_inner_steps, **kwargs)
        self.name = "protomaml"
        del self.head_weight, self.head_bias  # the head is the prototypes; nothing to meta-learn there
        self.invariant_params = ()

    def task_init(self, params: Params, ways: int, support_x: torch.Tensor | None = None,
                  support_y: torch.Tensor | None = None) -> Params:
        """Backbone weights (fresh views: see the module docstring) and the prototype head
        ``head.weight [ways, D] = 2 c``, ``head.bias [ways] = -‖c‖²``."""
        if support_x is None or support_y is None:
            raise ConfigError("Proto-MAML's head starts from the support's prototypes; give the support set.")
        backbone = sub_params(params, "backbone.")
        z = functional_call(module_for_thread(self.backbone), backbone, (support_x,))  # [S, D]
        one_hot = F.one_hot(support_y, ways).to(z.dtype)  # [S, ways]
        prototypes = (one_hot.T @ z) / one_hot.sum(0).clamp_min(1)[:, None]  # [ways, D]
        fast = {f"backbone.{k}": v.view_as(v) for k, v in backbone.items()}
        fast["head.weight"] = 2 * prototypes
        fast["head.bias"] = -prototypes.pow(2).sum(-1)
        return fast
