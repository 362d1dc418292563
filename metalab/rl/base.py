"""The interface every meta-RL learner implements, and the adaptation-curve evaluation they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalab.engine.evaluate import mean_ci95
from metalab.rl.pg import adapt_step, rollout
from metalab.rl.policy import Policy


class MetaRLLearner:
    """``meta_gradient(tasks, generator)`` fills ``.grad`` of the policy's parameters for one
    meta-batch of tasks and returns logging stats; the trainer's optimiser takes the step."""

    name = "meta-rl"

    def __init__(self, policy: Policy, family, inner_lr: float, inner_steps: int, episodes: int, gamma: float) -> None:
        self.policy, self.family = policy, family
        self.inner_lr, self.inner_steps, self.episodes, self.gamma = inner_lr, inner_steps, episodes, gamma

    def meta_gradient(self, tasks: torch.Tensor, generator: torch.Generator) -> dict:
        raise NotImplementedError


@dataclass
class AdaptationCurve:
    """Mean return (± 95 % CI over tasks) before adaptation (step 0) and after each PG step."""
    steps: list[int]
    mean: list[float]
    ci95: list[float]
    tasks: int
    per_task: torch.Tensor  #: [tasks, steps + 1] mean episode return of each task

    def record(self) -> list[dict]:
        return [{"adaptation_steps": s, "return": m, "ci95": c, "tasks": self.tasks}
                for s, m, c in zip(self.steps, self.mean, self.ci95)]


def adaptation_curve(policy: Policy, family, tasks: torch.Tensor, max_steps: int, episodes: int, gamma: float,
                     lr: float, seed: int, chunk: int = 50) -> AdaptationCurve:
    """For each task: ``episodes`` episodes with the policy (step 0), one PG step on them, fresh
    episodes with the adapted policy (step 1), … up to ``max_steps``. Tasks run in chunks."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, len(tasks), chunk):
        part = tasks[start:start + chunk]
        params = {k: v.detach().clone().requires_grad_() for k, v in Policy.expand(policy.params(), len(part)).items()}
        returns = []
        for step in range(max_steps + 1):
            traj = rollout(policy, family, part, params, episodes, generator)
            returns.append(traj.episode_returns().mean(1))
            if step < max_steps:
                params = {k: v.detach().requires_grad_() for k, v in adapt_step(policy, params, traj, gamma, lr).items()}
        rows.append(torch.stack(returns, 1))
    per_task = torch.cat(rows)
    stats = [mean_ci95(per_task[:, s]) for s in range(max_steps + 1)]
    return AdaptationCurve(list(range(max_steps + 1)), [m for m, _ in stats], [c for _, c in stats], len(tasks), per_task)
