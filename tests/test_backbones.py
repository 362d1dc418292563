"""The conv4 fast paths compute the plain network's numbers: folded first block, pooling before
the ReLU, channels-last inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalab.models.backbones import BatchStatNorm, Conv4, channels_last, folded_conv_norm, foldable


def _images(n=12, c=1, side=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, side, side, generator=g, dtype=torch.float64)
    x[:, :, : side // 3] = 0  # blank rows, as in Omniglot strokes on a white page (ties, zero patches)
    return x


def _layers(norm_cls, c=1):
    torch.manual_seed(0)
    conv = nn.Conv2d(c, 8, 3, padding=1).double()
    norm = norm_cls(8).double()
    with torch.no_grad():
        norm.weight.uniform_(-1.5, 1.5)  # negative scales too
        norm.bias.normal_()
    return conv, norm


@pytest.mark.parametrize("norm_cls,c", [(BatchStatNorm, 1), (nn.BatchNorm2d, 1), (BatchStatNorm, 3)])
def test_folded_conv_norm_gives_the_two_layers_values_and_gradients_of_first_and_second_order(norm_cls, c):
    conv, norm = _layers(norm_cls, c)
    x = _images(c=c)
    weights = [conv.weight, conv.bias, norm.weight, norm.bias]
    twin = copy.deepcopy(norm)  # its own running statistics (each call updates them in place)
    twin.weight, twin.bias = norm.weight, norm.bias
    plain, folded = twin(conv(x)), folded_conv_norm(conv, norm, x)
    assert torch.allclose(plain, folded, atol=1e-10)
    g = torch.randn_like(plain)
    first_plain = torch.autograd.grad((plain * g).sum(), weights, create_graph=True)
    first_folded = torch.autograd.grad((folded * g).sum(), weights, create_graph=True)
    for a, b in zip(first_plain, first_folded):
        assert torch.allclose(a, b, atol=1e-9)
    v = [torch.randn_like(w) for w in weights]
    second_plain = torch.autograd.grad(sum((a * u).sum() for a, u in zip(first_plain, v)), weights[:3], allow_unused=True)
    second_folded = torch.autograd.grad(sum((a * u).sum() for a, u in zip(first_folded, v)), weights[:3], allow_unused=True)
    for a, b in zip(second_plain, second_folded):
        a = torch.zeros_like(b) if a is None else a
        assert torch.allclose(a, b, atol=1e-8)


def test_folded_batchnorm_updates_running_statistics_like_the_layer():
    conv, norm = _layers(nn.BatchNorm2d)
    reference = nn.BatchNorm2d(8).double()
    reference.load_state_dict(norm.state_dict())
    x = _images()
    for _ in range(3):
        reference(conv(x))
        folded_conv_norm(conv, norm, x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(norm, name).double(), getattr(reference, name).double(), atol=1e-10), name


def test_folding_applies_only_where_the_norm_uses_batch_statistics():
    conv, norm = _layers(nn.BatchNorm2d)
    block = nn.Sequential(conv, norm, nn.MaxPool2d(2), nn.ReLU())
    assert foldable(block)
    norm.eval()  # running statistics: an ordinary conv → norm
    assert not foldable(block)
    norm.train()
    norm.momentum = None  # cumulative average: left to the layer
    assert not foldable(block)
    wide = nn.Sequential(nn.Conv2d(64, 8, 3, padding=1), BatchStatNorm(8))  # 576-wide patches: not worth it
    assert not foldable(wide)


@pytest.mark.parametrize("norm", ["task-batch", "batch", "none"])
def test_conv4_fast_paths_match_the_plain_block_order(norm):
    """Conv4 (folded first block, pool before ReLU, channels-last) against a hand-written
    conv → norm → ReLU → max-pool network with the same weights."""
    torch.manual_seed(0)
    net = Conv4(1, 8, 28, norm).double()
    x = _images(side=28)

    def plain(x):
        h = x
        for block in net.blocks:
            h = block[0](h)
            if norm != "none":
                h = block[1](h)
            h = F.max_pool2d(F.relu(h), 2)
        return h.flatten(1)

    for fast_layout in (False, True):
        net.channels_last = fast_layout
        out = net(x)
        grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
        reference = plain(x)
        reference_grads = torch.autograd.grad(reference.square().sum(), list(net.parameters()))
        assert torch.allclose(out, reference, atol=1e-10)
        for (name, _), a, b in zip(net.named_parameters(), grads, reference_grads):
            assert torch.allclose(a, b, atol=1e-9), name


def test_channels_last_gives_one_channel_images_explicit_strides_so_convolutions_stay_channels_last():
    x = torch.rand(4, 1, 10, 10)
    assert x.contiguous(memory_format=torch.channels_last).stride(1) != 1  # the pitfall
    y = channels_last(x)
    assert y.stride(1) == 1 and torch.equal(x, y) and y.data_ptr() == x.data_ptr()
    out = F.conv2d(y, torch.randn(6, 1, 3, 3), padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    rgb = channels_last(torch.rand(4, 3, 10, 10))
    assert rgb.is_contiguous(memory_format=torch.channels_last)


def test_folded_statistics_keep_float32_precision_for_edge_filters_on_strokes(omniglot):
    """Difference filters on smooth images make ``wᵀSw`` a small sum of large terms of both
    signs; computed in float32 it put ~1e-4 relative error on the block (measured 4e-5 on a
    trained MAML); in float64 the folded block is as accurate as conv → norm in NCHW."""
    x = omniglot.x[:100].float().div(255)  # [100, 1, 28, 28] strokes on a blank page
    conv, norm = nn.Conv2d(x.shape[1], 4, 3, padding=1), BatchStatNorm(4)
    edges = torch.tensor([[[0, 0, 0], [0, 1, -1], [0, 0, 0]], [[0, 1, 0], [0, -1, 0], [0, 0, 0]],
                          [[1, 1, 1], [1, -8, 1], [1, 1, 1]], [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]], dtype=torch.float32)
    with torch.no_grad():
        conv.weight.copy_(edges[:, None].expand_as(conv.weight) * 30 + 1e-3)
        conv.bias.fill_(5.0)
    with torch.no_grad():
        reference = folded_conv_norm(copy.deepcopy(conv).double(), copy.deepcopy(norm).double(), x.double())
        direct = norm(conv(x)).double()  # NCHW fused kernel
        folded = folded_conv_norm(conv, norm, x).double()

    def error(y):
        return float((y - reference).norm() / reference.norm())

    assert error(folded) < 1e-6 and error(folded) < 10 * error(direct) + 1e-7, (error(folded), error(direct))
