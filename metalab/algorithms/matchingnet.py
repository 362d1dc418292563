"""Matching Networks (Vinyals et al., NeurIPS 2016, arXiv:1606.04080), without full-context
embeddings: a query's class distribution is a softmax attention over the support set by cosine
similarity, ``p(y|x) = Σ_i softmax_i(s · cos(f(x), f(x_i))) · onehot(y_i)``, with a learned
inverse temperature ``s``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metalab.algorithms.base import FeatureHeadAlgorithm


class MatchingNet(FeatureHeadAlgorithm):
    name = "matchingnet"

    def __init__(self, backbone: nn.Module, scale: float = 10.0) -> None:
        super().__init__(backbone)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def classify_features(self, support_z, support_y, query_z, ways, params=None):
        params = params if params is not None else self.params()
        cos = F.normalize(query_z, dim=-1) @ F.normalize(support_z, dim=-1).transpose(1, 2)  # [T, M, S]
        attention = (params["log_scale"].exp() * cos).softmax(-1)
        probs = attention @ F.one_hot(support_y, ways).to(attention.dtype)  # [T, M, N]
        return probs.clamp_min(1e-8).log()  # log-probabilities: cross-entropy on them is the NLL
