"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

A class is the mean of its support embeddings (its *prototype*); a query is scored by negative
squared Euclidean distance to each prototype. The backbone runs once over every image of the
meta-batch; prototypes for all tasks are one reshape and mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metalab.algorithms.base import Algorithm, Predictor, accuracy
from metalab.data.episodes import Episodes


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


class ProtoNet(Algorithm):
    name = "protonet"
    frozen_features = True

    def meta_loss(self, params, batch: Episodes):
        t, s, q = batch.tasks, batch.support_x.shape[1], batch.query_x.shape[1]
        x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        z = self.encode(params, x)
        support_z, query_z = z[: t * s].view(t, s, -1), z[t * s :].view(t, q, -1)
        logits = self.classify_features(support_z, batch.support_y, query_z, batch.ways)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return loss, {"loss": loss.item(), "acc": accuracy(logits, batch.query_y).mean().item()}

    def classify_features(self, support_z, support_y, query_z, ways):
        return neg_sq_distance(query_z, prototypes(support_z, support_y, ways))

    def adapt(self, params, support_x, support_y, ways):
        with torch.no_grad():
            protos = prototypes(self.encode(params, support_x)[None], support_y[None], ways)
        return Predictor(lambda x: neg_sq_distance(self.encode(params, x)[None], protos)[0], {"prototypes": protos[0]})
