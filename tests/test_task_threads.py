"""Per-task training loops on several CPU threads (metalab.algorithms.task_threads)."""

import contextvars

import pytest
import torch

from metalab.algorithms.task_threads import map_tasks, module_for_thread, resolve_task_threads, supports_task_threads
from metalab.data import EpisodeSampler
from metalab.engine import RunConfig
from metalab.engine.trainer import build_model
from metalab.errors import ConfigError
from metalab.models import build_backbone

OPTIONS = {"maml": {"inner_lr": 0.4, "inner_steps": 2}, "fomaml": {"inner_lr": 0.4, "inner_steps": 1},
           "metasgd": {"inner_lr": 0.4, "inner_steps": 1}, "anil": {"inner_lr": 0.5, "inner_steps": 2},
           "protonet": {}, "r2d2": {}}


def _model(algo, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = RunConfig.from_dict({"train": {"algo": algo, "algo_options": OPTIONS[algo], "hidden": 16, "device": "cpu"}})
    model = build_model(cfg, (1, 28, 28), torch.device("cpu"), {"task": "classification"}).to(dtype)
    for name, p in model.named_parameters():  # MAML-family heads start at zero: give every path a gradient
        if "head" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _batch(omniglot, dtype=torch.float32, noise=0.0, tasks=5):
    batch = EpisodeSampler(omniglot, 5, 1, 3, tasks, seed=3).sample(0)
    g = torch.Generator().manual_seed(0)
    for name in ("support_x", "query_x"):
        x = getattr(batch, name).to(dtype)
        setattr(batch, name, x + noise * torch.randn(x.shape, generator=g, dtype=dtype))
    return batch


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("algo", sorted(OPTIONS))
def test_threaded_per_task_loop_gives_the_gradients_of_meta_loss(algo, omniglot):
    """float64, 2 worker threads against the whole-batch loss: same loss, gradients and running
    statistics. (Noise on the binary images: no exact max-pool ties, whose winner could depend
    on the kernels' thread count.)"""
    model = _model(algo, torch.float64)
    batch = _batch(omniglot, torch.float64, noise=1e-3)
    model.task_threads = 2
    assert model.task_workers(batch, buffers_passed=algo in ("protonet", "anil", "r2d2")) == 2
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    loss_threads, _ = model.meta_backward(model.params(), batch)
    threaded, stats_threaded = _grads(model), {k: v.clone() for k, v in model.named_buffers()}
    for k, v in model.named_buffers():
        v.copy_(buffers[k])
    model.zero_grad(set_to_none=True)
    model.task_threads = 1
    loss_loop, _ = model.meta_backward(model.params(), batch)  # the per-task loop, one task after another
    looped = _grads(model)
    model.zero_grad(set_to_none=True)
    for k, v in model.named_buffers():
        v.copy_(buffers[k])
    loss, _ = model.meta_loss(model.params(), batch)
    loss.backward()
    model.drop_invariant_grads()
    whole = _grads(model)
    assert abs(loss_threads.item() - loss.item()) < 1e-10 and abs(loss_loop.item() - loss.item()) < 1e-10
    assert threaded.keys() == whole.keys() == looped.keys() and len(whole) >= 8
    for k in whole:
        assert torch.allclose(threaded[k], whole[k], atol=1e-10), k
        assert torch.allclose(threaded[k], looped[k], atol=1e-10), k
    for k, v in stats_threaded.items():
        if v.is_floating_point():
            assert torch.allclose(v, dict(model.named_buffers())[k], atol=1e-12), k


@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_threaded_loop_is_deterministic_and_equals_a_one_thread_loop(algo, omniglot):
    """float32 on the raw Omniglot images: two threaded runs agree bit for bit, and match the loop
    run with one intra-op thread (the same kernels) up to the order of the gradient sums."""
    model = _model(algo)
    batch = _batch(omniglot, tasks=6)
    runs = []
    for threads in (2, 2, 1):
        model.zero_grad(set_to_none=True)
        model.task_threads = threads
        previous = torch.get_num_threads()
        torch.set_num_threads(1 if threads == 1 else previous)
        try:
            loss, _ = model.meta_backward(model.params(), batch)
        finally:
            torch.set_num_threads(previous)
        assert torch.get_num_threads() == previous  # the workers' setting does not leak out
        runs.append((loss, _grads(model)))
    (l1, g1), (l2, g2), (l3, g3) = runs
    assert float(l1) == float(l2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert abs(float(l1) - float(l3)) < 1e-6 and g1.keys() == g3.keys()
    for k in g1:
        assert torch.allclose(g1[k], g3[k], atol=1e-6, rtol=1e-5), k


def test_workers_get_replicas_autocast_and_context():
    module = build_backbone("mlp", (8,))
    marker = contextvars.ContextVar("marker", default="unset")
    marker.set("caller")

    def share(indices):
        replica = module_for_thread(module)
        return (indices, replica is not module, replica.net[0].weight is module.net[0].weight,
                torch.is_autocast_enabled("cpu"), marker.get(), torch.get_num_threads())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        shares = map_tasks(share, 5, 2, [module])
    assert [s[0] for s in shares] == [[0, 2, 4], [1, 3]]
    for _, own_replica, shares_weights, autocast, mark, threads in shares:
        assert own_replica and shares_weights and autocast and mark == "caller" and threads == 1
    assert module_for_thread(module) is module
    assert map_tasks(lambda idx: idx, 3, 1, [module]) == [[0, 1, 2]]


def test_thread_count_resolution_and_unsupported_backbones():
    torch_threads = torch.get_num_threads()
    assert resolve_task_threads("auto", torch.device("cpu"), 32) == torch_threads
    assert resolve_task_threads("auto", torch.device("cuda"), 32) == 1  # GPUs batch tasks instead
    assert resolve_task_threads(4, torch.device("cpu"), 3) == 3
    backbone = build_backbone("conv4", (1, 28, 28), hidden=8, norm="batch")
    assert supports_task_threads(backbone, buffers_passed=True)
    assert not supports_task_threads(backbone, buffers_passed=False)  # running statistics updated in place
    cfg = {"train": {"algo": "protonet", "backbone": "mlp", "hidden": 8, "device": "cpu"}}
    mlp_model = build_model(RunConfig.from_dict(cfg), (32,), torch.device("cpu"), {"task": "classification"})
    batch = type("Batch", (), {"support_x": torch.zeros(8, 5, 32), "tasks": 8})()
    assert mlp_model.task_workers(batch, buffers_passed=True) == 1  # auto: MLP tasks are too small
    mlp_model.task_threads = 2
    assert mlp_model.task_workers(batch, buffers_passed=True) == min(2, 8)  # asked for explicitly
    with_dropout = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
    assert not supports_task_threads(with_dropout, buffers_passed=True)  # random numbers: not deterministic


@pytest.mark.parametrize("value", [0, -1, "two", 1.5, True])
def test_bad_task_threads_setting_is_named(value):
    with pytest.raises(ConfigError, match="train.task_threads"):
        RunConfig.from_dict({"train": {"task_threads": value}})
