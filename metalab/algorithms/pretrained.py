"""The non-meta "pretrained" baseline of the MAML paper's regression experiments: one network
trained on the pooled data of many tasks (plain supervised learning, no inner loop), then
fine-tuned on a new task's K shots with the same SGD steps MAML uses at test time."""

from __future__ import annotations

import torch
from torch import nn

from metalab.algorithms.maml import MAML
from metalab.errors import ConfigError


class Pretrained(MAML):
    name = "pretrained"

    def __init__(self, backbone: nn.Module, task: str = "regression", **kwargs) -> None:
        if task != "regression":
            raise ConfigError("algorithm 'pretrained' is the regression baseline; for classification use 'baseline' or 'baseline++'.")
        super().__init__(backbone, task=task, **kwargs)
        self.name = "pretrained"

    def meta_loss(self, params, batch):
        fast = self.task_init(params, batch.ways)
        x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        y = torch.cat([batch.support_y.flatten(0, 1), batch.query_y.flatten(0, 1)])
        out = self.forward_fast(fast, x)
        loss = self.loss_fn(out, y)
        return loss, {"loss": loss.item(), self.metric_name: loss.item()}
