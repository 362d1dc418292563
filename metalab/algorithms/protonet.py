"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

A class is the mean of its support embeddings (its *prototype*); a query is scored by negative
squared Euclidean distance to each prototype. In training the backbone runs task by task
(each task normalised by its own batch statistics, see
:class:`~metalab.algorithms.base.FeatureHeadAlgorithm`); prototypes for all tasks are one batched
matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metalab.algorithms.base import FeatureHeadAlgorithm


def prototypes(support_z: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means ``[T, N, D]`` of support features ``[T, S, D]`` with labels ``[T, S]`` in ``0..N-1``."""
    one_hot = F.one_hot(support_y, ways).to(support_z.dtype)  # [T, S, N]
    sums = one_hot.transpose(1, 2) @ support_z  # [T, N, D]
    return sums / one_hot.sum(1).clamp_min(1)[..., None]


def neg_sq_distance(query_z: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``-||q - p||²`` for ``[T, M, D]`` queries and ``[T, N, D]`` prototypes → ``[T, M, N]``."""
    return -(
        (query_z**2).sum(-1, keepdim=True) - 2 * query_z @ protos.transpose(1, 2) + (protos**2).sum(-1)[:, None, :]
    )


class ProtoNet(FeatureHeadAlgorithm):
    name = "protonet"

    def classify_features(self, support_z, support_y, query_z, ways, params=None):
        return neg_sq_distance(query_z, prototypes(support_z, support_y, ways))
