import copy
import math
import re

import pytest
import torch

from metalab.algorithms import ALGORITHMS, build_algorithm
from metalab.algorithms.maml import MAML
from metalab.data import EpisodeSampler
from metalab.errors import ConfigError
from metalab.models import build_backbone

from helpers import cluster_config, test_accuracy as accuracy_on_test, train_on

CHANCE_5WAY = 0.2


@pytest.mark.parametrize("algo,options", [
    ("protonet", {"lr": 1e-2}),
    ("maml", {"inner_lr": 0.5, "inner_steps": 1, "test_inner_steps": 5}),
    ("fomaml", {"inner_lr": 0.5, "inner_steps": 1, "test_inner_steps": 5}),
    ("reptile", {"inner_lr": 0.1, "inner_steps": 5, "test_inner_steps": 10, "lr": 1e-2}),
    ("metasgd", {"inner_lr": 0.5, "inner_steps": 1, "test_inner_steps": 5}),
    ("protomaml", {"inner_lr": 0.1, "inner_steps": 1, "test_inner_steps": 3, "lr": 1e-2}),
    ("anil", {"inner_lr": 0.5, "inner_steps": 5, "test_inner_steps": 10, "lr": 1e-2}),
    ("matchingnet", {"lr": 1e-2}),
    ("r2d2", {"lr": 1e-2}),
    ("baseline", {"lr": 1e-2}),
    ("baseline++", {"lr": 1e-2}),
    ("multitask", {"lr": 1e-2}),
])
def test_learner_beats_chance_and_its_untrained_self_on_unseen_classes(algo, options, clusters, tmp_path):
    options = dict(options)
    train = {"lr": options.pop("lr")} if "lr" in options else {}
    trainer = train_on(clusters, cluster_config(algo, steps=150, algo_options=options, **train), tmp_path / algo)
    before = accuracy_on_test(trainer)
    trainer.train()
    after = accuracy_on_test(trainer)
    assert after > CHANCE_5WAY + 0.35, f"{algo}: {after:.3f} is too close to chance"
    assert after > before + 0.15, f"{algo}: trained {after:.3f} vs untrained {before:.3f}"


def _conv_batch(omniglot, tasks=3, ways=5):
    sampler = EpisodeSampler(omniglot, ways=ways, shots=1, queries=3, tasks=tasks, seed=1)
    return sampler.sample(0)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_maml_loop_and_vmap_agree_on_loss_and_gradients(omniglot, first_order, dtype, atol):
    torch.manual_seed(0)
    backbone = build_backbone("conv4", (1, 28, 28), hidden=16, norm="task-batch")
    maml = MAML(backbone, inner_lr=0.4, inner_steps=2, first_order=first_order).to(dtype)
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    batch = _conv_batch(omniglot)
    batch.support_x, batch.query_x = batch.support_x.to(dtype), batch.query_x.to(dtype)
    grads = {}
    for execution in ("loop", "vmap"):
        maml.execution = execution
        maml.zero_grad()
        loss, _ = maml.meta_loss(maml.params(), batch)
        loss.backward()
        if execution == "loop":
            # the loop folds the first conv + norm into one conv (vmap runs them as two layers),
            # so the first conv's bias, which the norm cancels, gets an exact zero gradient
            assert maml.backbone.blocks[0][0].bias.grad.abs().max() == 0
        maml.drop_invariant_grads()  # what reaches the optimiser: round-off of invariant weights dropped
        grads[execution] = (loss.detach(), {k: p.grad.clone() for k, p in maml.named_parameters() if p.grad is not None})
    (l1, g1), (l2, g2) = grads["loop"], grads["vmap"]
    assert torch.allclose(l1, l2, atol=atol)
    assert g1.keys() == g2.keys() and len(g1) >= 10
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=atol, rtol=1e-4), k


def test_second_order_gradients_differ_from_first_order(omniglot):
    torch.manual_seed(0)
    backbone = build_backbone("conv4", (1, 28, 28), hidden=16, norm="task-batch")
    maml = MAML(backbone, inner_lr=0.4, inner_steps=1)
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    batch = _conv_batch(omniglot)
    out = []
    for fo in (False, True):
        maml.first_order = fo
        maml.zero_grad()
        maml.meta_loss(maml.params(), batch)[0].backward()
        out.append(maml.backbone.blocks[0][0].weight.grad.clone())
    assert not torch.allclose(out[0], out[1], atol=1e-6)


def test_maml_head_adapts_to_any_number_of_ways(omniglot):
    backbone = build_backbone("conv4", (1, 28, 28), hidden=16, norm="task-batch")
    maml = MAML(backbone, test_inner_steps=2)
    for ways in (3, 20):
        b = _conv_batch(omniglot, tasks=1, ways=ways)
        predictor = maml.adapt(maml.params(), b.support_x[0], b.support_y[0], ways)
        assert predictor.logits(b.query_x[0]).shape == (3 * ways, ways)


@pytest.mark.parametrize("algo", ["protonet", "maml", "r2d2", "baseline"])
def test_adapt_takes_images_as_sources_store_them_and_checks_labels(omniglot, algo):
    """uint8 0–255 (a source's x) and float [0, 1] (the sampler's) are the same images to a learner;
    labels outside 0..ways-1 or one short get a clear error, not an IndexError from the loss."""
    torch.manual_seed(0)
    backbone = build_backbone("conv4", (1, 28, 28), hidden=16, norm="task-batch")
    alg = (build_algorithm(algo, backbone, {"test_inner_steps": 2} if algo == "maml" else {}) if algo != "baseline"
           else ALGORITHMS["baseline"].build(backbone, {"num_classes": 10}))
    picks = torch.cat([torch.nonzero(omniglot.y == c)[:2, 0] for c in range(4)])
    raw = omniglot.x[picks]  # uint8 [8, 1, 28, 28]
    support, query = raw[0::2], raw[1::2]
    as_float = alg.adapt(alg.params(), support.float() / 255, torch.arange(4), 4).logits(query.float() / 255)
    as_stored = alg.adapt(alg.params(), support, torch.arange(4), 4).logits(query)
    assert raw.dtype == torch.uint8 and torch.allclose(as_stored, as_float, atol=1e-5)
    from metalab.errors import DataError

    with pytest.raises(DataError, match=r"adapt\(\) got labels 0..9 for a 4-way task; number the classes 0..3"):
        alg.adapt(alg.params(), support, torch.tensor([0, 1, 2, 9]), 4)
    with pytest.raises(DataError, match="got 4 support examples but 3 labels"):
        alg.adapt(alg.params(), support, torch.arange(3), 4)


@pytest.mark.parametrize("algo,options,says", [
    ("maml", {"inner_lr": -1}, "train.algo_options.inner_lr=-1 is invalid; give a positive number"),
    ("anil", {"inner_steps": "two"}, "train.algo_options.inner_steps='two' is invalid; give a whole number of at least 1"),
    ("baseline", {"finetune_lr": 0}, "train.algo_options.finetune_lr=0 is invalid"),
    ("r2d2", {"lam": 0}, "train.algo_options.lam=0 is invalid"),  # log(0) would be the error otherwise
    ("fomaml", {"checkpoint_inner": "yes"}, "train.algo_options.checkpoint_inner='yes' is invalid; give true or false"),
])
def test_algorithm_options_of_the_wrong_kind_are_named(algo, options, says):
    backbone = build_backbone("mlp", (8,), hidden=8)
    with pytest.raises(ConfigError, match=re.escape(says)):
        build_algorithm(algo, backbone, options, {"num_classes": 4, "class_domains": [0] * 4})


def test_maml_per_class_head_is_a_linear_layer_for_its_ways_only(omniglot):
    torch.manual_seed(0)
    backbone = build_backbone("conv4", (1, 28, 28), hidden=16, norm="task-batch")
    maml = build_algorithm("maml", backbone, {"head": "per-class", "head_ways": 5, "test_inner_steps": 2})
    assert maml.head_weight.shape == (5, 16) and maml.head_weight.abs().min() > 0  # Linear(16, 5)'s random start
    assert maml.invariant_params == ()  # each row has its own gradient: nothing is dropped
    b = _conv_batch(omniglot, tasks=2)
    maml.meta_backward(maml.params(), b)
    assert maml.head_weight.grad.abs().min() > 0 and maml.head_bias.grad.abs().max() > 0
    wide = _conv_batch(omniglot, tasks=1, ways=20)
    with pytest.raises(ConfigError, match="5-class head.*not 20-way"):
        maml.adapt(maml.params(), wide.support_x[0], wide.support_y[0], 20)
    with pytest.raises(ConfigError, match="head='rows' is unknown"):
        build_algorithm("maml", backbone, {"head": "rows"})
    with pytest.raises(ConfigError, match="do not apply to algorithm 'reptile'"):
        build_algorithm("reptile", backbone, {"head": "per-class"})


def test_a_per_class_maml_head_with_other_ways_is_refused_before_training():
    from metalab.engine import RunConfig

    def config(**sections):
        train = {"algo": "maml", "algo_options": {"head": "per-class"}, **sections.pop("train", {})}
        return RunConfig.from_dict({"train": train, **sections})

    with pytest.raises(ConfigError, match=r"eval.settings \[\[20, 1\], \[20, 5\]\] have other than 5 ways"):
        config()  # the default evaluation protocol includes 20-way tasks
    with pytest.raises(ConfigError, match="train.ways=\\[3, 7\\] does not fit"):
        config(train={"ways": [3, 7]}, eval={"settings": [[5, 1]]})
    config(eval={"settings": [[5, 1], [5, 5]]})
    RunConfig.from_dict({"train": {"algo": "maml", "algo_options": {"head": "per-class", "head_ways": 20}, "ways": 20},
                         "eval": {"settings": [[20, 1]]}})


def test_maml_per_class_head_is_the_reference_maml_from_the_same_start(omniglot):
    """The premise of benchmarks/maml_accuracy.py --head per-class: from one seed metalab's MAML
    and the learn2learn-style reference start from the same weights and give one meta-batch the
    same second-order gradients (up to the round-off of conv biases before a norm, which
    metalab drops)."""
    from benchmarks import reference_l2l as ref

    batch = _conv_batch(omniglot, tasks=1)
    torch.manual_seed(3)
    backbone = build_backbone("conv4", (1, 28, 28), hidden=16, norm="task-batch")
    maml = build_algorithm("maml", backbone, {"head": "per-class", "inner_lr": 0.4})
    torch.manual_seed(3)
    reference = ref.ReferenceMAML(ref.omniglot_cnn(5, hidden=16), lr=0.4)
    ours = [p for n, p in maml.named_parameters() if n.startswith("backbone.")] + [maml.head_weight, maml.head_bias]
    theirs = list(reference.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)) and len(ours) == len(theirs) == 18
    maml.meta_backward(maml.params(), batch)
    ref.meta_step(reference, torch.optim.SGD(reference.parameters(), lr=0.0), batch)
    dropped, largest = 0, max(b.grad.abs().max() for b in theirs)
    for (name, a), b in zip([(n, p) for n, p in maml.named_parameters() if n.startswith("backbone.")] +
                            [("head_weight", maml.head_weight), ("head_bias", maml.head_bias)], theirs):
        if a.grad is None:  # a conv bias before a norm: the loss does not depend on it
            dropped += 1
            assert name.endswith("0.bias") and b.grad.abs().max() < 1e-4 * largest
            continue
        assert b.grad.abs().max() > 0 and (a.grad - b.grad).norm() < 1e-4 * b.grad.norm(), name  # float32 round-off
    assert dropped == 4


def test_predictor_agrees_with_batched_features_path(omniglot):
    proto = build_algorithm("protonet", build_backbone("conv4", (1, 28, 28), hidden=16)).eval()
    b = _conv_batch(omniglot, tasks=2)
    params = proto.params()
    with torch.no_grad():
        z_s = proto.encode(params, b.support_x.flatten(0, 1)).view(2, 5, -1)
        z_q = proto.encode(params, b.query_x.flatten(0, 1)).view(2, 15, -1)
        batched = proto.classify_features(z_s, b.support_y, z_q, 5)
    for t in range(2):
        single = proto.adapt(params, b.support_x[t], b.support_y[t], 5).logits(b.query_x[t])
        assert torch.allclose(single, batched[t], atol=1e-4)


def test_unknown_algorithm_and_options_are_named():
    backbone = build_backbone("mlp", (8,))
    with pytest.raises(ConfigError, match=r"Unknown algorithm 'mamll'; choose one of: anil, baseline, baseline\+\+, fomaml"):
        build_algorithm("mamll", backbone)
    with pytest.raises(ConfigError, match=r"\['inner_lr'\] do not apply to algorithm 'protonet'"):
        build_algorithm("protonet", backbone, {"inner_lr": 0.1})
    with pytest.raises(ConfigError, match="backbone 'conv4' needs image examples"):
        build_backbone("conv4", (8,))


def test_metasgd_learns_its_inner_step_sizes(clusters, tmp_path):
    trainer = train_on(clusters, cluster_config("metasgd", steps=30, algo_options={"inner_lr": 0.5}), tmp_path / "m")
    trainer.train()
    lrs = torch.cat([p.flatten() for p in trainer.algorithm.inner_lrs_])
    assert not torch.allclose(lrs, torch.full_like(lrs, 0.5))


@pytest.mark.parametrize("algo", ["baseline", "baseline++", "multitask", "anil", "r2d2", "matchingnet", "reptile", "metasgd"])
def test_every_algorithm_adapts_to_a_new_task_through_the_predictor_api(algo, clusters, tmp_path):
    trainer = train_on(clusters, cluster_config(algo, steps=2), tmp_path / algo)
    alg = trainer.algorithm.eval()
    batch = EpisodeSampler(trainer.splits.test, ways=4, shots=2, queries=3, tasks=1).sample(0)
    predictor = alg.adapt(alg.params(), batch.support_x[0], batch.support_y[0], 4)
    assert predictor.logits(batch.query_x[0]).shape == (12, 4)
    assert predictor.predict(batch.query_x[0]).max() < 4


def test_regression_only_algorithms_refuse_classification():
    with pytest.raises(ConfigError, match="Algorithm 'pretrained' does not do classification; algorithms for classification: anil"):
        build_algorithm("pretrained", build_backbone("mlp", (8,)))
    with pytest.raises(ConfigError, match="Algorithm 'protonet' does not do regression"):
        build_algorithm("protonet", build_backbone("mlp", (8,)), context={"task": "regression"})


@pytest.mark.parametrize("first_order", [False, True])
def test_per_task_backward_gives_the_meta_loss_gradients(omniglot, first_order):
    torch.manual_seed(0)
    maml = MAML(build_backbone("conv4", (1, 28, 28), hidden=16, norm="task-batch"), inner_lr=0.4, inner_steps=2,
                first_order=first_order, execution="loop").double()
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    batch = _conv_batch(omniglot, tasks=4)
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    maml.zero_grad()
    loss, _ = maml.meta_loss(maml.params(), batch)
    loss.backward()
    maml.drop_invariant_grads()  # the shared head row and pre-norm biases: gradient is round-off
    expected = {k: p.grad for k, p in maml.named_parameters()}
    maml.zero_grad()
    loss2, _ = maml.meta_backward(maml.params(), batch)
    assert torch.allclose(loss, loss2, atol=1e-12)
    for k, p in maml.named_parameters():
        if expected[k] is None:
            assert p.grad is None, k
        else:
            assert torch.allclose(p.grad, expected[k], atol=1e-12), k


@pytest.mark.parametrize("algo", ["protonet", "anil"])
def test_feature_head_training_normalises_each_task_by_its_own_statistics(omniglot, algo):
    """In training the backbone runs task by task: each task's features are those of the task
    encoded alone, and the running statistics take one momentum step toward the tasks' mean."""
    import copy

    torch.manual_seed(0)
    algorithm = build_algorithm(algo, build_backbone("conv4", (1, 28, 28), hidden=8, norm="batch"))
    alone = copy.deepcopy(algorithm.backbone)
    batch = _conv_batch(omniglot, tasks=4)
    support_z, query_z = algorithm.encode_episodes(algorithm.params(), batch)
    for t in range(batch.tasks):
        task_x = torch.cat([batch.support_x[t], batch.query_x[t]])
        assert torch.allclose(torch.cat([support_z[t], query_z[t]]), copy.deepcopy(alone)(task_x), atol=1e-5)
    conv, bn = alone.blocks[0][0], algorithm.backbone.blocks[0][1]
    with torch.no_grad():
        first = [conv(torch.cat([batch.support_x[t], batch.query_x[t]])) for t in range(batch.tasks)]
    means = torch.stack([f.mean((0, 2, 3)) for f in first]).mean(0)
    variances = torch.stack([f.var((0, 2, 3)) for f in first]).mean(0)  # unbiased, as BatchNorm keeps
    assert torch.allclose(bn.running_mean, 0.1 * means, atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * variances, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("algo", ["protonet", "protonet:global_loss", "anil", "matchingnet", "r2d2"])
def test_feature_head_per_task_backward_equals_the_meta_loss_gradient(omniglot, algo):
    """meta_backward back-propagates task by task; its loss, gradients and running statistics
    must be those of meta_loss(...).backward() over the whole meta-batch."""
    import copy

    torch.manual_seed(0)
    algo, _, option = algo.partition(":")
    options = {option: 0.5} if option else {}
    per_task = build_algorithm(algo, build_backbone("conv4", (1, 28, 28), hidden=8, norm="batch"), options,
                               {"num_classes": omniglot.num_classes}).double()
    whole = copy.deepcopy(per_task)
    batch = _conv_batch(omniglot, tasks=4)
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    loss_a, metrics_a = per_task.meta_backward(per_task.params(), batch)
    loss_b, metrics_b = whole.meta_loss(whole.params(), batch)
    loss_b.backward()
    whole.drop_invariant_grads()
    assert torch.allclose(loss_a, loss_b.detach(), atol=1e-10) and metrics_a["acc"] == metrics_b["acc"]
    grads_b = dict(whole.named_parameters())
    for name, p in per_task.named_parameters():
        if p.grad is None:
            assert grads_b[name].grad is None, name
        else:
            assert torch.allclose(p.grad, grads_b[name].grad, atol=1e-10), name
    for (name, a), (_, b) in zip(per_task.named_buffers(), whole.named_buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-10), name


def test_fused_and_plain_batch_statistics_norm_agree():
    from metalab.models.backbones import BatchStatNorm, plain_norm_ops

    norm = BatchStatNorm(8).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(6, 8, 5, 5, dtype=torch.double)
    fused = norm(x)
    with plain_norm_ops():
        plain = norm(x)
    assert torch.allclose(fused, plain, atol=1e-10)


def test_checkpointed_inner_steps_give_the_same_second_order_gradients(omniglot):
    torch.manual_seed(0)
    backbone = build_backbone("conv4", (1, 28, 28), hidden=16, norm="task-batch")
    maml = MAML(backbone, inner_lr=0.4, inner_steps=3, execution="loop").double()
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    batch = _conv_batch(omniglot)
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    grads = {}
    for checkpointed in (False, True):
        maml.checkpoint_inner = checkpointed
        maml.zero_grad()
        loss, _ = maml.meta_backward(maml.params(), batch)
        grads[checkpointed] = (loss, {k: p.grad.clone() for k, p in maml.named_parameters() if p.grad is not None})
    (l1, g1), (l2, g2) = grads[False], grads[True]
    assert abs(float(l1) - float(l2)) < 1e-10 and g1.keys() == g2.keys()
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-10), k
    assert any(g.abs().sum() > 0 for g in g1.values())


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_meta_backward_gives_the_gradients_of_meta_loss(algo, clusters):
    """The engine calls ``meta_backward``; whatever shortcut an algorithm takes there must give
    the gradients of its ``meta_loss`` (this caught Reptile being trained by MAML's backward)."""
    from metalab.data import EpisodeSampler
    from metalab.engine import RunConfig
    from metalab.engine.trainer import build_model

    spec = ALGORITHMS[algo]
    task = spec.tasks[0]
    if task == "regression":
        pytest.skip("regression-only")
    torch.manual_seed(0)
    cfg = RunConfig.from_dict({"train": {"algo": algo, "backbone": "mlp", "hidden": 8}})
    ctx = {"task": "classification", "num_classes": clusters.num_classes, "class_domains": clusters.class_domains.tolist()}
    algorithm = build_model(cfg, (32,), torch.device("cpu"), ctx).double()
    batch = EpisodeSampler(clusters, 5, 1, 3, 3, seed=0).sample(0)
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    algorithm.zero_grad()
    algorithm.meta_backward(algorithm.params(), batch)
    fast = {k: None if p.grad is None else p.grad.clone() for k, p in algorithm.named_parameters()}
    algorithm.zero_grad()
    loss, _ = algorithm.meta_loss(algorithm.params(), batch)
    loss.backward()
    raw = {k: p.grad.clone() for k, p in algorithm.named_parameters() if p.grad is not None}
    algorithm.drop_invariant_grads()
    for k, p in algorithm.named_parameters():  # what is dropped must really be round-off
        if p.grad is None and k in raw:
            assert raw[k].abs().max() < 1e-9, (k, raw[k].abs().max())
    checked = 0
    for k, p in algorithm.named_parameters():
        a = fast[k] if fast[k] is not None else torch.zeros_like(p)
        b = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(a, b, atol=1e-10), k
        checked += int(b.abs().sum() > 0)
    assert checked > 0


def test_a_backbone_gets_the_algorithms_normalisation_however_it_was_built():
    """build_algorithm('maml', Conv4(1)) normalises as `metalab train` builds MAML (batch statistics
    only), says so, and keeps the learned scales; forward() scores one task."""
    import warnings as _warnings

    from metalab.models.backbones import BatchStatNorm, Conv4, set_norm

    backbone = Conv4(1, 8, 28)
    with torch.no_grad():
        backbone.blocks[0][1].weight.fill_(2.0)
    with pytest.warns(UserWarning, match="switched the backbone's normalisation to 'task-batch'"):
        maml = build_algorithm("maml", backbone)
    assert isinstance(maml.backbone.blocks[0][1], BatchStatNorm) and maml.backbone.norm == "task-batch"
    assert torch.all(maml.backbone.blocks[0][1].weight == 2.0)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")  # already right: no warning
        proto = build_algorithm("protonet", Conv4(1, 8, 28, "batch"))
    assert not set_norm(Conv4(1, 8, 28, "none"), "batch")
    proto.eval()
    support, labels = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    assert proto(support, labels, torch.rand(4, 1, 28, 28)).shape == (4, 3)


@pytest.mark.parametrize("algo", sorted(a for a, spec in ALGORITHMS.items() if "classification" in spec.tasks)
                         + ["protonet:test_views=dihedral"])
def test_a_prediction_does_not_depend_on_the_rest_of_the_batch(algo, omniglot):
    """Each input scored alone gets the scores it gets in a batch. MAML-family methods normalise by
    batch statistics; they used to normalise a query by the statistics of the queries sent with it,
    so a client predicting one image at a time got other labels than one sending them together."""
    from metalab.data import EpisodeSampler
    from metalab.engine import RunConfig
    from metalab.engine.trainer import build_model

    torch.manual_seed(0)
    algo, _, option = algo.partition(":")  # 'name:option=value' (names may hold a '+')
    options = {"test_inner_steps": 2} if ALGORITHMS[algo].cls.__name__ in ("MAML", "Reptile", "MetaSGD", "ANIL") else {}
    if option:
        key, value = option.split("=")
        options[key] = value
    cfg = RunConfig.from_dict({"train": {"algo": algo, "backbone": "conv4", "hidden": 8, "algo_options": options}})
    ctx = {"task": "classification", "num_classes": omniglot.num_classes, "class_domains": omniglot.class_domains.tolist()}
    algorithm = build_model(cfg, (1, 28, 28), torch.device("cpu"), ctx)
    algorithm.train()
    warm = EpisodeSampler(omniglot, 5, 1, 3, 2, seed=1).sample(0)  # one step, so the norms' statistics are not the initial ones
    algorithm.meta_backward(algorithm.params(), warm)
    algorithm.eval()
    batch = EpisodeSampler(omniglot, 5, 1, 4, 1, seed=2).sample(0)
    predictor = algorithm.adapt(algorithm.params(), batch.support_x[0], batch.support_y[0], 5)
    together = predictor.logits(batch.query_x[0])
    alone = torch.cat([predictor.logits(x[None]) for x in batch.query_x[0]])
    pairs = torch.cat([predictor.logits(batch.query_x[0][i:i + 2]) for i in range(0, 20, 2)])
    assert torch.allclose(alone, together, atol=1e-4, rtol=1e-4), (alone - together).abs().max()
    assert torch.allclose(pairs, together, atol=1e-4, rtol=1e-4)
    assert torch.equal(alone.argmax(-1), together.argmax(-1))


@pytest.mark.parametrize("first_order", [False, True])
def test_support_statistics_for_queries_give_the_same_gradients_in_every_execution(omniglot, first_order):
    """query_stats='support' (queries normalised by the support's statistics in training, as at
    prediction): loop, vmap and grouped executions agree, and each query's output no longer depends
    on the other queries — which 'batch' (MAML's transductive training) does."""
    torch.manual_seed(0)
    backbone = build_backbone("conv4", (1, 28, 28), hidden=8, norm="task-batch")
    maml = MAML(backbone, inner_lr=0.4, inner_steps=2, first_order=first_order, query_stats="support").double()
    torch.nn.init.normal_(maml.head_weight, std=0.1)
    batch = _conv_batch(omniglot)
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    grads = {}
    for execution in ("loop", "vmap", "grouped"):
        maml.execution = execution
        maml.zero_grad()
        loss, _ = maml.meta_loss(maml.params(), batch)
        loss.backward()
        maml.drop_invariant_grads()
        grads[execution] = (loss.detach(), {k: p.grad.clone() for k, p in maml.named_parameters() if p.grad is not None})
    for other in ("vmap", "grouped"):
        assert torch.allclose(grads["loop"][0], grads[other][0], atol=1e-10)
        for k, g in grads["loop"][1].items():
            assert torch.allclose(g, grads[other][1][k], atol=1e-9, rtol=1e-6), (other, k)
    fast = maml.inner_loop(maml.params(), batch.support_x[0], batch.support_y[0], 5, 2, create_graph=False)
    sx, qx = batch.support_x[0], batch.query_x[0]
    for stats, independent in (("support", True), ("batch", False)):
        maml.query_stats = stats
        whole, part = maml.query_outputs(fast, sx, qx), maml.query_outputs(fast, sx, qx[:4])
        assert torch.allclose(whole[:4], part, atol=1e-10) is independent, stats
    with pytest.raises(ConfigError, match="query_stats='none' is unknown; use 'support'"):
        MAML(backbone, query_stats="none")


def test_protonet_global_loss_trains_a_classifier_over_all_classes_and_never_predicts_with_it(omniglot):
    """global_loss adds a cross-entropy over every meta-train class on the episode's features: the
    classifier and the backbone get its gradient; adaptation and predictions use prototypes only;
    off (0, the default) the network has no classifier, as before."""
    torch.manual_seed(0)
    backbone = build_backbone("conv4", (1, 28, 28), hidden=8, norm="batch")
    plain = build_algorithm("protonet", copy.deepcopy(backbone), {}, {"num_classes": omniglot.num_classes})
    aux = build_algorithm("protonet", copy.deepcopy(backbone), {"global_loss": 1.0}, {"num_classes": omniglot.num_classes})
    assert not any("global_head" in k for k in plain.state_dict())
    assert aux.global_head.weight.shape == (omniglot.num_classes, backbone.out_dim)
    batch = _conv_batch(omniglot, tasks=2)
    plain.train(), aux.train()
    loss_plain, _ = plain.meta_backward(plain.params(), batch)
    loss_aux, _ = aux.meta_backward(aux.params(), batch)
    # at initialisation the classifier's loss is about log(classes) and adds to the episode loss
    assert loss_aux - loss_plain > 0.5 * math.log(omniglot.num_classes)
    assert aux.global_head.weight.grad.abs().sum() > 0
    first = next(n for n, _ in plain.named_parameters())
    assert not torch.allclose(dict(plain.named_parameters())[first].grad, dict(aux.named_parameters())[first].grad)
    plain.eval(), aux.eval()
    aux.load_state_dict({**aux.state_dict(), **plain.state_dict()})  # same backbone, classifier kept
    x, y = batch.support_x[0], batch.support_y[0]
    assert torch.equal(plain.adapt(plain.params(), x, y, 5).logits(batch.query_x[0]),
                       aux.adapt(aux.params(), x, y, 5).logits(batch.query_x[0]))
    with pytest.raises(ConfigError, match="global_loss=-1 is invalid"):
        build_algorithm("protonet", backbone, {"global_loss": -1}, {"num_classes": omniglot.num_classes})


@pytest.mark.parametrize("views", ["rotations", "dihedral"])
def test_protonet_test_views_add_the_distances_of_every_view_at_test_only(omniglot, views):
    """test_views scores an image by its 0/90/180/270° turns (and, dihedral, their mirror images):
    outside training the features are the views side by side, scaled so a query's score is the
    mean of its per-view scores (one view's scale, for probabilities and thresholds); training
    sees one view; inputs that are not square images are one sentence, and an unknown choice too."""
    from metalab.algorithms.protonet import neg_sq_distance, prototypes

    torch.manual_seed(0)
    net = build_algorithm("protonet", build_backbone("conv4", (1, 28, 28), hidden=8, norm="batch"),
                          {"test_views": views}).eval()
    batch = _conv_batch(omniglot, tasks=1)
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    logits = net.adapt(net.params(), sx, sy, 5).logits(qx)
    turns = [lambda x, k=k: torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    if views == "dihedral":
        turns += [lambda x, k=k: torch.rot90(x.flip(-1), k, dims=(-2, -1)) for k in range(4)]
    expected = sum(neg_sq_distance(one_view_features(net, view(qx))[None],
                                   prototypes(one_view_features(net, view(sx))[None], sy[None], 5))[0]
                   for view in turns) / len(turns)
    assert net.encode(net.params(), sx).shape == (len(sx), len(turns) * net.backbone.out_dim)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-3)
    net.train()
    assert net.encode(net.params(), sx).shape == (len(sx), net.backbone.out_dim)
    vectors = build_algorithm("protonet", build_backbone("mlp", (6,), hidden=4), {"test_views": views}).eval()
    with pytest.raises(ConfigError, match=rf"test_views='{views}' needs square images \[B, C, H, W\]; got inputs of shape \[3, 6\]"):
        vectors.encode(vectors.params(), torch.rand(3, 6))
    with pytest.raises(ConfigError, match="test_views='flips' is unknown"):
        build_algorithm("protonet", build_backbone("mlp", (6,), hidden=4), {"test_views": "flips"})


def one_view_features(net, x):
    """The network's features of one view (the base class's encode)."""
    from metalab.algorithms.base import FeatureHeadAlgorithm

    return FeatureHeadAlgorithm.encode(net, net.params(), x)
