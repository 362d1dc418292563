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
from metalab.models.first_block import conv_norm_pool_relu, fusable


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


_REFERENCE_ROWS: contextvars.ContextVar[int | None] = contextvars.ContextVar("metalab_norm_reference_rows", default=None)


@contextmanager
def reference_rows(n: int):
    """Inside: every :class:`BatchStatNorm` normalises its whole input by the statistics of the
    first ``n`` rows only (a task's support set, placed first), so what it gives the other rows
    depends on those ``n`` rows and on each row itself — not on what else is in the batch."""
    token = _REFERENCE_ROWS.set(n)
    try:
        yield
    finally:
        _REFERENCE_ROWS.reset(token)


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
        rows = _REFERENCE_ROWS.get()
        if rows is None and not _PLAIN_OPS.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        reference = x if rows is None else x[:rows]
        mean = reference.mean(dims, keepdim=True)
        var = (reference - mean).pow(2).mean(dims, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def conv_block(in_ch: int, out_ch: int, norm: str, downsample: str = "pool") -> nn.Sequential:
    """conv3×3 → norm → max-pool 2 → ReLU. Max-pooling and ReLU commute (both are monotone), so
    this is the usual conv → norm → ReLU → max-pool block, values and gradients alike (ties
    included: a window whose maximum is ≤ 0 passes no gradient either way), with the ReLU and its
    backward on a quarter of the activations. ``downsample='stride'``: conv3×3 with stride 2 →
    norm → ReLU (the MAML paper's Omniglot block, learn2learn's ``OmniglotCNN``); ``'none'``:
    conv3×3 → norm → ReLU at the input's size."""
    stride = 2 if downsample == "stride" else 1
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)]
    keep_size = downsample == "none"  # conv4-spatial's last block: conv3×3 → norm → ReLU
    if norm == "batch":
        layers.append(nn.BatchNorm2d(out_ch))
    elif norm == "task-batch":  # statistics of the current batch only (MAML convention)
        layers.append(BatchStatNorm(out_ch))
    elif norm != "none":
        raise ConfigError(f"norm='{norm}' is unknown; use 'batch', 'task-batch' or 'none'.")
    layers += [nn.ReLU(inplace=False)] if stride == 2 or keep_size else [nn.MaxPool2d(2), nn.ReLU(inplace=False)]
    return nn.Sequential(*layers)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x [N, C, H, W]`` with channels-last strides. With one channel,
    ``x.contiguous(memory_format=torch.channels_last)`` keeps the NCHW strides (the layouts are the
    same bytes), and convolutions then pick their NCHW kernels and output; here the strides say
    channels-last explicitly. No copy when ``x`` already has these strides, or is a contiguous
    one-channel tensor (then only the strides change)."""
    if x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    n, c, h, w = x.shape
    if c == 1 and x.is_contiguous():
        return x.as_strided((n, c, h, w), (h * w, 1, w, 1))
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _batch_stat_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises by the current batch's statistics in this call."""
    if isinstance(norm, BatchStatNorm):
        return True
    if type(norm) is not nn.BatchNorm2d:
        return False
    if not norm.track_running_stats:
        return True
    return norm.training and norm.momentum is not None  # (momentum None: a cumulative average, not folded)


def foldable(block: nn.Sequential) -> bool:
    """Whether :func:`folded_conv_norm` can compute the first two layers of ``block``."""
    if len(block) < 2 or type(block[0]) is not nn.Conv2d or not _batch_stat_norm(block[1]):
        return False
    conv = block[0]
    return conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and \
        not isinstance(conv.padding, str) and conv.padding_mode == "zeros" and \
        conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= 64


def folded_conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))`` for a norm by the current batch's statistics, as one convolution.

    Each output channel's batch mean and variance follow from the input patches: with ``m`` and
    ``S`` the mean and covariance of the ``C·k·k`` patch vectors over batch and positions, channel
    ``c`` has mean ``w_c·m + b_c`` and variance ``w_cᵀ S w_c``. The norm then folds into the conv
    weights (``γ w / σ``, ``β + γ (b − μ) / σ``). Same function, and same gradients of every order
    (autograd goes through the statistics), without the normalisation's passes over the
    full-resolution output; worth it when ``C·k·k`` is small (the first block). The statistics are
    computed in float64 (also under autocast): ``wᵀSw`` is a sum of terms of both signs that
    cancel for edge-like filters on smooth images, which cost float32 ~1e-4 relative error; a
    ``C·k·k``-square matrix in float64 costs little. A ``nn.BatchNorm2d`` in training mode
    updates its running statistics as ``F.batch_norm`` does.

    ``x [N, C, H, W]`` → ``[N, O, H', W']``.
    """
    with torch.autocast(x.device.type, enabled=False):
        # statistics in float64: wᵀSw sums terms of both signs, which cancel for edge-like filters
        # on smooth images (float32 here put 4e-5 relative error on the block's output)
        patches = F.unfold(x.to(torch.float64), conv.kernel_size, padding=conv.padding)  # [N, C·k·k, L]
        count = patches.shape[0] * patches.shape[2]
        patches = patches.transpose(0, 1).reshape(patches.shape[1], count)
        m = patches.mean(1)
        centred = patches - m[:, None]
        cov = centred @ centred.T / count  # [C·k·k, C·k·k]
    folded_w, folded_b = fold_norm_into_conv(conv, norm, m, cov, count)
    if x.stride(1) == 1:  # channels-last input: weights alike
        folded_w = folded_w.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, folded_w, folded_b, padding=conv.padding)


def fold_norm_into_conv(conv: nn.Conv2d, norm: nn.Module, m: torch.Tensor, cov: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights ``[O, C, k, k]`` and bias ``[O]`` of ``norm(conv(·))`` for a norm by the batch
    statistics, from the float64 mean ``m [C·k·k]`` and covariance ``cov [C·k·k, C·k·k]`` of the
    ``count`` input patches (see :func:`folded_conv_norm`); differentiable in the conv's and the
    norm's parameters. A ``nn.BatchNorm2d`` in training mode updates its running statistics."""
    w, b = conv.weight, conv.bias
    with torch.autocast(m.device.type, enabled=False):
        flat = w.reshape(w.shape[0], -1).to(torch.float64)
        mean = (flat @ m).to(w.dtype) + (b if b is not None else 0)
        var = ((flat @ cov) * flat).sum(1).to(w.dtype)
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        folded_b = -mean * scale + (b * scale if b is not None else 0)
        if norm.bias is not None:
            folded_b = folded_b + norm.bias
        folded_w = w * scale.view(-1, *[1] * (w.dim() - 1))
    if isinstance(norm, nn.BatchNorm2d) and norm.training and norm.track_running_stats:
        with torch.no_grad():
            norm.running_mean.mul_(1 - norm.momentum).add_(mean.detach(), alpha=norm.momentum)
            norm.running_var.mul_(1 - norm.momentum).add_(var.detach() * count / max(count - 1, 1), alpha=norm.momentum)
            norm.num_batches_tracked.add_(1)
    return folded_w, folded_b


def as_model_input(x: torch.Tensor) -> torch.Tensor:
    """Images as the sources store them (``uint8``, 0–255) → ``float32`` in [0, 1], as the sampler
    hands them to training; any other input passes unchanged."""
    return x.float().div(255.0) if x.dtype == torch.uint8 else x


class Conv4(nn.Module):
    """Four blocks of conv3×3 (``hidden`` filters) → norm → max-pool 2 → ReLU (Vinyals et al.
    2016; pooling before the ReLU is the same function, see :func:`conv_block`).

    Input ``[B, C, H, W]`` (float in [0, 1], or ``uint8`` 0–255 as sources store images) → features
    ``[B, out_dim]`` (64 for 28×28 inputs, 1600 for 84×84).

    ``downsample='stride'`` (backbone ``conv4-strided``): stride-2 convolutions instead of
    max-pooling and features averaged over the last block's positions (``out_dim = hidden``): the
    network of the MAML paper for Omniglot and learn2learn's ``OmniglotCNN``, 2.66 M multiply-adds
    per 28×28 image against conv4's 9.82 M, with the same parameters.

    ``downsample='pool3'`` (backbone ``conv4-spatial``): no max-pool after the last block, so the
    features keep its positions (``hidden × 3 × 3`` = 576 for 28×28 inputs, against conv4's 64),
    with the same parameters and multiply-adds as conv4.

    Fast paths, same numbers: when the first block normalises by batch statistics, its conv and
    norm run as one convolution (:func:`folded_conv_norm`); with ``channels_last = True`` (set on
    CPU by the trainer) inputs get channels-last strides, which the convolutions then keep; with
    ``fused_first_block = True`` too (set by the trainer on CPU) a one-channel first block runs
    as one compiled kernel
    (:mod:`metalab.models.first_block`).
    """

    #: give inputs channels-last strides (faster convolutions and pooling on CPU)
    channels_last = False
    #: run a one-channel first block (conv, batch-stat norm, pool, ReLU) as one compiled CPU kernel
    fused_first_block = False

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28, norm: str = "batch",
                 downsample: str = "pool") -> None:
        super().__init__()
        if downsample not in ("pool", "stride", "pool3"):
            raise ConfigError(f"downsample='{downsample}' is unknown; use 'pool' (max-pooling), 'pool3' (no pooling "
                              "after the last block) or 'stride' (strided convs).")
        self.norm = norm  #: 'batch', 'task-batch' or 'none' (see :func:`set_norm`)
        self.downsample = downsample  #: 'pool' (conv4), 'stride' (conv4-strided) or 'pool3' (conv4-spatial)
        blocks = ["stride"] * 4 if downsample == "stride" else ["pool"] * 3 + ["none" if downsample == "pool3" else "pool"]
        self.blocks = nn.Sequential(*[conv_block(in_channels if i == 0 else hidden, hidden, norm, kind)
                                      for i, kind in enumerate(blocks)])
        side = image_size
        for kind in blocks:
            side = (side + 1) // 2 if kind == "stride" else side // 2 if kind == "pool" else side
        if side < 1 or image_size < 16:
            raise ConfigError(f"image_size={image_size} is too small for conv4; use 16 or more.")
        # strided: features are the mean over the last block's positions (as in the MAML paper)
        self.out_dim = hidden if downsample == "stride" else hidden * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_model_input(x)
        plain = _PLAIN_OPS.get() or _REFERENCE_ROWS.get() is not None  # under vmap, or normalising by reference rows: plain ops
        if self.channels_last and not plain:
            x = channels_last(x)
        if self.downsample == "stride":
            return self.blocks(x).mean((2, 3))
        first = self.blocks[0]
        if self.fused_first_block and not plain and self.channels_last and fusable(first, x):
            return self.blocks[1:](conv_norm_pool_relu(first, x)).flatten(1)
        if plain or not foldable(first):
            return self.blocks(x).flatten(1)
        h = folded_conv_norm(first[0], first[1], x)
        for layer in list(first)[2:]:
            h = layer(h)
        return self.blocks[1:](h).flatten(1)


class MLP(nn.Module):
    """Fully connected ReLU network: ``[B, *in_shape]`` → ``[B, out_dim]`` (inputs are flattened)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (256, 128), norm: str = "none") -> None:
        super().__init__()
        self.norm = norm  #: 'batch', 'task-batch' or 'none' (see :func:`set_norm`)
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
        return self.net(as_model_input(x).flatten(1))


def set_norm(backbone: nn.Module, norm: str) -> bool:
    """Switch a :class:`Conv4` / :class:`MLP` built with ``norm='batch'`` to ``'task-batch'`` or back,
    in place, keeping the learned scales and shifts (an algorithm expects one of them: MAML
    normalises by the current batch, ProtoNet & co. keep running statistics). Returns whether
    anything changed; a backbone built with ``norm='none'`` has nothing to switch and is left as is."""
    current = getattr(backbone, "norm", None)
    if current == norm or {current, norm} != {"batch", "task-batch"}:
        return False
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d, BatchStatNorm)):
                channels = child.weight.shape[0]
                if norm == "task-batch":
                    new = BatchStatNorm(channels, child.eps)
                else:
                    new = (nn.BatchNorm2d if isinstance(backbone, Conv4) else nn.BatchNorm1d)(channels, eps=child.eps)
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    new.bias.copy_(child.bias)
                setattr(parent, name, new.to(child.weight.device))
    backbone.norm = norm
    return True


#: the conv4 backbones by name, and how each downsamples (see :class:`Conv4`)
CONV4_DOWNSAMPLING = {"conv4": "pool", "conv4-strided": "stride", "conv4-spatial": "pool3"}


def build_backbone(name: str, example_shape: tuple[int, ...], hidden: int = 64, norm: str = "batch") -> nn.Module:
    """A backbone by name for examples of ``example_shape`` (``(C, H, W)`` images or ``(D,)`` vectors)."""
    if name in CONV4_DOWNSAMPLING:
        if len(example_shape) != 3:
            raise ConfigError(f"backbone '{name}' needs image examples [C, H, W]; this data has shape {list(example_shape)}; use backbone 'mlp'.")
        return Conv4(example_shape[0], hidden, example_shape[1], norm, CONV4_DOWNSAMPLING[name])
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
    raise ConfigError(f"backbone '{name}' is unknown; choose one of: conv4, conv4-strided, conv4-spatial, mlp, linear, diagonal, identity.")


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
