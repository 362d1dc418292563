"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang, ICLR 2019, "A Closer Look at Few-shot
Classification", arXiv:1904.04232): the transfer-learning route.

Pre-training is standard classification over *all* meta-train classes (episodes are only a way
to draw mini-batches: each example's label is its global meta-train class). A new task gets a
new head fitted on the frozen features of its support set: linear (*Baseline*) or cosine with a
scale (*Baseline++*, whose pre-training classifier is cosine too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalab.algorithms.base import Algorithm, Predictor, accuracy, check_task
from metalab.algorithms.heads import fit_linear_head, linear_logits
from metalab.data.episodes import Episodes


def global_labels(batch: Episodes) -> torch.Tensor:
    """Source-class index of every support and query example, ``[T*(N*K) + T*(N*Q)]``."""
    classes = batch.classes.to(batch.support_y.device)
    return torch.cat([torch.gather(classes, 1, batch.support_y).flatten(), torch.gather(classes, 1, batch.query_y).flatten()])


class Baseline(Algorithm):
    name = "baseline"
    frozen_features = True

    def __init__(self, backbone: nn.Module, num_classes: int, cosine: bool = False, scale: float = 10.0,
                 finetune_steps: int = 100, finetune_lr: float = 0.01) -> None:
        super().__init__(backbone)
        self.classifier = nn.Linear(backbone.out_dim, num_classes, bias=not cosine)
        self.cosine, self.scale = cosine, scale
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr
        if cosine:
            self.name = "baseline++"

    def pretrain_logits(self, params, z: torch.Tensor) -> torch.Tensor:
        weight = params["classifier.weight"]
        if self.cosine:
            return self.scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).T
        return z @ weight.T + params["classifier.bias"]

    def meta_loss(self, params, batch: Episodes):
        x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        labels = global_labels(batch)
        logits = self.pretrain_logits(params, self.encode(params, x))
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": loss.item(), "acc": (logits.argmax(-1) == labels).float().mean().item()}

    def classify_features(self, support_z, support_y, query_z, ways, params=None):
        weight, bias = fit_linear_head(support_z, support_y, ways, self.finetune_steps, self.finetune_lr,
                                       self.cosine, self.scale)
        return linear_logits(query_z.detach(), weight, bias, self.cosine, self.scale)

    def adapt(self, params, support_x, support_y, ways):
        check_task(support_x, support_y, ways)
        with torch.no_grad():
            support_z = self.encode(params, support_x)[None]
        weight, bias = fit_linear_head(support_z, support_y[None], ways, self.finetune_steps, self.finetune_lr,
                                       self.cosine, self.scale)
        return Predictor(lambda x: linear_logits(self.encode(params, x)[None], weight, bias, self.cosine, self.scale)[0],
                         {"weight": weight[0], "bias": bias[0]})


def baseline_pp(backbone: nn.Module, num_classes: int, **kwargs) -> Baseline:
    return Baseline(backbone, num_classes, cosine=True, **kwargs)


__all__ = ["Baseline", "baseline_pp", "accuracy", "global_labels"]
