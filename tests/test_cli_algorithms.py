"""Every algorithm through `metalab train` and `metalab eval` (in-process, small data)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from metalab.algorithms import ALGORITHMS
from metalab.cli import app

from conftest import make_clusters

runner = CliRunner()
CLASSIFIERS = sorted(n for n, s in ALGORITHMS.items() if "classification" in s.tasks)


@pytest.fixture(scope="module")
def clusters_npz(tmp_path_factory):
    src = make_clusters(classes=30, per_class=12)
    path = tmp_path_factory.mktemp("data") / "clusters.npz"
    np.savez(path, x=src.x.numpy(), y=src.y.numpy(), class_names=np.array(src.class_names))
    return path


@pytest.mark.parametrize("algo", CLASSIFIERS)
def test_every_classifier_trains_and_evaluates_from_the_cli(algo, clusters_npz, tmp_path):
    run = tmp_path / algo
    result = runner.invoke(app, ["train", "--algo", algo, "--data", str(clusters_npz), "--steps", "5", "--queries", "5",
                                 "--set", "train.backbone=mlp", "--set", "train.hidden=8", "--set", "eval.episodes=20",
                                 "--set", "eval.settings=[[3, 1]]", "--set", "eval.queries=5", "--out", str(run),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval.json").read_text())["results"][0]["episodes"] == 20
    result = runner.invoke(app, ["eval", str(run), "--setting", "2w1s", "--episodes", "10", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "2-way 1-shot" in result.output


def test_sinusoid_regression_from_the_cli(tmp_path):
    run = tmp_path / "sin"
    result = runner.invoke(app, ["train", "--algo", "maml", "--data", "sinusoid", "--shots", "5", "--steps", "5",
                                 "--set", "train.backbone=mlp", "--set", "eval.episodes=20",
                                 "--set", "eval.settings=[[1, 5]]", "--set", "eval.adapt_steps=[1, 3]",
                                 "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "MSE" in result.output and "5-shot, 3 steps" in result.output
    assert (run / "adaptation.png").exists()


def test_algorithms_command_lists_every_algorithm():
    result = runner.invoke(app, ["algorithms"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ALGORITHMS:
        assert name in result.output
    # each option with the default it takes when left out, as a config would write it
    assert "inner_lr=0.4 (regression 0.01), inner_steps=1" in result.output
    assert "inner_lr=0.1 (regression 0.01), inner_steps=5" in result.output  # reptile's own defaults
    assert "lam=1.0, scale=1.0" in result.output and "first_order=false" in result.output


def test_option_defaults_are_what_an_algorithm_built_without_options_uses():
    from metalab.algorithms import build_algorithm, option_defaults
    from metalab.models.backbones import build_backbone

    for name, task in (("reptile", "classification"), ("maml", "regression"), ("anil", "classification")):
        context = {"task": task, "outputs": 1}
        built = build_algorithm(name, build_backbone("mlp", (4,), hidden=8), {}, context)
        defaults = option_defaults(name, task)
        assert {"inner_lr", "inner_steps", "test_inner_steps"} <= set(defaults), defaults
        for key, value in defaults.items():
            if hasattr(built, key):
                assert getattr(built, key) == value, (name, key)
    assert option_defaults("maml", "regression")["inner_lr"] == 0.01 != option_defaults("maml")["inner_lr"]


@pytest.mark.parametrize("planner", ["hard", "curriculum", "domain-balanced"])
def test_planners_from_the_cli(planner, clusters_npz, tmp_path):
    run = tmp_path / planner
    result = runner.invoke(app, ["train", "--algo", "protonet", "--data", str(clusters_npz), "--planner", planner,
                                 "--steps", "12", "--queries", "5", "--set", "train.backbone=mlp", "--set", "train.hidden=8",
                                 "--set", "train.planner_every=2", "--set", "train.planner_refresh=5", "--no-eval",
                                 "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    from metalab.engine.checkpoint import latest_good_checkpoint

    _, _, (state, _, _) = latest_good_checkpoint(run)
    assert not state["planner/error"].isnan().all()  # the learner's errors reached the planner and the checkpoint
    assert (state["planner/neighbours"].shape[1] > 0) == (planner == "hard")
    bad = runner.invoke(app, ["train", "--data", str(clusters_npz), "--planner", "smart", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()


def test_array_runs_adapt_and_predict_from_npz_files(clusters_npz, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(clusters_npz), "--steps", "5", "--queries", "5", "--no-eval",
                                 "--set", "train.backbone=mlp", "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    rng = np.random.default_rng(0)
    far = {"low": -6.0, "high": 6.0}  # two new classes, far apart in every dimension
    np.savez(tmp_path / "support.npz", x=np.concatenate([v + rng.normal(size=(3, 32)) for v in far.values()]).astype(np.float32),
             y=np.array(["low"] * 3 + ["high"] * 3))
    np.savez(tmp_path / "rows.npz", x=np.stack([far["high"] + rng.normal(size=32), far["low"] + rng.normal(size=32)]).astype(np.float32))
    result = runner.invoke(app, ["adapt", "--run", str(run), "--support", str(tmp_path / "support.npz"),
                                 "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["predict", "--adapter", str(tmp_path / "a.safetensors"), "--json", str(tmp_path / "rows.npz")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [(p["row"], p["label"]) for p in lines] == [("rows.npz[0]", "high"), ("rows.npz[1]", "low")]
    np.savez(tmp_path / "narrow.npz", x=np.zeros((2, 5), np.float32), y=np.array(["a", "b"]))
    for command, says in ((["adapt", "--run", str(run), "--support", str(tmp_path / "narrow.npz")],
                           "has examples of shape [5], but run"),
                          (["predict", "--adapter", str(tmp_path / "a.safetensors"), str(tmp_path / "narrow.npz")],
                           "has examples of shape [5]; this adapter's are [32]"),
                          (["predict", "--adapter", str(tmp_path / "a.safetensors"), str(tmp_path / "rows.NPZ.txt")],
                           "must be an existing .npz file"),
                          (["adapt", "--run", str(run), "--support", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "m.safetensors")],
                           "must be an existing .npz file with arrays x and y")):
        result = runner.invoke(app, command)  # (main() prints such errors; in-process, the exception carries them)
        assert result.exit_code != 0 and says in str(result.exception), (command, result.exception)
    # uint8 arrays are scaled from 0-255 to 0-1 and floats are not: mixing them would silently mis-scale every input
    np.savez(tmp_path / "bytes.npz", x=np.zeros((2, 32), np.uint8), y=np.array(["a", "b"]))
    for command, says in ((["adapt", "--run", str(run), "--support", str(tmp_path / "bytes.npz"), "--out", str(tmp_path / "b.safetensors")],
                           "holds uint8 arrays but run"),
                          (["predict", "--adapter", str(tmp_path / "a.safetensors"), str(tmp_path / "bytes.npz")],
                           "holds uint8 arrays but this adapter's support had float32 ones")):
        result = runner.invoke(app, command)
        assert result.exit_code != 0 and says in str(result.exception), (command, result.exception)
    from metalab.engine.adapter import Adapter  # the Python API checks it too
    from metalab.errors import DataError

    with pytest.raises(DataError, match=r"The support holds uint8 arrays but run '.*' had float32 ones"):
        Adapter(run, torch.zeros(2, 32, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    assert Adapter(run, torch.zeros(2, 32), torch.tensor([0, 1]), ["a", "b"]).predict(torch.zeros(1, 32))[0].label in ("a", "b")


def test_sinusoid_flags_that_mean_nothing_and_an_empty_train_section_get_one_sentence(tmp_path):
    (tmp_path / "empty.yaml").write_text("train:\neval:\n  episodes: 5\n")  # no flag fills 'train:'
    for args, says in ((["--config", str(tmp_path / "empty.yaml")], "Algorithm 'protonet' does not do regression"),
                       (["--algo", "maml", "--ways", "20"], "--ways means nothing for 'sinusoid' tasks")):
        result = runner.invoke(app, ["train", "--data", "sinusoid", *args, "--steps", "2", "--out", str(tmp_path / "r"),
                                     "--no-progress"])
        assert result.exit_code != 0 and says in str(result.exception), (args, repr(result.exception))
    assert not (tmp_path / "r").exists()


def test_a_config_file_with_an_empty_section_takes_flags_and_the_data_s_defaults(tmp_path):
    import yaml

    (tmp_path / "sine.yaml").write_text("train:\neval:\n  episodes: 20\n")  # 'train:' left empty; the data comes by flag
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "sine.yaml"), "--data", "sinusoid", "--algo", "maml",
                                 "--steps", "2", "--set", "train.val_episodes=5", "--no-eval", "--out", str(tmp_path / "run"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["algo"] == "maml" and saved["train"]["shots"] == 10  # regression's default, not omniglot's 1
    assert saved["eval"]["settings"] == [[1, 5], [1, 10]] and saved["eval"]["episodes"] == 20
