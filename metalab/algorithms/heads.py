"""Heads fitted on frozen features, batched over tasks (used by the transfer baselines)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_logits(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cosine: bool, scale: float) -> torch.Tensor:
    """``[T, M, D]`` features → ``[T, M, N]`` scores under ``weight [T, N, D]`` (cosine: ``scale·cos``)."""
    if cosine:
        return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).transpose(1, 2)
    return z @ weight.transpose(1, 2) + bias[:, None, :]


def fit_linear_head(support_z: torch.Tensor, support_y: torch.Tensor, ways: int, steps: int = 100, lr: float = 0.01,
                    cosine: bool = False, scale: float = 10.0, weight_decay: float = 1e-3):
    """A new linear (or cosine) classifier per task, trained on the support features with Adam,
    all tasks at once: ``[T, S, D]`` features, ``[T, S]`` labels → ``(weight [T, N, D], bias [T, N])``.

    Cosine heads start at the class means (an imprinted start); linear heads at zero. Adam is
    element-wise, so summing the tasks' losses trains each task's head on its own loss only.
    """
    support_z = support_z.detach()
    t, _, d = support_z.shape
    one_hot = F.one_hot(support_y, ways).to(support_z.dtype)
    if cosine:
        init = (one_hot.transpose(1, 2) @ support_z) / one_hot.sum(1).clamp_min(1)[..., None]
    else:
        init = torch.zeros(t, ways, d, dtype=support_z.dtype, device=support_z.device)
    weight = init.clone().requires_grad_()
    bias = torch.zeros(t, ways, dtype=support_z.dtype, device=support_z.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            logits = linear_logits(support_z, weight, bias, cosine, scale)
            loss = F.cross_entropy(logits.flatten(0, 1), support_y.flatten(), reduction="sum") / support_y.shape[1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return weight.detach(), bias.detach()
