"""Per-task weights for a whole meta-batch in one pass: the fast path of MAML-family inner loops.

Each task has its own copy of the weights (``[tasks, ...]`` tensors). Instead of running the
backbone once per task, a conv4 backbone is applied as grouped convolutions (``groups=tasks``)
over a ``[batch, tasks·channels, H, W]`` layout, with per-task normalisation by the same
reshape; an MLP as batched matrix products. One ``autograd.grad`` of the summed task losses then
yields every task's gradient (task ``t``'s loss depends only on slice ``t``), second order
included. Same numbers as a per-task loop (tested), a few large ops instead of many small ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalab.models.backbones import _REFERENCE_ROWS, MLP, BatchStatNorm, Conv4


def supports_grouped(backbone: nn.Module) -> bool:
    """Whether :func:`grouped_features` can run ``backbone`` (conv4 or MLP with batch-statistics
    normalisation or none)."""
    if not isinstance(backbone, (Conv4, MLP)):
        return False
    allowed = (nn.Conv2d, nn.Linear, BatchStatNorm, nn.ReLU, nn.MaxPool2d, nn.Sequential, Conv4, MLP)
    return all(isinstance(m, allowed) for m in backbone.modules())


def _task_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise ``h [B, T, C, ...]`` by each task's batch statistics (inside
    :func:`~metalab.models.backbones.reference_rows`: of its first rows); ``weight``/``bias`` ``[T, C]``."""
    dims = [0] + list(range(3, h.dim()))
    rows = _REFERENCE_ROWS.get()
    reference = h if rows is None else h[:rows]
    mean = reference.mean(dims, keepdim=True)
    var = (reference - mean).pow(2).mean(dims, keepdim=True)
    shape = [1, *weight.shape] + [1] * (h.dim() - 3)
    return (h - mean) * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)


def grouped_features(backbone: nn.Module, fast: dict[str, torch.Tensor], x: torch.Tensor, prefix: str = "backbone.") -> torch.Tensor:
    """Features ``[T, B, D]`` of inputs ``x [T, B, ...]`` under per-task weights ``fast[k] [T, ...]``."""
    t, b = x.shape[:2]
    if isinstance(backbone, Conv4):
        h = x.transpose(0, 1).reshape(b, t * x.shape[2], *x.shape[3:])
        for i, block in enumerate(backbone.blocks):
            key = f"{prefix}blocks.{i}"
            w, bias = fast[f"{key}.0.weight"], fast[f"{key}.0.bias"]
            out_ch = w.shape[1]
            h = F.conv2d(h, w.reshape(t * out_ch, *w.shape[2:]), bias.reshape(t * out_ch), stride=block[0].stride,
                         padding=1, groups=t)
            if isinstance(block[1], BatchStatNorm):
                h5 = h.view(b, t, out_ch, *h.shape[2:])
                h = _task_norm(h5, fast[f"{key}.1.weight"], fast[f"{key}.1.bias"], block[1].eps).view_as(h)
            pooled = backbone.downsample == "pool" or (backbone.downsample == "pool3" and i < 3)
            h = F.relu(F.max_pool2d(h, 2)) if pooled else F.relu(h)  # see conv_block
        if backbone.downsample == "stride":
            return h.view(b, t, out_ch, -1).mean(-1).transpose(0, 1)
        return h.view(b, t, -1).transpose(0, 1)
    h = x.flatten(2)  # MLP: [T, B, D_in]
    for i, layer in enumerate(backbone.net):
        key = f"{prefix}net.{i}"
        if isinstance(layer, nn.Linear):
            h = torch.baddbmm(fast[f"{key}.bias"][:, None, :], h, fast[f"{key}.weight"].transpose(1, 2))
        elif isinstance(layer, BatchStatNorm):
            h = _task_norm(h.transpose(0, 1), fast[f"{key}.weight"], fast[f"{key}.bias"], layer.eps).transpose(0, 1)
        else:
            h = F.relu(h)
    return h
