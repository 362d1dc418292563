"""R2D2: differentiable closed-form ridge-regression head (Bertinetto, Henriques, Torr & Vedaldi,
ICLR 2019, arXiv:1805.08136).

Per task, ``W = Xᵀ (X Xᵀ + λI)⁻¹ Y`` from support features ``X [S, D]`` and one-hot labels
``Y [S, N]`` (the Woodbury form: an ``S×S`` solve, cheap when the support set is small); queries
are scored ``α · (Q W) + β``. ``λ``, ``α`` and ``β`` are meta-learned; gradients flow through the
solve into the backbone. All tasks are solved in one batched ``torch.linalg.solve``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metalab.algorithms.base import FeatureHeadAlgorithm


def ridge_head(support_z: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Ridge weights ``[T, D, N]`` for features ``[T, S, D]`` and targets ``[T, S, N]``."""
    gram = support_z @ support_z.transpose(1, 2)  # [T, S, S]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return support_z.transpose(1, 2) @ torch.linalg.solve(gram + lam * eye, targets)


class R2D2(FeatureHeadAlgorithm):
    name = "r2d2"

    def __init__(self, backbone: nn.Module, lam: float = 1.0, scale: float = 1.0) -> None:
        super().__init__(backbone)
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam)))
        self.scale = nn.Parameter(torch.tensor(scale))
        self.offset = nn.Parameter(torch.tensor(0.0))

    def classify_features(self, support_z, support_y, query_z, ways, params=None):
        params = params if params is not None else self.params()
        targets = F.one_hot(support_y, ways).to(support_z.dtype)
        weights = ridge_head(support_z, targets, params["log_lam"].exp())
        return params["scale"] * (query_z @ weights) + params["offset"]
