"""The non-meta baseline: one policy trained by policy gradient on all tasks at once (multi-task
REINFORCE with the same baseline), then adapted at test time exactly like the meta-learned ones."""

from __future__ import annotations

import torch

from metalab.rl.base import MetaRLLearner
from metalab.rl.pg import advantages, rollout, surrogate_loss
from metalab.rl.policy import Policy


class PretrainedRL(MetaRLLearner):
    name = "pretrained-rl"

    def meta_gradient(self, tasks: torch.Tensor, generator: torch.Generator) -> dict:
        params = Policy.expand(self.policy.params(), len(tasks))
        traj = rollout(self.policy, self.family, tasks, params, self.episodes, generator)
        loss = surrogate_loss(self.policy, params, traj, advantages(traj, self.gamma)).mean()
        loss.backward()
        r = float(traj.episode_returns().mean())
        return {"loss": loss.item(), "return_before": r, "return_after": r}
