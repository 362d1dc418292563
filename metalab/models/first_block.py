"""conv4's first block on one-channel images as one compiled kernel: conv 3×3 → batch-stat norm →
2×2 max-pool → ReLU, without the full-resolution activations.

On CPU the first block of conv4 on 28×28 Omniglot images is memory-bound, not compute-bound: its
convolution writes 64 channels at full resolution (16 MB for an 80-image task), the max-pool
reads them back, and its backward fills a zeroed 16 MB gradient, scatters into it and reads it
again for the weight gradient: 30–40 ms of a ~110 ms ProtoNet task on one core of the Zen 3
development machine, while the arithmetic (36 M multiply-adds) takes ~2 ms. Element-wise
PyTorch ops cannot fuse these passes (each costs 1–3 ms per pass over 1 M elements here, and
a version built from them was slower), so the block runs as numba-compiled loops (numba: a
well-kept JIT compiler for numeric Python; ``nogil``, so tasks side by side on the cores stay
parallel):

* :func:`_patch_moments`: the sums and 9×9 products of the 3×3 patches in float64, from which
  the norm folds into the conv weights exactly as in :func:`metalab.models.backbones.folded_conv_norm`;
* :func:`_forward`: per pooled pixel and channel, the four window positions' dot products with
  the folded weights, their maximum and its position (one byte), plus bias, then ReLU: the
  only output is the pooled ``[N·H/2·W/2, C]`` map (channels-last), 4× smaller;
* :func:`_backward`: the weight and bias gradients straight from that byte and the input
  patches, with no full-resolution gradient.

Same function as conv → norm → max-pool → ReLU (ties go to the first window position, as in
PyTorch's max-pool; float32 sums in another order). Its backward is differentiable again through
plain tensor ops (used when a caller asks for second-order gradients, as MAML's inner loop
does), so every order of gradient is right; the trainer turns it on for every method on CPU
(:attr:`Conv4.fused_first_block`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:  # numba is a declared dependency; without it conv4 keeps its PyTorch path
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    njit = None

AVAILABLE = njit is not None


def _jit(fn):
    """Compile ``fn`` on first call, cached on disk; without a writable cache folder (numba then
    refuses ``cache=True`` at decoration), compiled per process instead."""
    if not AVAILABLE:
        return fn
    try:
        return njit(nogil=True, fastmath=True, cache=True)(fn)
    except RuntimeError:
        return njit(nogil=True, fastmath=True)(fn)


@_jit
def _patch_moments(xpad):  # pragma: no cover - compiled
    """``xpad [N, H+2, W+2]`` → (``s [9]``, ``ss [9, 9]``) float64 sums of the 3×3 patches and of
    their outer products over every image and position."""
    n_img, hp, wp = xpad.shape
    s = np.zeros(9)
    ss = np.zeros((9, 9))
    for n in range(n_img):
        for a in range(9):
            ay, ax = a // 3, a % 3
            for b in range(a, 9):
                by, bx = b // 3, b % 3
                acc = 0.0
                for i in range(hp - 2):
                    for j in range(wp - 2):
                        acc += np.float64(xpad[n, i + ay, j + ax]) * np.float64(xpad[n, i + by, j + bx])
                ss[a, b] += acc
            acc = 0.0
            for i in range(hp - 2):
                for j in range(wp - 2):
                    acc += np.float64(xpad[n, i + ay, j + ax])
            s[a] += acc
    for a in range(9):
        for b in range(a):
            ss[a, b] = ss[b, a]
    return s, ss


@_jit
def _forward(xpad, w, bias, out, idx):  # pragma: no cover - compiled
    """ReLU(max over each 2×2 window of conv3×3(x) + bias): ``xpad [N, H+2, W+2]``, ``w [9, C]``
    (row t = tap t, row-major over the 3×3 kernel), ``bias [C]`` → ``out [N·H/2·W/2, C]`` and
    ``idx`` (uint8, same shape: the window position 0-3 of the maximum, row-major)."""
    n_img, hp, wp = xpad.shape
    channels = w.shape[1]
    hh, wh = (hp - 2) // 2, (wp - 2) // 2
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
    best = np.empty(channels, np.float32)
    arg = np.empty(channels, np.float32)  # float lanes keep the select vectorised
    zero = np.float32(0.0)
    r = 0
    for n in range(n_img):
        for i in range(hh):
            for j in range(wh):
                for q in range(4):
                    y, x = 2 * i + (q >> 1), 2 * j + (q & 1)
                    p0, p1, p2 = xpad[n, y, x], xpad[n, y, x + 1], xpad[n, y, x + 2]
                    p3, p4, p5 = xpad[n, y + 1, x], xpad[n, y + 1, x + 1], xpad[n, y + 1, x + 2]
                    p6, p7, p8 = xpad[n, y + 2, x], xpad[n, y + 2, x + 1], xpad[n, y + 2, x + 2]
                    if q == 0:
                        for c in range(channels):
                            best[c] = (p0 * w0[c] + p1 * w1[c] + p2 * w2[c] + p3 * w3[c] + p4 * w4[c]
                                       + p5 * w5[c] + p6 * w6[c] + p7 * w7[c] + p8 * w8[c])
                            arg[c] = zero
                    else:
                        qf = np.float32(q)
                        for c in range(channels):
                            v = (p0 * w0[c] + p1 * w1[c] + p2 * w2[c] + p3 * w3[c] + p4 * w4[c]
                                 + p5 * w5[c] + p6 * w6[c] + p7 * w7[c] + p8 * w8[c])
                            gt = v > best[c]
                            best[c] = v if gt else best[c]
                            arg[c] = qf if gt else arg[c]
                for c in range(channels):
                    v = best[c] + bias[c]
                    out[r, c] = v if v > zero else zero
                    idx[r, c] = np.uint8(arg[c])
                r += 1


@_jit
def _backward(xpad, grad, out, idx):  # pragma: no cover - compiled
    """Gradients of :func:`_forward`'s weights ``[9, C]`` and bias ``[C]`` from ``grad [N·H/2·W/2, C]``."""
    n_img, hp, wp = xpad.shape
    channels = grad.shape[1]
    hh, wh = (hp - 2) // 2, (wp - 2) // 2
    gw = np.zeros((9, channels), np.float32)
    gb = np.zeros(channels, np.float32)
    g0, g1, g2, g3, g4, g5, g6, g7, g8 = gw[0], gw[1], gw[2], gw[3], gw[4], gw[5], gw[6], gw[7], gw[8]
    live = np.empty(channels, np.float32)
    zero = np.float32(0.0)
    r = 0
    for n in range(n_img):
        for i in range(hh):
            for j in range(wh):
                for c in range(channels):
                    live[c] = grad[r, c] if out[r, c] > zero else zero
                    gb[c] += live[c]
                for q in range(4):
                    y, x = 2 * i + (q >> 1), 2 * j + (q & 1)
                    p0, p1, p2 = xpad[n, y, x], xpad[n, y, x + 1], xpad[n, y, x + 2]
                    p3, p4, p5 = xpad[n, y + 1, x], xpad[n, y + 1, x + 1], xpad[n, y + 1, x + 2]
                    p6, p7, p8 = xpad[n, y + 2, x], xpad[n, y + 2, x + 1], xpad[n, y + 2, x + 2]
                    qq = np.uint8(q)
                    for c in range(channels):
                        s = live[c] if idx[r, c] == qq else zero
                        g0[c] += p0 * s
                        g1[c] += p1 * s
                        g2[c] += p2 * s
                        g3[c] += p3 * s
                        g4[c] += p4 * s
                        g5[c] += p5 * s
                        g6[c] += p6 * s
                        g7[c] += p7 * s
                        g8[c] += p8 * s
                r += 1
    return gw, gb


def _window_patches(xpad: torch.Tensor) -> torch.Tensor:
    """``xpad [N, H+2, W+2]`` → ``[4, N·H/2·W/2, 9]``: each window position's 3×3 patches."""
    n, hp, wp = xpad.shape
    h, w = hp - 2, wp - 2
    patches = F.unfold(xpad[:, None], 3)  # [N, 9, H·W]
    return patches.view(n, 9, h // 2, 2, w // 2, 2).permute(3, 5, 0, 2, 4, 1).reshape(4, n * (h // 2) * (w // 2), 9)


class _ConvNormPoolReLU(torch.autograd.Function):
    """``(xpad [N, H+2, W+2], w [9, C], bias [C])`` → ``[N·H/2·W/2, C]`` (see :func:`_forward`)."""

    @staticmethod
    def forward(ctx, xpad, w, bias):
        n, hp, wp = xpad.shape
        rows = n * ((hp - 2) // 2) * ((wp - 2) // 2)
        out = torch.empty(rows, w.shape[1], dtype=torch.float32)
        idx = torch.empty(rows, w.shape[1], dtype=torch.uint8)
        _forward(xpad.numpy(), w.detach().contiguous().numpy(), bias.detach().contiguous().numpy(), out.numpy(), idx.numpy())
        ctx.save_for_backward(xpad, out, idx)
        return out

    @staticmethod
    def backward(ctx, grad):
        xpad, out, idx = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the same gradients from differentiable ops
            live = grad * (out > 0)
            patches = _window_patches(xpad)
            gw = sum(patches[q].T @ (live * (idx == q)) for q in range(4))
            return None, gw, live.sum(0)
        gw, gb = _backward(xpad.numpy(), grad.detach().contiguous().numpy(), out.numpy(), idx.numpy())
        return None, torch.from_numpy(gw), torch.from_numpy(gb)


def fusable(block: nn.Sequential, x: torch.Tensor) -> bool:
    """Whether :func:`conv_norm_pool_relu` computes ``block(x)``: one input channel, conv 3×3 with
    padding 1, a batch-statistics norm, then ``MaxPool2d(2)`` and ReLU; float32 CPU images of even
    size that need no gradient themselves, outside autocast."""
    from metalab.models.backbones import foldable

    if not AVAILABLE or len(block) != 4 or not foldable(block):
        return False
    conv, pool, relu = block[0], block[2], block[3]
    if conv.in_channels != 1 or conv.kernel_size != (3, 3) or tuple(conv.padding) != (1, 1):
        return False
    if type(pool) is not nn.MaxPool2d or type(relu) is not nn.ReLU:
        return False
    if pool.kernel_size not in (2, (2, 2)) or pool.stride not in (2, (2, 2)) or pool.padding not in (0, (0, 0)) \
            or pool.dilation not in (1, (1, 1)) or pool.ceil_mode or pool.return_indices:
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and not x.requires_grad and x.dim() == 4 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            and not torch.is_autocast_enabled("cpu"))


def conv_norm_pool_relu(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for a block that :func:`fusable` accepts: ``x [N, 1, H, W]`` →
    ``[N, C, H/2, W/2]`` with channels-last strides."""
    from metalab.models.backbones import fold_norm_into_conv

    conv, norm = block[0], block[1]
    n, _, h, w = x.shape
    xpad = F.pad(x.reshape(n, h, w), (1, 1, 1, 1)).contiguous()
    s, ss = _patch_moments(xpad.numpy())
    count = n * h * w
    mean = torch.from_numpy(s / count)
    cov = torch.from_numpy(ss / count) - mean[:, None] * mean[None, :]
    folded_w, folded_b = fold_norm_into_conv(conv, norm, mean, cov, count)
    out = _ConvNormPoolReLU.apply(xpad, folded_w.reshape(folded_w.shape[0], 9).T, folded_b)
    return out.view(n, h // 2, w // 2, -1).permute(0, 3, 1, 2)
