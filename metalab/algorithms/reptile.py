"""Reptile (Nichol, Achiam & Schulman 2018, arXiv:1803.02999).

For each task, run plain SGD from the meta-parameters ``θ`` on the task's data to get ``φ``,
then move ``θ`` towards ``φ``. Written for the shared engine as a surrogate loss
``½ Σ_tasks ||θ − sg(φ)||² / tasks`` whose gradient is the Reptile direction ``mean(θ − φ)``, so
the outer optimiser (Adam by default) applies the meta-update. First order by construction;
the head, inner loop and adaptation are MAML's.
"""

from __future__ import annotations

import torch
from torch import nn

from metalab.algorithms.base import Algorithm
from metalab.algorithms.maml import MAML


class Reptile(MAML):
    name = "reptile"

    def __init__(self, backbone: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5, test_inner_steps: int = 10,
                 **kwargs) -> None:
        super().__init__(backbone, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_steps=test_inner_steps,
                         first_order=True, **kwargs)
        self.name = "reptile"
        self.invariant_params = ()  # Reptile's surrogate moves the shared head row (towards the class rows' mean)

    def meta_backward(self, params, batch):
        # the surrogate's gradient (the Reptile direction), not MAML's per-task query-loss backward
        return Algorithm.meta_backward(self, params, batch)

    def meta_loss(self, params, batch):
        surrogate, losses, scores = 0.0, [], []
        for t in range(batch.tasks):
            x = torch.cat([batch.support_x[t], batch.query_x[t]])
            y = torch.cat([batch.support_y[t], batch.query_y[t]])
            start = self.task_init(params, batch.ways)
            fast = self.inner_loop(params, x, y, batch.ways, self.inner_steps, create_graph=False)
            surrogate = surrogate + sum(0.5 * (start[k] - fast[k].detach()).pow(2).sum() for k in start)
            with torch.no_grad():
                out = self.forward_fast(fast, x)
                losses.append(self.loss_fn(out, y))
                scores.append(self.score(out, y))
        surrogate = surrogate / batch.tasks
        # `loss`/metric report the adapted weights on the task's own data (what Reptile optimises)
        return surrogate, {"loss": torch.stack(losses).mean().item(), self.metric_name: torch.stack(scores).mean().item()}
