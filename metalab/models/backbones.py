"""Backbones: the standard 4-block conv net and an MLP.

Both are plain ``nn.Module``s; algorithms apply them functionally with
``torch.func.functional_call(module, params, x)`` so inner loops work on parameter dicts.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from metalab.errors import ConfigError


_PLAIN_OPS: contextvars.ContextVar[bool] = contextvars.ContextVar("metalab_plain_norm_ops", default=False)


@contextmanager
def plain_norm_ops():
    """Within this block :class:`BatchStatNorm` uses plain tensor ops instead of the fused kernel
    (needed under ``torch.func.vmap``, whose batch-norm rule gives wrong second-order gradients:
    measured 7e-4 off in float64 against a per-task loop)."""
    token = _PLAIN_OPS.set(True)
    try:
        yield
    finally:
        _PLAIN_OPS.reset(token)


class BatchStatNorm(nn.Module):
    """Normalisation by the statistics of the current batch only, with a learned scale and shift
    (BatchNorm in training mode without running statistics: the MAML convention). Uses the fused
    batch-norm kernel, or plain ops inside :func:`plain_norm_ops`."""

    subtracts_batch_mean = True

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _PLAIN_OPS.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).pow(2).mean(dims, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def conv_block(in_ch: int, out_ch: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1)]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(out_ch))
    elif norm == "task-batch":  # statistics of the current batch only (MAML convention)
        layers.append(BatchStatNorm(out_ch))
    elif norm != "none":
        raise ConfigError(f"norm='{norm}' is unknown; use 'batch', 'task-batch' or 'none'.")
    layers += [nn.ReLU(inplace=False), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four blocks of conv3×3 (``hidden`` filters) → norm → ReLU → max-pool 2 (Vinyals et al. 2016).

    Input ``[B, C, H, W]`` → features ``[B, out_dim]`` (64 for 28×28 inputs, 1600 for 84×84).
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28, norm: str = "batch") -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[conv_block(in_channels if i == 0 else hidden, hidden, norm) for i in range(4)])
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ConfigError(f"image_size={image_size} is too small for conv4; use 16 or more.")
        self.out_dim = hidden * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).flatten(1)


class MLP(nn.Module):
    """Fully connected ReLU network: ``[B, *in_shape]`` → ``[B, out_dim]`` (inputs are flattened)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (256, 128), norm: str = "none") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden]
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(b))
            elif norm == "task-batch":
                layers.append(BatchStatNorm(b))
            layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def build_backbone(name: str, example_shape: tuple[int, ...], hidden: int = 64, norm: str = "batch") -> nn.Module:
    """A backbone by name for examples of ``example_shape`` (``(C, H, W)`` images or ``(D,)`` vectors)."""
    if name == "conv4":
        if len(example_shape) != 3:
            raise ConfigError(f"backbone 'conv4' needs image examples [C, H, W]; this data has shape {list(example_shape)}; use backbone 'mlp'.")
        return Conv4(example_shape[0], hidden, example_shape[1], norm)
    if name == "mlp":
        in_dim = 1
        for d in example_shape:
            in_dim *= d
        return MLP(in_dim, (hidden * 4, hidden * 2), norm)
    if name == "diagonal":
        if len(example_shape) != 1:
            raise ConfigError(f"backbone 'diagonal' needs feature vectors [D]; this data has shape {list(example_shape)}.")
        return DiagonalScale(example_shape[0])
    if name in ("linear", "identity"):
        if len(example_shape) != 1:
            raise ConfigError(f"backbone '{name}' needs feature vectors [D]; this data has shape {list(example_shape)}; use 'conv4' or 'mlp'.")
        return LinearProjection(example_shape[0], trainable=name == "linear")
    raise ConfigError(f"backbone '{name}' is unknown; choose one of: conv4, mlp, linear, diagonal, identity.")


class DiagonalScale(nn.Module):
    """``z · exp(s)`` on fixed features ``[B, D] → [B, D]``, ``s`` starting at zero: a meta-learned
    weighting of embedding dimensions (D parameters, so it cannot memorise the training classes)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.log_scale.exp()


class LinearProjection(nn.Module):
    """``z + W z`` on fixed features ``[B, D] → [B, D]``, with ``W`` starting at zero: a
    meta-learned projection of frozen embeddings that starts as the identity (so meta-training
    starts from plain prototypes). ``trainable=False`` keeps it the identity."""

    def __init__(self, dim: int, trainable: bool = True) -> None:
        super().__init__()
        self.out_dim = dim
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.proj.requires_grad_(trainable)
        self.trainable = trainable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x + self.proj(x) if self.trainable else x


def normalised_biases(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of the biases of conv / linear layers followed directly by a normalisation layer.

    The norm subtracts the batch mean, so the loss does not depend on such a bias: its gradient is
    round-off, which algorithms drop rather than let Adam turn into random steps."""
    names: list[str] = []
    children = list(module.named_children())
    for (name, child), (_, after) in zip(children, children[1:] + [("", None)]):
        if isinstance(child, (nn.Conv2d, nn.Linear)) and child.bias is not None and \
                (isinstance(after, nn.modules.batchnorm._BatchNorm) or getattr(after, "subtracts_batch_mean", False)):
            names.append(f"{prefix}{name}.bias")
        names += normalised_biases(child, f"{prefix}{name}.")
    return names
