"""Meta-SGD (Li, Zhou, Chen & Li 2017, arXiv:1707.09835): MAML whose inner loop uses a learned
step size for every parameter element, ``φ = θ − α ⊙ ∇L_support(θ)``, with ``α`` meta-learned
alongside ``θ`` (initialised to ``inner_lr``)."""

from __future__ import annotations

import torch
from torch import nn

from metalab.algorithms.maml import MAML


class MetaSGD(MAML):
    name = "metasgd"

    def __init__(self, backbone: nn.Module, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.name = "metasgd"
        params = dict(self.named_parameters())
        lrs, self._lr_of = [], {}
        for i, key in enumerate(self.fast_keys()):  # one learned rate tensor per fast weight
            base = params["head_weight" if key == "head.weight" else "head_bias" if key == "head.bias" else key]
            lrs.append(nn.Parameter(torch.full_like(base, self.inner_lr)))
            self._lr_of[key] = f"inner_lrs_.{i}"
        self.inner_lrs_ = nn.ParameterList(lrs)

    def inner_lrs(self, params, step=0):
        return {key: params[name] for key, name in self._lr_of.items()}
