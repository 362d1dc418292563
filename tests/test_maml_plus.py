"""Proto-MAML, the MAML++ options (learned per-step inner rates, multi-step loss, derivative-order
annealing) and the strided conv4: each changes what it claims, and every execution of the inner
loop gives the same loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import build_algorithm
from metalab.algorithms.maml import MAML
from metalab.algorithms.protomaml import ProtoMAML
from metalab.data import EpisodeSampler
from metalab.errors import ConfigError
from metalab.models import build_backbone


def _batch(omniglot, tasks=3, ways=5, shots=1, dtype=torch.float64):
    batch = EpisodeSampler(omniglot, ways=ways, shots=shots, queries=3, tasks=tasks, seed=1).sample(0)
    batch.support_x, batch.query_x = batch.support_x.to(dtype), batch.query_x.to(dtype)
    return batch


def _grads(algorithm, batch, executions):
    out = {}
    for execution in executions:
        algorithm.execution = execution
        algorithm.zero_grad()
        loss, _ = algorithm.meta_loss(algorithm.params(), batch)
        loss.backward()
        algorithm.drop_invariant_grads()
        out[execution] = (loss.detach(), {k: p.grad.clone() for k, p in algorithm.named_parameters() if p.grad is not None})
    return out


def _assert_same(grads, atol=1e-9):
    (ref_loss, ref), *others = grads.values()
    for loss, g in others:
        assert torch.allclose(ref_loss, loss, atol=atol)
        assert g.keys() == ref.keys() and len(g) >= 8
        for k in g:
            assert torch.allclose(g[k], ref[k], atol=atol, rtol=1e-6), k


@pytest.mark.parametrize("first_order", [False, True])
def test_protomaml_loop_and_vmap_agree_on_loss_and_gradients(omniglot, first_order):
    """vmap takes torch.func's partial derivatives by construction; the loop's autograd.grad must
    too, although the head's start is a function of the backbone weights."""
    torch.manual_seed(0)
    algo = ProtoMAML(build_backbone("conv4", (1, 28, 28), hidden=8, norm="task-batch"), inner_lr=0.3, inner_steps=2,
                     first_order=first_order).double()
    grads = _grads(algo, _batch(omniglot), ("loop", "vmap"))
    _assert_same(grads)
    # fo-Proto-MAML still trains the backbone through the prototypes; second order differs from it
    assert all(g.abs().sum() > 0 for g in grads["loop"][1].values())


def test_protomaml_second_order_differs_from_first_and_starts_as_protonet(omniglot):
    torch.manual_seed(0)
    algo = ProtoMAML(build_backbone("conv4", (1, 28, 28), hidden=8, norm="task-batch"), inner_steps=1).double()
    batch = _batch(omniglot)
    g = {}
    for fo in (False, True):
        algo.first_order = fo
        g[fo] = _grads(algo, batch, ("loop",))["loop"][1]["backbone.blocks.0.0.weight"]
    assert not torch.allclose(g[False], g[True], atol=1e-8)
    # the starting head ranks the classes by distance to the support prototypes (ProtoNet)
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    start = algo.task_init(algo.params(), 5, sx, sy)
    from metalab.algorithms.maml import MAML as _M
    n = len(sx)
    z = algo.with_support_stats({k: v for k, v in start.items() if k.startswith("backbone.")} | {
        "head.weight": torch.eye(algo.backbone.out_dim, dtype=torch.float64),
        "head.bias": torch.zeros(algo.backbone.out_dim, dtype=torch.float64)}, sx, torch.cat([sx, qx]))
    zs, zq = z[:n], z[n:]
    protos = torch.stack([zs[sy == c].mean(0) for c in range(5)])
    logits = zq @ start["head.weight"].T + start["head.bias"]
    assert torch.equal(logits.argmax(-1), torch.cdist(zq, protos).argmin(-1))
    assert not any(k.startswith("head_") for k, _ in algo.named_parameters())  # no head of its own
    assert isinstance(algo, _M)


def test_protomaml_adapts_to_any_number_of_ways_and_refuses_grouped(omniglot):
    algo = build_algorithm("protomaml", build_backbone("conv4", (1, 28, 28), hidden=8, norm="task-batch"),
                           {"test_inner_steps": 2})
    for ways in (3, 20):
        b = _batch(omniglot, tasks=1, ways=ways, dtype=torch.float32)
        assert algo.adapt(algo.params(), b.support_x[0], b.support_y[0], ways).logits(b.query_x[0]).shape == (3 * ways, ways)
    with pytest.raises(ConfigError, match="Proto-MAML runs with execution 'loop' or 'vmap'"):
        ProtoMAML(build_backbone("conv4", (1, 28, 28), hidden=8, norm="task-batch"), execution="grouped")


def test_learned_step_sizes_are_per_tensor_and_step_move_in_training_and_keep_gradients_equal(omniglot):
    torch.manual_seed(0)
    maml = MAML(build_backbone("conv4", (1, 28, 28), hidden=8, norm="task-batch"), inner_lr=0.4, inner_steps=2,
                learned_step_sizes=True).double()
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    assert len(maml.step_sizes) == len(maml.fast_keys()) and all(p.shape == (2,) for p in maml.step_sizes)
    with torch.no_grad():  # distinct rates per step, so using the wrong one would show
        for p in maml.step_sizes:
            p.copy_(torch.tensor([0.4, 0.1]))
    grads = _grads(maml, _batch(omniglot), ("loop", "vmap", "grouped"))
    _assert_same(grads)
    # every rate gets a gradient except those of biases a norm cancels (their inner gradient is
    # round-off, dropped like the biases' own)
    rated = dict(zip(maml.fast_keys(), (f"step_sizes.{i}" for i in range(len(maml.step_sizes)))))
    moved = {k for k, name in rated.items() if name in grads["loop"][1] and grads["loop"][1][name].abs().sum() > 0}
    cancelled = {f"backbone.blocks.{i}.0.bias" for i in range(4)}
    assert moved == set(rated) - cancelled
    before = {k: maml.get_parameter(name).detach().clone() for k, name in rated.items()}
    torch.optim.Adam(maml.parameters(), lr=1e-2).step()
    assert {k for k, name in rated.items() if not torch.equal(before[k], maml.get_parameter(name))} == moved
    # a step past inner_steps (at test) takes the last step's learned rates
    assert maml.inner_lrs(maml.params(), 5)["head.weight"] is not None
    assert torch.equal(maml.inner_lrs(maml.params(), 5)["head.weight"], maml.inner_lrs(maml.params(), 1)["head.weight"])


def test_multi_step_loss_weights_anneal_over_training_and_keep_gradients_equal(omniglot):
    torch.manual_seed(0)
    maml = MAML(build_backbone("conv4", (1, 28, 28), hidden=8, norm="task-batch"), inner_lr=0.4, inner_steps=3,
                multi_step_loss_until=0.5).double()
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    maml.training_progress = 0.0
    assert maml.step_loss_weights(3) == pytest.approx([1 / 3] * 3)
    maml.training_progress = 0.25
    middle = maml.step_loss_weights(3)
    maml.training_progress = 0.5
    late = maml.step_loss_weights(3)
    maml.training_progress = 0.9
    assert maml.step_loss_weights(3) == late  # annealed by 0.5 of training, then held
    assert late == pytest.approx([0.01, 0.01, 0.98]) and middle[0] < 1 / 3 < middle[2] < late[2]
    assert all(sum(w) == pytest.approx(1.0) for w in (middle, late))
    maml.training_progress = 0.0
    batch = _batch(omniglot)
    grads = _grads(maml, batch, ("loop", "vmap", "grouped"))
    _assert_same(grads)
    maml.multi_step_loss_until = 0.0  # off: the last step's loss only
    assert maml.step_loss_weights(3) == [0.0, 0.0, 1.0]
    plain = _grads(maml, batch, ("loop",))["loop"]
    assert not torch.allclose(plain[0], grads["loop"][0])


def test_first_order_until_trains_first_order_then_second_order(omniglot):
    torch.manual_seed(0)
    backbone = build_backbone("conv4", (1, 28, 28), hidden=8, norm="task-batch")
    maml = MAML(backbone, inner_lr=0.4, inner_steps=1, first_order_until=0.3).double()
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    batch = _batch(omniglot)
    key = "backbone.blocks.0.0.weight"
    seen = {}
    for progress in (0.1, 0.5):
        maml.training_progress = progress
        seen[progress] = _grads(maml, batch, ("loop", "vmap"))
        _assert_same(seen[progress])
    reference = {}
    for fo in (True, False):
        maml.first_order, maml.first_order_until = fo, 0.0
        reference[fo] = _grads(maml, batch, ("loop",))["loop"][1][key]
    assert torch.allclose(seen[0.1]["loop"][1][key], reference[True], atol=1e-12)
    assert torch.allclose(seen[0.5]["loop"][1][key], reference[False], atol=1e-12)
    with pytest.raises(ConfigError, match="first_order_until=2 is invalid"):
        MAML(backbone, first_order_until=2)


def test_the_trainer_hands_training_progress_to_the_algorithm(clusters, tmp_path):
    from helpers import cluster_config, train_on

    trainer = train_on(clusters, cluster_config("maml", steps=8, algo_options={"multi_step_loss_until": 0.5,
                                                                             "inner_steps": 2}), tmp_path / "run")
    seen = []
    original = trainer.algorithm.meta_backward

    def spy(params, batch):
        seen.append(trainer.algorithm.training_progress)
        return original(params, batch)

    trainer.algorithm.meta_backward = spy
    trainer.train()
    assert seen == pytest.approx([i / 8 for i in range(8)])
    assert trainer.algorithm.training_progress == 1.0  # evaluation sees the end-of-training behaviour


def test_strided_conv4_is_the_maml_papers_network(omniglot):
    strided = build_backbone("conv4-strided", (1, 28, 28), hidden=64, norm="task-batch")
    pooled = build_backbone("conv4", (1, 28, 28), hidden=64, norm="task-batch")
    assert sum(p.numel() for p in strided.parameters()) == sum(p.numel() for p in pooled.parameters())
    assert strided.out_dim == 64 and strided(torch.rand(2, 1, 28, 28)).shape == (2, 64)
    macs, side, channels = 0, 28, 1
    for block in strided.blocks:
        side = (side + 1) // 2
        macs += side * side * 9 * channels * 64
        channels = 64
    assert round(macs / 1e6, 2) == 2.66  # multiply-adds per 28×28 image (conv4: 9.82 M)
    torch.manual_seed(0)
    maml = MAML(build_backbone("conv4-strided", (1, 28, 28), hidden=8, norm="task-batch"), inner_steps=2).double()
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    _assert_same(_grads(maml, _batch(omniglot), ("loop", "vmap", "grouped")))


def test_spatial_conv4_keeps_the_last_blocks_positions_at_conv4s_cost(omniglot):
    """conv4-spatial is conv4 without the last max-pool: the same weights give 576 features whose
    per-position maxima are conv4's 64, and every execution of MAML's inner loop agrees on it."""
    torch.manual_seed(0)
    spatial = build_backbone("conv4-spatial", (1, 28, 28), hidden=64, norm="batch").eval()
    pooled = build_backbone("conv4", (1, 28, 28), hidden=64, norm="batch").eval()
    pooled.load_state_dict(spatial.state_dict())  # the same parameters, name for name
    x = torch.rand(3, 1, 28, 28)
    assert spatial.out_dim == 576 and spatial(x).shape == (3, 576)
    per_position = spatial(x).view(3, 64, 3, 3)
    assert torch.allclose(per_position[..., :2, :2].amax((2, 3)), pooled(x), atol=1e-6)  # pooling drops the 3rd row/column
    maml = MAML(build_backbone("conv4-spatial", (1, 28, 28), hidden=8, norm="task-batch"), inner_steps=2).double()
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    _assert_same(_grads(maml, _batch(omniglot), ("loop", "vmap", "grouped")))


def test_init_from_starts_the_backbone_from_another_runs_weights(clusters, tmp_path):
    from helpers import cluster_config, train_on

    source = train_on(clusters, cluster_config("protonet", steps=5), tmp_path / "protonet")
    source.train()
    cfg = cluster_config("maml", steps=1, algo_options={"inner_steps": 1})
    cfg.train.init_from = str(tmp_path / "protonet")
    lines = []
    from metalab.engine import MetaTrainer
    from helpers import cluster_splits

    trainer = MetaTrainer(cfg, tmp_path / "maml", splits=cluster_splits(clusters), show_progress=False, log=lines.append)
    theirs = dict(source.algorithm.backbone.named_parameters())
    for name, p in trainer.algorithm.backbone.named_parameters():
        assert torch.equal(p, theirs[name]), name
    assert any("backbone initialised from" in line and "protonet, step 5" in line for line in lines)
    fresh = MetaTrainer(cluster_config("maml", steps=1), tmp_path / "fresh", splits=cluster_splits(clusters),
                        show_progress=False, log=lambda m: None)
    assert not torch.equal(fresh.algorithm.backbone.net[0].weight, theirs["net.0.weight"])
    wide = cluster_config("maml", steps=1, hidden=8)
    wide.train.init_from = str(tmp_path / "protonet")
    with pytest.raises(ConfigError, match=r"train.init_from='.*protonet' has a 'mlp' backbone \(hidden 16\) that does "
                                          r"not fit this run's 'mlp' \(hidden 8\)"):
        MetaTrainer(wide, tmp_path / "wide", splits=cluster_splits(clusters), show_progress=False, log=lambda m: None)


def test_protonet_test_feature_norm_scores_by_cosine_at_evaluation_only():
    from metalab.algorithms.protonet import ProtoNet

    torch.manual_seed(0)
    net = ProtoNet(build_backbone("mlp", (6,), hidden=4, norm="batch"), test_feature_norm="centre-l2")
    sz, qz = torch.randn(1, 6, 5) * 3 + 2, torch.randn(1, 4, 5) * 3 + 2
    sy = torch.tensor([[0, 0, 1, 1, 2, 2]])
    net.train()
    with torch.enable_grad():  # training: squared Euclidean, as always
        trained = net.classify_features(sz, sy, qz, 3)
    from metalab.algorithms.protonet import neg_sq_distance, prototypes

    assert torch.allclose(trained, neg_sq_distance(qz, prototypes(sz, sy, 3)))
    net.eval()
    centred_s, centred_q = sz - sz.mean(1, keepdim=True), qz - sz.mean(1, keepdim=True)
    expected = F.cosine_similarity(F.normalize(centred_q, dim=-1)[:, :, None],
                                   prototypes(F.normalize(centred_s, dim=-1), sy, 3)[:, None], dim=-1)
    assert torch.allclose(net.classify_features(sz, sy, qz, 3), 10 * expected, atol=1e-5)
    with pytest.raises(ConfigError, match="test_feature_norm='zca' is unknown"):
        ProtoNet(build_backbone("mlp", (6,), hidden=4), test_feature_norm="zca")
