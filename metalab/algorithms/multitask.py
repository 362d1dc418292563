"""Multi-task learning with a shared representation (hard parameter sharing; Caruana 1997,
"Multitask Learning"): one encoder shared by every training task, one classification head per
task, all trained jointly; a new task then gets a new head on the frozen shared features.

Here the training *tasks* are the meta-train domains (Omniglot alphabets, CLINC domains): each
domain has its own head over its own classes, implemented as one output layer whose scores are
masked to the example's domain. Adaptation is Baseline's (a linear head fitted on the support
features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalab.algorithms.baseline import Baseline, global_labels
from metalab.data.episodes import Episodes


class MultiTask(Baseline):
    name = "multitask"

    def __init__(self, backbone: nn.Module, class_domains: torch.Tensor, **kwargs) -> None:
        super().__init__(backbone, num_classes=len(class_domains), **kwargs)
        self.name = "multitask"
        self.register_buffer("class_domains", torch.as_tensor(class_domains, dtype=torch.long).clone(), persistent=True)

    def meta_loss(self, params, batch: Episodes):
        x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        labels = global_labels(batch)
        logits = self.pretrain_logits(params, self.encode(params, x))
        same_task = self.class_domains[None, :] == self.class_domains[labels][:, None]  # each example's own head
        logits = logits.masked_fill(~same_task, float("-inf"))
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": loss.item(), "acc": (logits.argmax(-1) == labels).float().mean().item()}
