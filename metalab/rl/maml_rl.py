"""MAML for policies (Finn et al. 2017, §5.3): adapt with ``inner_steps`` policy-gradient steps on
each task's own episodes, then score the adapted policy on fresh episodes; the meta-gradient
differentiates through the inner steps (second order) or, ``first_order=True`` (FOMAML), takes
the adapted policy's gradient as the initialisation's.

As in the paper's implementation, the dependence of the pre-update *sampling* distribution on the
initialisation is not differentiated (that is ProMP's / DiCE's refinement)."""

from __future__ import annotations

import torch

from metalab.rl.base import MetaRLLearner
from metalab.rl.pg import adapt_step, advantages, rollout, surrogate_loss
from metalab.rl.policy import Policy


class MAMLRL(MetaRLLearner):
    name = "maml-rl"

    def __init__(self, *args, first_order: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.first_order = first_order
        if first_order:
            self.name = "fomaml-rl"

    def meta_gradient(self, tasks: torch.Tensor, generator: torch.Generator) -> dict:
        theta = self.policy.params()
        params = Policy.expand(theta, len(tasks))
        pre_returns = None
        for _ in range(self.inner_steps):
            traj = rollout(self.policy, self.family, tasks, params, self.episodes, generator)
            pre_returns = traj.episode_returns().mean() if pre_returns is None else pre_returns
            params = adapt_step(self.policy, params, traj, self.gamma, self.inner_lr, create_graph=not self.first_order)
        if self.first_order:
            params = {k: v.detach().requires_grad_() for k, v in params.items()}
        post = rollout(self.policy, self.family, tasks, params, self.episodes, generator)
        loss = surrogate_loss(self.policy, params, post, advantages(post, self.gamma)).mean()
        if self.first_order:
            grads = torch.autograd.grad(loss * len(tasks), list(params.values()))
            for (name, p), g in zip(theta.items(), grads):
                p.grad = g.mean(0)
        else:
            loss.backward()
        return {"loss": loss.item(), "return_before": float(pre_returns), "return_after": float(post.episode_returns().mean())}
