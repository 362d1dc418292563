import pytest
import torch

from metalab.engine import MetaTrainer, RunConfig, RunFolder, load_trained
from metalab.engine.checkpoint import latest_good_checkpoint, list_checkpoints, load_checkpoint
from metalab.errors import CheckpointError, ConfigError, TrainingDiverged

from helpers import cluster_config, cluster_splits


def _trainer(clusters, run_dir, resume=False, **train):
    cfg = cluster_config("protonet", steps=40, lr=1e-2, checkpoint_every=10, log_every=5, val_every=20, **train)
    return MetaTrainer(cfg, run_dir, splits=cluster_splits(clusters), resume=resume, show_progress=False, log=lambda m: None)


class Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(clusters, tmp_path):
    straight = _trainer(clusters, tmp_path / "straight")
    straight.train()

    broken = _trainer(clusters, tmp_path / "broken")
    original = broken._prepare

    def crash_at_25(step):
        if step == 25:
            raise Interrupt()
        return original(step)

    broken._prepare = crash_at_25
    with pytest.raises(Interrupt):
        broken.train()
    assert [s for s, _ in list_checkpoints(tmp_path / "broken")] == [10, 20]

    torch.manual_seed(12345)  # whatever the global RNG holds now, resume restores the saved state
    resumed = _trainer(clusters, tmp_path / "broken", resume=True)
    assert resumed.start_step == 20
    _, _, (state, _, _) = latest_good_checkpoint(tmp_path / "broken")
    assert torch.equal(torch.get_rng_state(), state["rng.torch"])
    resumed.train()

    a, b = RunFolder(tmp_path / "straight").metrics(), RunFolder(tmp_path / "broken").metrics()
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no duplicated or missing records
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["acc"] == rb["acc"]
        assert ra.get("val_acc") == rb.get("val_acc")
    for (k, va), (_, vb) in zip(straight.algorithm.state_dict().items(), resumed.algorithm.state_dict().items()):
        assert torch.equal(va, vb), k
    with pytest.raises(ConfigError, match=r"^device='gpu' is not a device; use 'auto', 'cpu' or 'cuda\[:N\]'"):
        load_trained(tmp_path / "straight", device="gpu")  # `metalab eval --device`: named as the option, not train.device


def test_nan_guard_stops_and_keeps_last_good_checkpoint(clusters, tmp_path):
    trainer = _trainer(clusters, tmp_path / "run")
    original = trainer._prepare

    def poisoned(step):
        batch = original(step)
        if step == 13:
            batch.query_x[0, 0, 0] = float("nan")
        return batch

    trainer._prepare = poisoned
    with pytest.raises(TrainingDiverged, match=r"stopped at step 13.*non-finite.*checkpoint-0000010.safetensors.*Lower train.lr"):
        trainer.train()
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert steps == [10]
    model_state, _, info = load_checkpoint(tmp_path / "run" / "checkpoint-0000010.safetensors")
    assert info["step"] == 10 and all(torch.isfinite(v).all() for v in model_state.values() if v.is_floating_point())


def test_corrupt_checkpoint_is_named_and_previous_one_used(clusters, tmp_path):
    _trainer(clusters, tmp_path / "run").train()
    ckpts = list_checkpoints(tmp_path / "run")
    newest = ckpts[-1][1]
    data = bytearray(newest.read_bytes())
    data[-20] ^= 0xFF  # flip bits inside the tensor data
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"'{newest}' fails its checksum"):
        load_checkpoint(newest)
    warnings = []
    step, path, _ = latest_good_checkpoint(tmp_path / "run", warn=warnings.append)
    assert path == ckpts[-2][1] and "fails its checksum" in warnings[0]

    ckpts[-2][1].write_bytes(ckpts[-2][1].read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(ckpts[-2][1])


def test_load_trained_rejects_folders_without_runs(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a metalab run folder"):
        load_trained(tmp_path / "empty")
    (tmp_path / "notes.csv").write_text("text,label\n")
    with pytest.raises(CheckpointError, match="notes.csv' is a file, not a run folder"):
        load_trained(tmp_path / "notes.csv")
    with pytest.raises(ConfigError, match="is a folder; pass a YAML config file"):
        RunConfig.load(tmp_path / "empty")  # `metalab train --config RUN` instead of RUN/config.yaml


def test_new_run_refuses_to_overwrite_an_existing_one(clusters, tmp_path):
    _trainer(clusters, tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        _trainer(clusters, tmp_path / "run")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['stpes'\]"):
        RunConfig.from_dict({"train": {"stpes": 3}})
    with pytest.raises(ConfigError, match=r"train.steps=0 is invalid"):
        RunConfig.from_dict({"train": {"steps": 0}})
    with pytest.raises(ConfigError, match=r"eval.settings entry"):
        RunConfig.from_dict({"eval": {"settings": [[5]]}})
    with pytest.raises(ConfigError, match=r"^config: train.lr='fast' is invalid; give a number\.$"):
        RunConfig.from_dict({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"train.time_budget='soon' is invalid; give a number or null"):
        RunConfig.from_dict({"train": {"time_budget": "soon"}})
    with pytest.raises(ConfigError, match=r"eval.settings=5 is invalid; give a list"):
        RunConfig.from_dict({"eval": {"settings": 5}})
    with pytest.raises(ConfigError, match=r"data.rotations='maybe' is invalid; give true or false or null"):
        RunConfig.from_dict({"data": {"rotations": "maybe"}})
    with pytest.raises(ConfigError, match=r"train.steps=True is invalid; give a whole number"):
        RunConfig.from_dict({"train": {"steps": True}})
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.1 and data.test_fraction=1.5 are invalid"):
        RunConfig.from_dict({"data": {"test_fraction": 1.5}})
    assert RunConfig.from_dict({"train": {"lr": "1e-3"}}).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    import numpy as np

    seeded = RunConfig.from_dict({"train": {"seed": np.int64(3), "lr": np.float32(0.5)}})  # numpy numbers, saved as plain ones
    assert type(seeded.train.seed) is int and type(seeded.train.lr) is float
    assert RunConfig.from_dict({"train": {"ways": [2, 5], "task_threads": 2}, "data": {"channels": 3}}).train.ways == [2, 5]


def test_a_time_budget_the_steps_beat_leaves_the_run_reproducible(clusters, tmp_path):
    """A time budget is a safety net: while the step count ends the run first, the learning rate
    (warm-up included) follows the steps alone, so two runs end on the same weights (the demo)."""
    runs = [_trainer(clusters, tmp_path / str(i), time_budget=600.0) for i in range(2)]
    for run in runs:
        assert run.train().stopped_by == "steps"
    for (k, va), (_, vb) in zip(*(run.algorithm.state_dict().items() for run in runs)):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_with_a_checkpoint(clusters, tmp_path, clock):
    cfg = cluster_config("protonet", steps=100_000, lr=1e-2, checkpoint_every=100_000, time_budget=1.0, budget_clock=clock)
    trainer = MetaTrainer(cfg, tmp_path / clock, splits=cluster_splits(clusters), show_progress=False, log=lambda m: None)
    result = trainer.train()
    assert result.stopped_by == "time_budget" and 0 < result.steps < 100_000
    assert [s for s, _ in list_checkpoints(tmp_path / clock)] == [result.steps]
    with pytest.raises(ConfigError, match="budget_clock='gpu' is unknown"):
        RunConfig.from_dict({"train": {"budget_clock": "gpu"}})


def test_eval_settings_that_the_test_split_cannot_give_are_named_before_training(clusters, tmp_path):
    """`metalab train` evaluates when training ends: settings its test split cannot fill are named
    before a step is trained (and left out of the evaluation); if none fits, nothing is trained or written."""
    from metalab.engine.eval_run import evaluate_run

    splits = cluster_splits(clusters)
    wide = splits.test.num_classes + 1
    none_fit = cluster_config("protonet", steps=2)
    none_fit.eval.settings = [[wide, 1], [wide, 5]]
    with pytest.raises(ConfigError, match=rf"No evaluation setting fits the test split \({wide}-way 1-shot needs {wide} classes "
                                          rf"but the test split has {splits.test.num_classes};"):
        MetaTrainer(none_fit, tmp_path / "none", splits=splits, show_progress=False, log=lambda m: None, check_eval=True)
    too_many = cluster_config("protonet", steps=2)
    too_many.eval.queries = int(splits.test.class_counts().min())
    with pytest.raises(ConfigError, match=r"1-shot needs 21 examples per class \(1 shot \+ 20 queries\) but the test split's '.+' has 20;"):
        MetaTrainer(too_many, tmp_path / "many", splits=splits, show_progress=False, log=lambda m: None, check_eval=True)
    assert not (tmp_path / "none").exists() and not (tmp_path / "many").exists()

    some_fit = cluster_config("protonet", steps=2)
    some_fit.eval.settings, some_fit.eval.episodes = [[5, 1], [wide, 1]], 20
    said = []
    result = MetaTrainer(some_fit, tmp_path / "some", splits=splits, show_progress=False, log=said.append, check_eval=True).train()
    assert 0 < result.validation_seconds <= result.seconds  # the final validation, reported apart by `metalab train`
    assert f"evaluation will leave out {wide}-way 1-shot: it needs {wide} classes but the test split has {wide - 1}." in said


def test_stop_request_turns_a_first_ctrl_c_into_a_request_and_a_second_into_an_interrupt():
    import os
    import signal

    from metalab.engine.interrupt import StopRequest

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever ran the tests
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
        with StopRequest(enabled=False) as stop:  # under torchrun
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job ignores Ctrl-C: left so
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_default_run_folders_of_runs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    import time

    from metalab.engine.run import default_run_dir

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261130-120000")  # one second for all of them
    first = default_run_dir("proto", tmp_path)
    first.mkdir()
    second = default_run_dir("proto", tmp_path)
    second.mkdir()
    assert (first.name, second.name, default_run_dir("proto", tmp_path).name) == (
        "proto-20261130-120000", "proto-20261130-120000-2", "proto-20261130-120000-3")


def test_resume_with_every_checkpoint_damaged_refuses_and_changes_nothing(clusters, tmp_path):
    """It used to empty metrics.jsonl and start again at step 0 (then prune the new good checkpoints)."""
    from metalab.errors import CheckpointError

    _trainer(clusters, tmp_path / "run").train()
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*.safetensors"))
    for path in checkpoints:
        path.write_bytes(path.read_bytes()[:100])  # cut short: none verifies
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(CheckpointError, match=r"Every checkpoint in run folder '.*' is damaged.*nothing was changed"):
        _trainer(clusters, tmp_path / "run", resume=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before and len(before["metrics.jsonl"]) > 0


def test_stale_temporary_checkpoints_are_removed_when_training_opens_the_folder(clusters, tmp_path):
    _trainer(clusters, tmp_path / "run").train()
    stale = tmp_path / "run" / ".checkpoint-0000050.safetensors.abc123.tmp"  # a writer killed mid-write
    stale.write_bytes(b"\0" * 4096)
    _trainer(clusters, tmp_path / "run", resume=True).train()
    assert not stale.exists() and list_checkpoints(tmp_path / "run")[-1][0] == 40


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ""])
def test_a_run_name_cannot_leave_the_runs_folder(name):
    with pytest.raises(ConfigError, match="a run name becomes a folder under runs/"):
        RunConfig.from_dict({"name": name})


def test_the_checksum_covers_the_metadata_the_loader_trusts(clusters, tmp_path):
    """Only the tensors used to be checked: a changed step, input shape or optimiser setting loaded as good."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    _trainer(clusters, tmp_path / "run").train()
    path = list_checkpoints(tmp_path / "run")[-1][1]
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "2"
    from metalab.engine.checkpoint import _digest
    assert meta["sha256"] == _digest(tensors)  # what metalab < 0.2 checks: an older metalab still reads the file
    for field, change in (("info", lambda v: v.replace('"step": 40', '"step": 41')),
                          ("optimizer", lambda v: v.replace('"betas": [0.9, 0.999]', '"betas": [0.5, 0.999]'))):
        altered = {**meta, field: change(meta[field])}
        assert altered[field] != meta[field]
        save_file(tensors, str(path), metadata=altered)
        with pytest.raises(CheckpointError, match="fails its checksum"):
            load_checkpoint(path)
    save_file(tensors, str(path), metadata={**meta, "format": "9"})
    with pytest.raises(CheckpointError, match="has format '9', newer than this metalab's 2"):
        load_checkpoint(path)
    save_file(tensors, str(path), metadata=meta)
    assert load_checkpoint(path)[2]["step"] == 40


def test_pruning_never_deletes_the_newest_good_checkpoint(clusters, tmp_path):
    """Damaged later-numbered files used to count among the kept ones, so pruning deleted the good
    checkpoint just written and left only damaged ones."""
    broken = _trainer(clusters, tmp_path / "run", keep_checkpoints=1)
    original = broken._prepare

    def crash_at(step_to_crash):
        def prepare(step):
            if step == step_to_crash:
                raise Interrupt()
            return original(step)
        return prepare

    broken._prepare = crash_at(25)
    with pytest.raises(Interrupt):
        broken.train()
    for step in (30, 40):  # damaged files from an earlier life of the folder
        (tmp_path / "run" / f"checkpoint-{step:07d}.safetensors").write_bytes(b"\0" * 64)
    resumed = _trainer(clusters, tmp_path / "run", resume=True, keep_checkpoints=1)
    assert resumed.start_step == 20
    resumed._prepare = crash_at(35)  # after checkpoint 30 was written (over the damaged one) and pruning ran
    with pytest.raises(Interrupt):
        resumed.train()
    step, path, _ = latest_good_checkpoint(tmp_path / "run", warn=lambda m: None)
    assert step == 30 and [s for s, _ in list_checkpoints(tmp_path / "run")] == [30, 40]


def test_eval_results_are_added_keyed_by_setting_episodes_and_seed(tmp_path):
    """`metalab eval RUN --setting 7w2s --episodes 10` used to replace a 600-episode, four-setting eval.json."""
    from metalab.engine.run import merge_eval
    from metalab.store.runs import _result_strings

    run = RunFolder.create(tmp_path / "run", RunConfig.from_dict({}))
    full = {"step": 100, "results": [{"metric": "accuracy", "ways": w, "shots": k, "episodes": 600, "seed": 0, "mean": 0.9,
                                      "ci95": 0.01, "queries": 15, "steps": None} for w, k in ((5, 1), (5, 5))]}
    run.write_eval(full)
    quick = {"step": 120, "results": [{**full["results"][0], "ways": 7, "shots": 2, "episodes": 10, "mean": 0.5}]}
    held = run.write_eval(quick)
    assert [(r["ways"], r["shots"], r["episodes"], r["step"]) for r in held["results"]] == [(5, 1, 600, 100), (5, 5, 600, 100), (7, 2, 10, 120)]
    again = {"step": 130, "results": [{**full["results"][1], "mean": 0.95}, {**full["results"][1], "episodes": 50}]}
    held = run.write_eval(again)  # the same measurement is replaced where it stood; another episode count is added
    assert [(r["ways"], r["shots"], r["episodes"], r["step"], r["mean"]) for r in held["results"]] == [
        (5, 1, 600, 100, 0.9), (5, 5, 600, 130, 0.95), (7, 2, 10, 120, 0.5), (5, 5, 50, 130, 0.9)]
    assert merge_eval(None, quick)["results"] == [{**quick["results"][0], "step": 120}]
    assert _result_strings(held)[:3] == ["5w1s 90.00 ± 1.00 (600 ep)", "5w5s 95.00 ± 1.00 (600 ep)", "7w2s 50.00 ± 1.00 (10 ep)"]


def test_a_full_disk_while_checkpointing_is_one_sentence_and_the_run_resumes(clusters, tmp_path, monkeypatch):
    """It was a SafetensorError traceback; now: which file, that the earlier checkpoint is kept, and how to go on."""
    import errno

    import metalab.engine.checkpoint as checkpoint
    from metalab.errors import StorageError

    real = checkpoint.save_file
    writes = []

    def full_disk_on_the_second(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 2:
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)  # what fitted before the disk filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk_on_the_second)
    run = tmp_path / "run"
    with pytest.raises(StorageError, match=r"Checkpoint '.*checkpoint-0000020.safetensors' could not be written \(no space "
                                           r"left on the device\); the run folder keeps checkpoint-0000010.safetensors\. "
                                           rf"Free disk space, then continue with `metalab train --resume {run}`\."):
        _trainer(clusters, run).train()
    assert [s for s, _ in list_checkpoints(run)] == [10] and not list(run.glob(".checkpoint-*"))
    monkeypatch.setattr(checkpoint, "save_file", real)
    resumed = _trainer(clusters, run, resume=True)
    assert resumed.start_step == 10
    resumed.train()
    assert list_checkpoints(run)[-1][0] == 40


@pytest.mark.parametrize("anneal_by,same", [("steps", True), ("time", False)])
def test_a_slow_stretch_of_clock_leaves_a_run_that_finishes_its_steps_unchanged(clusters, tmp_path, anneal_by, same):
    """The budget used to set the schedule (progress = max(step / steps, time / budget)), so a run
    slowed for a while — other jobs on the machine — annealed differently and ended on other weights
    though it finished every step. Now the budget only stops a run, unless anneal_by is 'time'."""
    import time as clock

    def run(name, slow):
        trainer = _trainer(clusters, tmp_path / name, time_budget=4.5, anneal_by=anneal_by)
        original = trainer._prepare

        def prepare(step):
            if slow and 2 <= step < 12:
                clock.sleep(0.15)  # 1.5 s of slowness early on, inside the 4.5 s budget (a third of it by step 12: 30 % of the steps)
            return original(step)

        trainer._prepare = prepare
        assert trainer.train().stopped_by == "steps"
        return trainer.algorithm.state_dict()

    fast, slow = run("fast", False), run("slow", True)
    equal = all(torch.equal(fast[k], slow[k]) for k in fast)
    assert equal is same
    with pytest.raises(ConfigError, match="train.anneal_by='time' anneals over train.time_budget, which is not set"):
        RunConfig.from_dict({"train": {"anneal_by": "time"}})


def test_augment_strength_scales_the_training_jitter(omniglot, tmp_path):
    """data.augment_strength scales the affine jitter of training episodes (the same draws, further
    at 2 than at 1; 1 is the jitter as it always was); out of range is one sentence naming the field."""
    from metalab.data import split_by_class
    from metalab.data.augment import random_affine

    splits = split_by_class(omniglot, val_fraction=0.1, test_fraction=0.3, seed=0)
    moved = {}
    for strength in (0.01, 0.5, 1.0, 2.0):
        cfg = RunConfig.from_dict({"data": {"augment": True, "augment_strength": strength},
                                   "train": {"algo": "protonet", "hidden": 8, "steps": 1, "ways": 5, "queries": 2}})
        trainer = MetaTrainer(cfg, tmp_path / str(strength), splits=splits, show_progress=False, log=lambda m: None)
        plain = trainer.sampler.sample(0).support_x  # float images in [0, 1]
        jittered = trainer._prepare(0).support_x
        moved[strength] = (jittered - plain).abs().mean().item()
        if strength == 1.0:  # the default: random_affine's own defaults, drawn as before
            g = torch.Generator().manual_seed(cfg.train.seed * 7919)
            assert torch.equal(jittered, random_affine(plain.flatten(0, 1), g).view_as(plain))
    assert moved[0.01] < 0.1 * moved[1.0]
    assert moved[0.01] < moved[0.5] < moved[1.0] < moved[2.0]
    with pytest.raises(ConfigError, match=r"data.augment_strength=0 is invalid"):
        RunConfig.from_dict({"data": {"augment_strength": 0}})
