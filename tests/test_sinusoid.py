import math

import pytest
import torch

from metalab.data.sinusoid import SinusoidTasks
from metalab.engine import MetaTrainer, RunConfig
from metalab.engine.eval_run import evaluate_run
from metalab.errors import ConfigError


def test_sinusoid_tasks_follow_the_maml_paper_family():
    family = SinusoidTasks(shots=10, queries=7, tasks=500, seed=0)
    batch, amp, phase = family.sample_with_params(3)
    assert batch.support_x.shape == (500, 10, 1) and batch.query_y.shape == (500, 7, 1)
    assert 0.1 <= amp.min() and amp.max() <= 5 and 0 <= phase.min() and phase.max() <= torch.pi
    assert batch.support_x.abs().max() <= 5
    assert torch.allclose(batch.support_y, amp * torch.sin(batch.support_x - phase))
    assert torch.equal(family.sample(3).support_x, batch.support_x)  # a pure function of (seed, index)
    assert not torch.equal(family.sample(4).support_x, batch.support_x)


def sinusoid_config(algo: str, steps: int) -> RunConfig:
    return RunConfig.from_dict({
        "name": algo,
        "data": {"source": "sinusoid"},
        "train": {"algo": algo, "backbone": "mlp", "hidden": 10, "shots": 10, "queries": 10, "meta_batch": 10,
                  "steps": steps, "lr": 1e-2, "val_every": 300, "val_episodes": 20, "checkpoint_every": 300,
                  "algo_options": {"inner_lr": 0.05, "test_inner_steps": 1}, "device": "cpu"},
        "eval": {"episodes": 200, "settings": [[1, 10]], "adapt_steps": [1], "queries": 20},
    })


def test_maml_regression_beats_predicting_zero_and_writes_the_plot(tmp_path):
    trainer = MetaTrainer(sinusoid_config("maml", 600), tmp_path / "maml", show_progress=False, log=lambda m: None)
    trainer.train()
    record = evaluate_run(tmp_path / "maml", show_progress=False)
    one_step = next(r for r in record["results"] if r["steps"] == 1)
    zero_mse = SinusoidTasks(10, 20, 200, seed=2024).sample(0).query_y.pow(2).mean().item()  # predicting 0
    assert one_step["metric"] == "mse" and one_step["episodes"] == 200
    assert one_step["mean"] < 0.6 * zero_mse, (one_step, zero_mse)  # measured: 1.67 vs 3.99
    assert (tmp_path / "maml" / "adaptation.png").stat().st_size > 10_000


def regression_run(tmp_path, **train) -> RunConfig:
    return RunConfig.from_dict({"data": {"source": "sinusoid"},
                                "train": {"algo": "maml", "steps": 40, "val_every": 40, "val_episodes": 20,
                                          "checkpoint_every": 40, "device": "cpu", **train},
                                "eval": {"episodes": 20}})


def test_regression_defaults_follow_the_maml_paper_where_the_config_is_silent(tmp_path):
    config = regression_run(tmp_path)
    assert config.train.shots == 10 and config.eval.settings == [[1, 5], [1, 10]]
    given = RunConfig.from_dict({"data": {"source": "sinusoid"}, "train": {"shots": 5}, "eval": {"settings": [[1, 20]]}})
    assert given.train.shots == 5 and given.eval.settings == [[1, 20]]
    assert RunConfig.from_dict({"data": {"source": "omniglot"}}).train.shots == 1  # classification keeps its own
    with pytest.raises(ConfigError, match="train.planner='hard' chooses classes and domains, which 'sinusoid'"):
        RunConfig.from_dict({"data": {"source": "sinusoid"}, "train": {"planner": "hard"}})  # was silently ignored
    trainer = MetaTrainer(config, tmp_path / "run", show_progress=False, log=lambda m: None)
    assert trainer.algorithm.inner_lr == 0.01  # classification's 0.4 makes 10 test steps on an MSE blow up
    trainer.train()
    record = evaluate_run(tmp_path / "run", show_progress=False)
    assert [r["shots"] for r in record["results"]] == [5, 10]
    assert all(math.isfinite(r["mean"]) for r in record["results"]) and "diverged" not in record
    val = evaluate_run(tmp_path / "run", show_progress=False, split="val")  # validation's tasks, not test's again
    assert "seed 2025" in val["split_description"] and val["results"][0]["mean"] != record["results"][0]["mean"]
    # commands that need classes (adapt, serve, graph) name a regression run as such (serve took it for images)
    from typer.testing import CliRunner

    from metalab.cli import app
    from metalab.engine.adapter import adapt_from_file
    from metalab.serve.model import ServedRun

    for make in (lambda: adapt_from_file(tmp_path / "run", tmp_path), lambda: ServedRun(tmp_path / "run")):
        with pytest.raises(ConfigError, match=r"is a regression run \(sinusoid tasks\).*use `metalab eval`"):
            make()
    result = CliRunner().invoke(app, ["graph", str(tmp_path / "run")])
    assert result.exit_code != 0 and "is a regression run (sinusoid tasks)" in str(result.exception), result.exception


def test_a_diverging_inner_loop_is_named_and_shots_are_evaluated_once(tmp_path):
    config = regression_run(tmp_path, algo_options={"inner_lr": 0.4})
    config.eval.settings = [[5, 1], [20, 1], [5, 5]]  # classification-style pairs: the ways mean nothing here
    logged = []
    MetaTrainer(config, tmp_path / "run", show_progress=False, log=logged.append).train()
    assert any("adaptation diverged" in str(m) and "inner_lr (now 0.4)" in str(m) for m in logged), logged
    record = evaluate_run(tmp_path / "run", show_progress=False)
    assert [r["shots"] for r in record["results"]] == [1, 5]
    assert "lower train.algo_options.inner_lr (now 0.4)" in record["diverged"]
    from metalab.report.html import build_report

    page = build_report(tmp_path / "run", show_progress=False).read_text()  # the report shows the table and the note
    assert "query MSE ± 95 % CI" in page and "<td>5-shot</td>" in page and "adaptation diverged" in page


def test_compare_keeps_each_adaptation_step_and_names_an_unevaluated_run(tmp_path):
    from metalab.report.html import build_comparison

    config = regression_run(tmp_path, steps=5)
    config.eval.adapt_steps = [1, 3]
    MetaTrainer(config, tmp_path / "a", show_progress=False, log=lambda m: None).train()
    evaluate_run(tmp_path / "a", show_progress=False)
    MetaTrainer(regression_run(tmp_path, steps=4), tmp_path / "b", show_progress=False, log=lambda m: None).train()
    page = build_comparison([tmp_path / "a", tmp_path / "b"], tmp_path / "compare").read_text()
    for row in ("5-shot MSE, 1 step", "5-shot MSE, 3 steps", "10-shot MSE, 1 step", "10-shot MSE, 3 steps"):
        row += f", {config.eval.episodes} episodes"  # (each figure says how many episodes it is the mean of)
        assert f"<td>{row}</td><td>" in page and f"<td>{row}</td><td>-" not in page, row  # one row each, a value in it
    assert "4 (not evaluated)" in page
