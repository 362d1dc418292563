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
support and the input only), then L2-normalises. ``test_views`` scores every image by several
views at once (its four 90° turns, and their mirror images: :meth:`ProtoNet.encode`).

``global_loss`` adds a classifier over every meta-train class to training (see
:meth:`ProtoNet.auxiliary_loss`). ``metric_scale`` multiplies the distances (TADAM's metric
scaling, Oreshkin et al. 2018): on L2-normalised features, such as a sentence encoder's, squared
distances lie in [0, 4] and the softmax over them is nearly flat without it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metalab.algorithms.base import FeatureHeadAlgorithm
from metalab.algorithms.baseline import global_labels
from metalab.errors import ConfigError

FEATURE_NORMS = ("none", "l2", "centre-l2")
TEST_VIEWS = ("none", "rotations", "dihedral")


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
    """A class is the mean of its support features; a query scores ``-‖q - c‖²`` against each.

    Options: ``test_feature_norm`` (``none``, ``l2``: cosine, ``centre-l2``: centred on the
    support mean, then cosine; adaptation and evaluation only); ``test_views`` (``rotations``:
    score every image by its four 90° turns at once, for networks trained with rotation classes;
    ``dihedral``: those and their mirror images; adaptation and evaluation only, 4× or 8× the
    encoding); ``global_loss`` (weight of an auxiliary cross-entropy over every meta-train class
    in training; 0: off); ``metric_scale`` (a factor on the negative squared distances, in training
    and at test: the softmax's inverse temperature)."""

    name = "protonet"

    def __init__(self, backbone, test_feature_norm: str = "none", global_loss: float = 0.0,
                 num_classes: int | None = None, test_views: str = "none", metric_scale: float = 1.0) -> None:
        super().__init__(backbone)
        if not (isinstance(metric_scale, (int, float)) and not isinstance(metric_scale, bool) and metric_scale > 0):
            raise ConfigError(f"train.algo_options.metric_scale={metric_scale!r} is invalid; give a factor above 0 (1: plain distances).")
        self.metric_scale = float(metric_scale)
        if test_views not in TEST_VIEWS:
            raise ConfigError(f"test_views='{test_views}' is unknown; use one of: {', '.join(TEST_VIEWS)}.")
        self.test_views = test_views
        if test_feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"test_feature_norm='{test_feature_norm}' is unknown; use one of: {', '.join(FEATURE_NORMS)}.")
        if not (isinstance(global_loss, (int, float)) and not isinstance(global_loss, bool) and global_loss >= 0):
            raise ConfigError(f"train.algo_options.global_loss={global_loss!r} is invalid; give a weight of 0 (off) or more.")
        if global_loss > 0 and not num_classes:
            raise ConfigError("ProtoNet's global_loss needs the number of meta-train classes (num_classes); "
                              "train it with metalab train, which passes them.")
        self.test_feature_norm = test_feature_norm
        self.global_loss = float(global_loss)
        if global_loss > 0:  # a linear classifier over every meta-train class, used in training only
            self.global_head = torch.nn.Linear(backbone.out_dim, int(num_classes))

    def encode(self, params, x: torch.Tensor) -> torch.Tensor:
        """Features ``[B, D]`` of ``x [B, ...]``; with ``test_views`` outside training, the
        features of every view of the image side by side, divided by ``√V`` (``[B, V·D]``):
        ``rotations``, the image turned by 0, 90, 180 and 270° (views the network learnt classes
        of, with rotation classes); ``dihedral``, those four and their mirror images. A squared
        distance is then the mean of the views' (an ensemble of V from one network, on one
        view's scale, so probabilities and out-of-scope thresholds keep their meaning)."""
        z = super().encode(params, x)
        if self.test_views == "none" or self.training:
            return z
        if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
            raise ConfigError(f"test_views='{self.test_views}' needs square images [B, C, H, W]; got inputs of shape "
                              f"{list(x.shape)}; use test_views='none' for this data.")
        views = [z]
        for mirrored in (False, True) if self.test_views == "dihedral" else (False,):
            image = x.flip(-1) if mirrored else x
            views += [super(ProtoNet, self).encode(params, torch.rot90(image, k, dims=(-2, -1)))
                      for k in ((0, 1, 2, 3) if mirrored else (1, 2, 3))]
        return torch.cat(views, -1) / math.sqrt(len(views))

    def auxiliary_loss(self, params, support_z, query_z, batch):
        """``global_loss`` × cross-entropy of a linear classifier over all meta-train classes on
        every support and query feature of the episode (an auxiliary term as in TADAM, Oreshkin et
        al. 2018); prototypes and predictions never use the classifier."""
        if self.global_loss == 0:
            return None
        z = torch.cat([support_z.flatten(0, 1), query_z.flatten(0, 1)])
        logits = z @ params["global_head.weight"].T + params["global_head.bias"]
        return self.global_loss * F.cross_entropy(logits, global_labels(batch))

    def classify_features(self, support_z, support_y, query_z, ways, params=None):
        if self.test_feature_norm != "none" and not (self.training and torch.is_grad_enabled()):
            support_z, query_z = normalise_features(support_z, query_z, self.test_feature_norm)
            # scaled cosine: the ranking of the prototypes is the cosine's; the scale keeps softmax scores readable
            return 10.0 * query_z @ F.normalize(prototypes(support_z, support_y, ways), dim=-1).transpose(1, 2)
        scores = neg_sq_distance(query_z, prototypes(support_z, support_y, ways))
        return scores if self.metric_scale == 1.0 else self.metric_scale * scores
