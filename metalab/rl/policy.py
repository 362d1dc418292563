"""Policies whose parameters carry a leading *task* dimension, so ``T`` tasks with ``T`` different
(adapted) parameter sets act in one batched forward (``bmm``), and per-task policy gradients come
from a single ``autograd.grad``.

Parameters are a dict ``name -> [T, ...]``; :meth:`Policy.expand` turns the shared (meta-learned)
parameters into that form as differentiable views, so MAML's second-order term flows back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metalab.rl.envs import ActionSpec


class Policy(nn.Module):
    """An MLP policy: Gaussian with a learned state-independent log-std for continuous actions,
    categorical for discrete ones. ``hidden=()`` gives a linear (tabular, for constant obs) policy."""

    def __init__(self, obs_dim: int, action: ActionSpec, hidden: tuple[int, ...] = (100, 100), init_log_std: float = 0.0) -> None:
        super().__init__()
        self.action, self.obs_dim = action, obs_dim
        sizes = [obs_dim, *hidden, action.size]
        self.layers = len(sizes) - 1
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            weight = torch.empty(a, b)
            nn.init.kaiming_uniform_(weight.T, a=math.sqrt(5))  # nn.Linear's default init
            self.register_parameter(f"w{i}", nn.Parameter(weight))
            self.register_parameter(f"b{i}", nn.Parameter(torch.zeros(1, b)))
        if action.kind == "box":
            self.log_std = nn.Parameter(torch.full((1, action.size), init_log_std))

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    @staticmethod
    def expand(params: dict[str, torch.Tensor], tasks: int) -> dict[str, torch.Tensor]:
        """Shared parameters → ``[tasks, ...]`` views (gradients flow back to the shared ones)."""
        return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}

    def _out(self, params: dict[str, torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
        """``obs [T, M, obs_dim]`` → ``[T, M, action.size]`` (means or logits)."""
        h = obs
        for i in range(self.layers):
            h = torch.baddbmm(params[f"b{i}"], h, params[f"w{i}"])
            if i < self.layers - 1:
                h = torch.tanh(h)
        return h

    def log_prob(self, params: dict[str, torch.Tensor], obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``obs [T, M, D]``, ``actions [T, M, A]`` (box) or ``[T, M]`` (discrete) → ``[T, M]``."""
        out = self._out(params, obs)
        if self.action.kind == "discrete":
            return torch.log_softmax(out, -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        log_std = params["log_std"]
        z = (actions - out) / log_std.exp()
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    @torch.no_grad()
    def sample(self, params: dict[str, torch.Tensor], obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = self._out(params, obs)
        if self.action.kind == "discrete":
            probs = torch.softmax(out, -1)
            flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            return flat.reshape(out.shape[:-1])
        noise = torch.randn(out.shape, generator=generator)
        return out + params["log_std"].exp() * noise
