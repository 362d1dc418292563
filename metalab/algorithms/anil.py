"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, arXiv:1909.09157).

MAML with the inner loop on the classifier head only. The backbone embeds each task's images (in
training task by task, see :class:`~metalab.algorithms.base.FeatureHeadAlgorithm`); every task's
head then takes its inner steps at once as batched matrix products
(``W [tasks, ways, D]``), so there is no per-task Python loop. The head starts from one learned
row copied to every class (as in :mod:`metalab.algorithms.maml`). Second order by default
(through the head steps into the backbone); ``first_order=True`` detaches the inner gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalab.algorithms.base import FeatureHeadAlgorithm


class ANIL(FeatureHeadAlgorithm):
    name = "anil"

    def __init__(self, backbone: nn.Module, inner_lr: float = 0.5, inner_steps: int = 5, test_inner_steps: int = 10,
                 first_order: bool = False) -> None:
        super().__init__(backbone)
        self.head_weight = nn.Parameter(torch.zeros(1, backbone.out_dim))
        self.head_bias = nn.Parameter(torch.zeros(1))
        self.inner_lr, self.inner_steps, self.test_inner_steps = inner_lr, inner_steps, test_inner_steps
        self.first_order = first_order
        self.invariant_params = ("head_weight", "head_bias")  # shared by every class: softmax ignores it

    def adapted_heads(self, params, support_z, support_y, ways: int, steps: int, create_graph: bool):
        """Per-task heads ``W [T, N, D]``, ``b [T, N]`` after ``steps`` SGD steps on the support loss."""
        t = support_z.shape[0]
        weight = params["head_weight"].expand(t, ways, -1)
        bias = params["head_bias"].expand(t, ways)
        for _ in range(steps):
            logits = support_z @ weight.transpose(1, 2) + bias[:, None, :]
            # sum over tasks of each task's mean loss: every task's gradient is its own
            loss = F.cross_entropy(logits.flatten(0, 1), support_y.flatten(), reduction="sum") / support_y.shape[1]
            g_w, g_b = torch.autograd.grad(loss, (weight, bias), create_graph=create_graph)
            weight, bias = weight - self.inner_lr * g_w, bias - self.inner_lr * g_b
        return weight, bias

    def classify_features(self, support_z, support_y, query_z, ways, params=None):
        params = params if params is not None else self.params()
        training = torch.is_grad_enabled() and self.training
        if not training:  # evaluation: adapt the head on fixed features
            params = {k: v.detach().requires_grad_() for k, v in params.items() if k.startswith("head_")}
            support_z, query_z = support_z.detach(), query_z.detach()
        with torch.enable_grad():
            steps = self.inner_steps if training else self.test_inner_steps
            weight, bias = self.adapted_heads(params, support_z, support_y, ways, steps,
                                              create_graph=training and not self.first_order)
        logits = query_z @ weight.transpose(1, 2) + bias[:, None, :]
        return logits if training else logits.detach()
