"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

A class is the mean of its support embeddings (its *prototype*); a query is scored by negative
squared Euclidean distance to each prototype. In training the backbone runs task by task
(each task normalised by its own batch statistics, see
:class:`~metalab.algorithms.base.FeatureHeadAlgorithm`); prototypes for all tasks are one batched
matrix product.

``test_feature_norm`` changes how a trained network is *used* (adaptation and evaluation only,
not training): ``'l2'`` scores by cosine similarity to the prototypes (features L2-normalised),
``'centre-l2'`` first subtracts the support set's mean feature (SimpleShot's centring, Wang et
al. 2019, with the task's own support as the reference, so a prediction still depends on the
support and the input only), then L2-normalises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metalab.algorithms.base import FeatureHeadAlgorithm
from metalab.errors import ConfigError

FEATURE_NORMS = ("none", "l2", "centre-l2")


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


def normalise_features(support_z: torch.Tensor, query_z: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, S, D]``, ``[T, M, D]`` features under ``how`` (one of :data:`FEATURE_NORMS`)."""
    if how == "centre-l2":
        centre = support_z.mean(1, keepdim=True)
        support_z, query_z = support_z - centre, query_z - centre
    if how in ("l2", "centre-l2"):
        support_z, query_z = F.normalize(support_z, dim=-1), F.normalize(query_z, dim=-1)
    return support_z, query_z


class ProtoNet(FeatureHeadAlgorithm):
    name = "protonet"

    def __init__(self, backbone, test_feature_norm: str = "none") -> None:
        super().__init__(backbone)
        if test_feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"test_feature_norm='{test_feature_norm}' is unknown; use one of: {', '.join(FEATURE_NORMS)}.")
        self.test_feature_norm = test_feature_norm

    def classify_features(self, support_z, support_y, query_z, ways, params=None):
        if self.test_feature_norm != "none" and not (self.training and torch.is_grad_enabled()):
            support_z, query_z = normalise_features(support_z, query_z, self.test_feature_norm)
            # scaled cosine: the ranking of the prototypes is the cosine's; the scale keeps softmax scores readable
            return 10.0 * query_z @ F.normalize(prototypes(support_z, support_y, ways), dim=-1).transpose(1, 2)
        return neg_sq_distance(query_z, prototypes(support_z, support_y, ways))
