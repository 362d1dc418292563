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


def _fused_and_plain(net: Conv4, x: torch.Tensor, create_graph: bool = False):
    """(output, gradients) of ``net`` with and without the fused first block, from the same weights."""
    results, start = [], copy.deepcopy(net.state_dict())
    for fused in (True, False):
        net.load_state_dict(start)  # the same running statistics before each call
        net.fused_first_block = fused
        params = [p for name, p in net.named_parameters() if not name.endswith("0.bias")]  # conv biases before a norm: round-off
        out = net(x)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + out.square().mean()
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        if create_graph:  # gradients of a function of the gradients: second order through the block
            grads = torch.autograd.grad(sum(g.square().sum() for g in grads), params)
        results.append((out.detach(), grads, {k: v.clone() for k, v in net.named_buffers()}))
    return results


@pytest.mark.parametrize("norm", ["batch", "task-batch"])
def test_fused_first_block_is_the_block_it_replaces(norm, omniglot):
    """The compiled conv → norm → max-pool → ReLU of a one-channel first block (float32, CPU)
    against conv4's own ops: the same values, first- and second-order gradients and running
    statistics, on strokes (many exact ties: flat windows) and on noise."""
    from metalab.models import first_block

    if not first_block.AVAILABLE:
        pytest.skip("numba is not installed")
    torch.manual_seed(0)
    net = Conv4(1, 16, 28, norm)
    net.channels_last = True
    strokes = omniglot.x[:40].float().div(255)
    for x in (strokes, torch.randn(40, 1, 28, 28)):
        assert first_block.fusable(net.blocks[0], channels_last(x))
        (fused, fused_grads, fused_buffers), (plain, plain_grads, plain_buffers) = _fused_and_plain(net, x)
        assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5)
        for a, b in zip(fused_grads, plain_grads):
            assert (a - b).norm() <= 1e-4 * b.norm()
        for name in fused_buffers:
            assert torch.allclose(fused_buffers[name], plain_buffers[name], rtol=1e-5, atol=1e-6), name
    (_, fused_gg, _), (_, plain_gg, _) = _fused_and_plain(net, torch.randn(20, 1, 28, 28), create_graph=True)
    for a, b in zip(fused_gg, plain_gg):
        assert (a - b).norm() <= 1e-4 * b.norm()


def test_fused_first_block_sends_a_tied_window_to_its_first_pixel_as_max_pool_does(omniglot):
    """Ties are common in the first block: flat windows of a blank page, and here a box filter
    (all weights equal) on strokes, which scores different patches with the same count of ink
    alike. The gradient must go to one pixel per window, the first as in PyTorch's max-pool,
    else the weight gradient counts a window twice or takes another patch."""
    from metalab.models import first_block

    if not first_block.AVAILABLE:
        pytest.skip("numba is not installed")
    torch.manual_seed(0)
    net = Conv4(1, 8, 28, "task-batch")
    net.channels_last = True
    with torch.no_grad():
        net.blocks[0][0].weight.fill_(1.0)
    x = omniglot.x[:30].float().div(255).round()  # strokes, 0 or 1
    x[:5] = 0.0  # blank pages: every window a tie
    (fused, fused_grads, _), (plain, plain_grads, _) = _fused_and_plain(net, x)
    assert torch.allclose(fused, plain, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_first_block_applies_only_where_it_is_the_same_function():
    from metalab.models import first_block

    torch.manual_seed(0)
    net = Conv4(1, 8, 28, "batch")
    block = net.blocks[0]
    x = channels_last(torch.rand(4, 1, 28, 28))
    assert first_block.fusable(block, x) == first_block.AVAILABLE
    assert not first_block.fusable(block, x.double())  # the kernels are float32
    assert not first_block.fusable(block, x.clone().requires_grad_())  # no input gradient
    assert not first_block.fusable(block, channels_last(torch.rand(4, 1, 27, 27)))  # odd size: pooling drops a row
    assert not first_block.fusable(Conv4(3, 8, 28, "batch").blocks[0], torch.rand(4, 3, 28, 28))
    assert not first_block.fusable(Conv4(1, 8, 28, "none").blocks[0], x)  # nothing to fold
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not first_block.fusable(block, x)
    net.eval()  # running statistics: not a batch-statistics norm
    assert not first_block.fusable(block, x)


def test_the_trainer_fuses_the_first_block_on_cpu_unless_asked_for_contiguous_layout():
    from metalab.engine import RunConfig
    from metalab.engine.trainer import build_model

    for algo in ("protonet", "anil", "fomaml", "reptile", "maml", "metasgd"):
        for layout, fused in (("auto", True), ("contiguous", False)):
            cfg = RunConfig.from_dict({"train": {"algo": algo, "device": "cpu", "memory_format": layout}})
            model = build_model(cfg, (1, 28, 28), torch.device("cpu"), {"task": "classification"})
            assert model.backbone.fused_first_block is fused, (algo, layout)


@pytest.mark.parametrize("algo", ["fomaml", "reptile", "maml", "metasgd"])
def test_maml_family_meta_gradients_are_the_same_with_the_fused_block(algo, omniglot, monkeypatch):
    """The MAML family trains through the fused first block (adapted, non-leaf weights, two inner
    steps; second order through its differentiable backward for MAML and Meta-SGD): the
    meta-gradients are conv4's own to float32 round-off."""
    from metalab.data import EpisodeSampler
    from metalab.engine import RunConfig
    from metalab.engine.trainer import build_model
    from metalab.models import backbones

    pytest.importorskip("numba")
    calls = []
    compiled = backbones.conv_norm_pool_relu
    monkeypatch.setattr(backbones, "conv_norm_pool_relu", lambda *a: calls.append(1) or compiled(*a))
    batch = EpisodeSampler(omniglot, 5, 1, 3, tasks=3, seed=0).sample(0)
    cfg = RunConfig.from_dict({"train": {"algo": algo, "device": "cpu", "hidden": 16, "task_threads": 1,
                                         "algo_options": {"inner_steps": 2, "inner_lr": 0.3}}})
    model = build_model(cfg, (1, 28, 28), torch.device("cpu"), {"task": "classification"})
    grads = []
    for fused in (True, False):
        model.backbone.fused_first_block = fused
        model.zero_grad(set_to_none=True)
        calls.clear()
        model.meta_backward(model.params(), batch)
        assert bool(calls) is fused  # the compiled block ran in the first arm only (one call per pass)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[1].items():
        if name.endswith("blocks.0.0.bias"):  # a conv bias before a norm: its gradient is round-off
            continue
        assert (grads[0][name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name


def test_fused_first_block_falls_back_without_numba_or_a_writable_cache(monkeypatch):
    """Without numba conv4 keeps its own ops; where numba refuses ``cache=True`` (no writable
    cache folder, raised when the function is decorated) the kernels compile per process."""
    from metalab.models import first_block

    x = channels_last(torch.rand(4, 1, 28, 28))
    monkeypatch.setattr(first_block, "AVAILABLE", False)
    assert not first_block.fusable(Conv4(1, 8, 28, "batch").blocks[0], x)
    monkeypatch.setattr(first_block, "AVAILABLE", True)
    asked = []

    def fake_njit(**options):
        asked.append(options.get("cache", False))
        if options.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return lambda fn: ("compiled", fn)

    monkeypatch.setattr(first_block, "njit", fake_njit)
    kernel = first_block._jit(len)
    assert kernel == ("compiled", len) and asked == [True, False]
