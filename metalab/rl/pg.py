"""Rollouts and the policy-gradient pieces every meta-RL learner shares: discounted returns, a
linear-feature value baseline fitted per task (rllab's / the MAML paper's), normalised advantages,
the REINFORCE surrogate loss, and the inner adaptation step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalab.rl.policy import Policy


@dataclass
class Trajectories:
    """``N`` episodes of ``H`` steps for each of ``T`` tasks."""
    obs: torch.Tensor  #: [T, N, H, obs_dim], the observation each action was taken in
    actions: torch.Tensor  #: [T, N, H, act_dim] (box) or [T, N, H] (discrete)
    rewards: torch.Tensor  #: [T, N, H]

    def episode_returns(self) -> torch.Tensor:
        """Undiscounted return of each episode ``[T, N]``."""
        return self.rewards.sum(-1)


@torch.no_grad()
def rollout(policy: Policy, family, tasks: torch.Tensor, params: dict[str, torch.Tensor], episodes: int,
            generator: torch.Generator) -> Trajectories:
    """Run ``episodes`` episodes per task with per-task ``params`` (``[T, ...]``) in ``family``."""
    params = {k: v.detach() for k, v in params.items()}
    obs = family.reset(tasks, episodes, generator)
    all_obs, all_actions, all_rewards = [], [], []
    for _ in range(family.horizon):
        actions = policy.sample(params, obs, generator)
        all_obs.append(obs)
        all_actions.append(actions)
        obs, reward = family.step(actions)
        all_rewards.append(reward)
    return Trajectories(torch.stack(all_obs, 2), torch.stack(all_actions, 2), torch.stack(all_rewards, 2))


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return-to-go ``[T, N, H]`` of rewards ``[T, N, H]``."""
    out, running = torch.empty_like(rewards), torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out


def baseline_features(obs: torch.Tensor) -> torch.Tensor:
    """rllab's linear-feature baseline: ``[o, o², t, t², t³, 1]`` with ``t`` the step / 100."""
    o = obs.clamp(-10, 10)
    steps = obs.shape[2]
    t = (torch.arange(steps, dtype=obs.dtype) / 100.0).view(1, 1, steps, 1).expand(*obs.shape[:3], 1)
    return torch.cat([o, o * o, t, t * t, t ** 3, torch.ones_like(t)], -1)


def advantages(traj: Trajectories, gamma: float, reg: float = 1e-5) -> torch.Tensor:
    """Per-task normalised advantages ``[T, N, H]``: return-to-go minus a linear baseline fitted by
    ridge regression on that task's own episodes."""
    returns = discounted_returns(traj.rewards, gamma)
    x = baseline_features(traj.obs).flatten(1, 2)  # [T, N*H, F]
    y = returns.flatten(1, 2).unsqueeze(-1)
    eye = torch.eye(x.shape[-1]).expand(x.shape[0], -1, -1)
    gram = x.transpose(1, 2) @ x
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-8).view(-1, 1, 1)  # reg relative to the data
    coef = torch.linalg.solve(gram + reg * scale * eye + 1e-8 * eye, x.transpose(1, 2) @ y)
    adv = (y - x @ coef).squeeze(-1).view_as(returns)
    mean = adv.mean(dim=(1, 2), keepdim=True)
    std = adv.std(dim=(1, 2), keepdim=True)
    return (adv - mean) / (std + 1e-8)


def surrogate_loss(policy: Policy, params: dict[str, torch.Tensor], traj: Trajectories, adv: torch.Tensor) -> torch.Tensor:
    """REINFORCE surrogate per task ``[T]``: ``−mean(log π(a|s) · A)``; its gradient is the policy gradient."""
    t, n, h = traj.rewards.shape
    obs = traj.obs.reshape(t, n * h, -1)
    actions = traj.actions.reshape(t, n * h, *traj.actions.shape[3:])
    logp = policy.log_prob(params, obs, actions)
    return -(logp * adv.reshape(t, n * h)).mean(-1)


def adapt_step(policy: Policy, params: dict[str, torch.Tensor], traj: Trajectories, gamma: float, lr: float,
               create_graph: bool = False) -> dict[str, torch.Tensor]:
    """One policy-gradient step per task: ``θ'_i = θ_i − lr · ∇ L_i(θ_i)`` (params ``[T, ...]``).
    ``create_graph`` keeps the step differentiable (second-order MAML)."""
    loss = surrogate_loss(policy, params, traj, advantages(traj, gamma)).sum()  # tasks are independent
    names = list(params)
    grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
    return {k: params[k] - lr * g for k, g in zip(names, grads)}
