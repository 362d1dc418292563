"""Reptile for policies (Nichol et al. 2018): take ``inner_steps`` policy-gradient steps on each
task (fresh episodes each step), then move the initialisation towards the adapted policies; the
outer optimiser gets ``θ − mean_i θ_i'`` as the gradient."""

from __future__ import annotations

import torch

from metalab.rl.base import MetaRLLearner
from metalab.rl.pg import adapt_step, rollout
from metalab.rl.policy import Policy


class ReptileRL(MetaRLLearner):
    name = "reptile-rl"

    def meta_gradient(self, tasks: torch.Tensor, generator: torch.Generator) -> dict:
        theta = self.policy.params()
        params = {k: v.detach().clone().requires_grad_() for k, v in Policy.expand(theta, len(tasks)).items()}
        returns = []
        for _ in range(self.inner_steps):
            traj = rollout(self.policy, self.family, tasks, params, self.episodes, generator)
            returns.append(float(traj.episode_returns().mean()))
            params = {k: v.detach().requires_grad_() for k, v in adapt_step(self.policy, params, traj, self.gamma, self.inner_lr).items()}
        for name, p in theta.items():
            p.grad = p.detach() - params[name].detach().mean(0)
        return {"loss": float(sum(g.pow(2).sum() for g in (p.grad for p in theta.values())).sqrt()),
                "return_before": returns[0], "return_after": returns[-1]}
