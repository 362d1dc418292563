"""bfloat16 mixed-precision training (``train.precision: bf16``)."""

import pytest
import torch
from torch.func import functional_call

from metalab.algorithms.base import sub_params
from metalab.data import EpisodeSampler
from metalab.engine import RunConfig
from metalab.engine.precision import training_precision
from metalab.engine.trainer import build_model
from metalab.errors import ConfigError

from helpers import cluster_config, test_accuracy as accuracy_on_test, train_on

CPU = torch.device("cpu")


@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_bf16_step_computes_in_bfloat16_and_stays_close_to_fp32(algo, omniglot):
    batch = EpisodeSampler(omniglot, ways=5, shots=1, queries=3, tasks=2, seed=1).sample(0)
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = RunConfig.from_dict({"train": {"algo": algo, "hidden": 16, "device": "cpu", "precision": precision}})
        model = build_model(cfg, (1, 28, 28), CPU, {"task": "classification"})  # seeded: same weights
        with training_precision(precision, CPU):
            loss, _ = model.meta_backward(model.params(), batch)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(g.dtype == torch.float32 for g in grads), "weights' gradients must stay float32"
        out[precision] = (loss.float(), torch.cat([g.flatten() for g in grads]))
    (loss32, g32), (loss16, g16) = out["fp32"], out["bf16"]
    assert not torch.equal(g32, g16), "bf16 gave bit-identical gradients: autocast did not run"
    assert abs(loss16 - loss32) < 0.02 * loss32
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.98


def test_trainer_applies_the_configured_precision(clusters, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = train_on(clusters, cluster_config("protonet", steps=3, log_every=1, precision=precision), tmp_path / precision)
        trainer.train()
        losses[precision] = [row["loss"] for row in trainer.run.metrics() if "loss" in row]
    assert len(losses["bf16"]) == 3
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


@pytest.mark.parametrize("algo,options,lr", [("protonet", {}, 1e-2),
                                             ("maml", {"inner_lr": 0.5, "inner_steps": 1, "test_inner_steps": 5}, 3e-3)])
def test_bf16_training_learns_unseen_classes(algo, options, lr, clusters, tmp_path):
    trainer = train_on(clusters, cluster_config(algo, steps=150, algo_options=options, lr=lr, precision="bf16"), tmp_path / algo)
    before = accuracy_on_test(trainer)
    trainer.train()
    after = accuracy_on_test(trainer)
    assert after > 0.2 + 0.35, f"{algo} in bf16: {after:.3f} is too close to chance"
    assert after > before + 0.15


def test_unknown_precision_and_meta_rl_precision_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"train.precision='fp16' is unknown; use 'fp32' or 'bf16'"):
        RunConfig.from_dict({"train": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match=r"meta-RL runs in fp32"):
        RunConfig.from_dict({"train": {"algo": "maml-rl", "precision": "bf16"}, "rl": {"task": "bandit"}})


def test_bf16_without_native_support_is_announced(monkeypatch):
    from metalab.engine import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    note = precision.precision_note("bf16", CPU)
    assert note is not None and "train.precision='bf16'" in note and "slower" in note
    assert precision.precision_note("fp32", CPU) is None


def test_maml_support_inner_loop_stays_fp32_under_bf16(omniglot):
    batch = EpisodeSampler(omniglot, ways=5, shots=1, queries=3, tasks=1, seed=1).sample(0)
    cfg = RunConfig.from_dict({"train": {"algo": "maml", "hidden": 16, "device": "cpu", "precision": "bf16"}})
    model = build_model(cfg, (1, 28, 28), CPU, {"task": "classification"})
    args = (model.params(), batch.support_x[0], batch.support_y[0], 5, 2, False)
    plain = model.inner_loop(*args)
    with training_precision("bf16", CPU):
        mixed = model.inner_loop(*args)
        query_features = functional_call(model.backbone, sub_params(mixed, "backbone."), (batch.query_x[0],))
    assert all(torch.equal(plain[k], mixed[k]) for k in plain), "the support-set inner loop must run in fp32"
    assert query_features.dtype == torch.bfloat16, "the query pass should run in bfloat16"


@pytest.mark.parametrize("memory_format,channels_last", [("auto", True), ("channels_last", True), ("contiguous", False)])
def test_memory_format_sets_the_backbone_layout_on_cpu(omniglot, memory_format, channels_last):
    batch = EpisodeSampler(omniglot, ways=5, shots=1, queries=3, tasks=2, seed=3).sample(0)
    cfg = RunConfig.from_dict({"train": {"algo": "maml", "hidden": 16, "device": "cpu", "memory_format": memory_format}})
    model = build_model(cfg, (1, 28, 28), CPU, {"task": "classification"})
    outputs = []
    for block in model.backbone.blocks:
        block[0].register_forward_hook(lambda m, a, out: outputs.append(out))
    model.meta_backward(model.params(), batch)
    # block 0's conv module is not called (it runs folded with its norm): blocks 1-3 report
    assert len(outputs) >= 6
    assert all(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous() for o in outputs) == channels_last
    assert all(o.is_contiguous() for o in outputs) == (not channels_last)


def test_unknown_memory_format_is_named():
    with pytest.raises(ConfigError, match="train.memory_format='nhwc' is unknown; use one of: auto, channels_last, contiguous"):
        RunConfig.from_dict({"train": {"memory_format": "nhwc"}})
