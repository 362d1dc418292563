"""Meta-RL: environments (gymnasium API, determinism, vectorised == one by one), batched policy
gradients == per-task ones, learning beyond a margin, exact resume, the CLI, config errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from metalab.engine import RunConfig
from metalab.errors import ConfigError
from metalab.rl.base import adaptation_curve
from metalab.rl.envs import BanditEnv, BanditTasks, GymTaskFamily, Nav2DEnv, Nav2DTasks
from metalab.rl.pg import adapt_step, rollout
from metalab.rl.policy import Policy
from metalab.rl.trainer import RLTrainer, load_policy


@pytest.mark.filterwarnings("ignore::UserWarning")  # the checker's notes on unbounded / constant Box spaces, by design
def test_environments_follow_the_gymnasium_api():
    check_env(Nav2DEnv(), skip_render_check=True)
    check_env(BanditEnv(), skip_render_check=True)


def test_environments_are_deterministic_under_a_seed():
    nav = Nav2DTasks()
    assert torch.equal(nav.sample_tasks(5, torch.Generator().manual_seed(3)), nav.sample_tasks(5, torch.Generator().manual_seed(3)))
    policy = Policy(2, nav.action, (16,))
    tasks = nav.sample_tasks(3, torch.Generator().manual_seed(0))
    params = Policy.expand(policy.params(), 3)
    a = rollout(policy, nav, tasks, params, 4, torch.Generator().manual_seed(7))
    b = rollout(policy, nav, tasks, params, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a.obs, b.obs) and torch.equal(a.rewards, b.rewards)
    bandit = BanditTasks()
    bp = Policy(1, bandit.action, ())
    bt = bandit.sample_tasks(4, torch.Generator().manual_seed(1))
    x = rollout(bp, bandit, bt, Policy.expand(bp.params(), 4), 8, torch.Generator().manual_seed(2))
    y = rollout(bp, bandit, bt, Policy.expand(bp.params(), 4), 8, torch.Generator().manual_seed(2))
    assert torch.equal(x.actions, y.actions) and torch.equal(x.rewards, y.rewards)
    env = BanditEnv()
    first = [env.reset(seed=5) and [env.step(1)[1] for _ in range(10)]][0]
    again = [env.reset(seed=5) and [env.step(1)[1] for _ in range(10)]][0]
    assert first == again


def test_vectorised_rollouts_match_single_environments():
    nav = Nav2DTasks(horizon=30)
    policy = Policy(2, nav.action, (16,), init_log_std=-2.0)
    tasks = nav.sample_tasks(3, torch.Generator().manual_seed(0))
    traj = rollout(policy, nav, tasks, Policy.expand(policy.params(), 3), 2, torch.Generator().manual_seed(1))
    for i, goal in enumerate(tasks):
        for j in range(2):
            env = Nav2DEnv(goal.tolist(), horizon=30)
            obs, _ = env.reset(seed=0)
            for t in range(30):
                assert np.allclose(obs, traj.obs[i, j, t].numpy(), atol=1e-6)
                obs, reward, terminated, truncated, _ = env.step(traj.actions[i, j, t].numpy())
                assert abs(reward - float(traj.rewards[i, j, t])) < 1e-5 and not terminated
            assert truncated
    # the same environments through the generic gymnasium wrapper, stepped one by one
    family = GymTaskFamily("nav2d-gym", lambda task: Nav2DEnv(task.tolist(), horizon=30), nav.sample_tasks, 30)
    obs = family.reset(tasks, 2, torch.Generator().manual_seed(9))
    for t in range(30):
        assert torch.allclose(obs, traj.obs[:, :, t], atol=1e-6)
        obs, reward = family.step(traj.actions[:, :, t])
        assert torch.allclose(reward, traj.rewards[:, :, t], atol=1e-5)


def test_bandit_rewards_follow_the_arm_probabilities():
    bandit = BanditTasks(arms=5, horizon=1)
    tasks = bandit.sample_tasks(2, torch.Generator().manual_seed(0))
    assert (tasks[:, 0] == 0.5).all() and ((tasks[:, 1:] == 0.9).sum(1) == 1).all()
    bandit.reset(tasks, 20_000, torch.Generator().manual_seed(1))
    for arm in range(5):
        _, reward = bandit.step(torch.full((2, 20_000), arm))
        assert torch.allclose(reward.mean(1), tasks[:, arm], atol=0.02)


def test_batched_policy_gradient_equals_the_per_task_loop():
    nav = Nav2DTasks(horizon=20)
    policy = Policy(2, nav.action, (16, 16))
    tasks = nav.sample_tasks(4, torch.Generator().manual_seed(0))
    theta = policy.params()
    traj = rollout(policy, nav, tasks, Policy.expand(theta, 4), 5, torch.Generator().manual_seed(1))
    batched = adapt_step(policy, Policy.expand(theta, 4), traj, 0.99, 0.1)
    from metalab.rl.pg import Trajectories

    for i in range(4):
        one = Trajectories(traj.obs[i:i + 1], traj.actions[i:i + 1], traj.rewards[i:i + 1])
        single = adapt_step(policy, Policy.expand(theta, 1), one, 0.99, 0.1)
        for k in theta:
            assert torch.allclose(batched[k][i], single[k][0], atol=1e-5), k


def rl_config(algo="maml-rl", steps=40, **rl) -> RunConfig:
    return RunConfig.from_dict({"name": "rl", "train": {"algo": algo, "steps": steps, "meta_batch": 10, "lr": 0.05,
                                                         "log_every": 5, "checkpoint_every": 10, "seed": 0},
                                "rl": {"task": "bandit", "episodes": 10, "test_tasks": 100, **rl}})


def test_tiny_maml_rl_run_learns_to_adapt(tmp_path):
    """Bandits: after 40 meta-steps the one-step-adapted return beats the untrained policy's by a margin."""
    cfg = rl_config()
    RLTrainer(cfg, tmp_path / "run", show_progress=False, log=lambda m: None).train()
    _, policy, _ = load_policy(tmp_path / "run")
    family = BanditTasks()
    tasks = family.sample_tasks(100, torch.Generator().manual_seed(123))
    trained = adaptation_curve(policy, family, tasks, 1, 10, 0.99, 10.0, seed=5)
    untrained = adaptation_curve(Policy(1, family.action, ()), family, tasks, 1, 10, 0.99, 10.0, seed=5)
    assert trained.mean[1] > untrained.mean[1] + 0.5, (trained.mean, untrained.mean)  # returns over 10 pulls
    assert trained.mean[1] > max(trained.mean[0], 5.0) + 1.0  # it adapts, and beats always pulling the safe arm


def test_rl_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = RLTrainer(rl_config(steps=20), tmp_path / "full", show_progress=False, log=lambda m: None)
    full.train()
    part = RLTrainer(rl_config(steps=10), tmp_path / "part", show_progress=False, log=lambda m: None)
    part.train()
    (tmp_path / "part" / "config.yaml").write_text((tmp_path / "full" / "config.yaml").read_text())  # now 20 steps
    resumed = RLTrainer(RunConfig.load(tmp_path / "part" / "config.yaml"), tmp_path / "part", resume=True,
                        show_progress=False, log=lambda m: None)
    assert resumed.start_step == 10
    resumed.train()
    for k, v in full.policy.state_dict().items():
        assert torch.equal(v, resumed.policy.state_dict()[k]), k
    metrics = lambda run: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(metrics(tmp_path / "full")) == strip(metrics(tmp_path / "part"))


@pytest.mark.parametrize("raw,message", [
    ({"train": {"algo": "maml-rl"}}, "give a task family"),
    ({"train": {"algo": "protonet"}, "rl": {"task": "bandit"}}, "does not learn policies"),
    ({"train": {"algo": "maml-rl"}, "rl": {"task": "cartpole"}}, "rl.task='cartpole' is unknown"),
    ({"train": {"algo": "maml-rl"}, "rl": {"task": "nav2d", "episodes": 0}}, "rl.episodes=0 is invalid"),
])
def test_rl_config_errors_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(raw)


def test_cli_trains_and_evaluates_a_meta_rl_run(tmp_path):
    env = {**os.environ, "COLUMNS": "200", "METALAB_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "metalab", "train", "--task", "bandit", "--algo", "fomaml-rl", "--steps", "6",
                          "--meta-batch", "4", "--set", "rl.test_tasks=20", "--set", "rl.eval_steps=2",
                          "--out", str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "before adaptation" in out.stdout and "after 2 steps" in out.stdout and "scratch" in out.stdout
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [r["adaptation_steps"] for r in record["rl"]["fomaml-rl"]] == [0, 1, 2]
    assert (tmp_path / "run" / "adaptation_returns.png").stat().st_size > 5000
    again = subprocess.run([sys.executable, "-m", "metalab", "eval", str(tmp_path / "run")], capture_output=True, text=True,
                           env=env, timeout=240)
    assert again.returncode == 0 and json.loads((tmp_path / "run" / "eval.json").read_text())["rl"] == record["rl"]
    listed = subprocess.run([sys.executable, "-m", "metalab", "runs", "--json"], capture_output=True, text=True, env=env,
                            timeout=60)
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]  # the index of runs: task, status, returns
    assert (row["algo"], row["data"], row["steps"], row["status"]) == ("fomaml-rl", "bandit", 6, "done"), row
    last = record["rl"]["fomaml-rl"][-1]
    assert row["results"][0] == f"fomaml-rl: return {last['return']:.2f} ± {last['ci95']:.2f} (steps: 2)", row
    for command in (["graph", str(tmp_path / "run")], ["serve", "--run", str(tmp_path / "run"), "--port", "0"]):
        wrong = subprocess.run([sys.executable, "-m", "metalab", *command], capture_output=True, text=True, env=env, timeout=120)
        assert wrong.returncode == 2 and "is a meta-RL run" in wrong.stderr, wrong.stderr
    bad = subprocess.run([sys.executable, "-m", "metalab", "train", "--task", "maze", "--algo", "maml-rl", "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "rl.task='maze' is unknown" in bad.stderr and not (tmp_path / "bad").exists()


def test_ctrl_c_stops_rl_training_between_steps_and_checkpoints_that_step(tmp_path):
    import os
    import signal
    import threading

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C while it trains
    try:
        trainer = RLTrainer(rl_config(steps=100_000), tmp_path / "run", show_progress=False, log=lambda m: None)
        timer.start()
        result = trainer.train()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, before)
    assert result.stopped_by == "interrupted" and 0 < result.steps < 100_000
    assert (tmp_path / "run" / f"checkpoint-{result.steps:07d}.safetensors").exists()


def test_few_shot_options_on_a_meta_rl_run_are_refused_not_ignored(tmp_path):
    from typer.testing import CliRunner

    from metalab.cli import app
    from metalab.engine.adapter import adapt_from_file
    from metalab.errors import ConfigError

    RLTrainer(rl_config(steps=2), tmp_path / "run", show_progress=False, log=lambda m: None).train()
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--setting", "5w1s", "--episodes", "5"])
    assert result.exit_code != 0 and "--setting, --episodes apply to few-shot runs" in str(result.exception)
    with pytest.raises(ConfigError, match="is a meta-RL run .* holds a policy, not a classifier"):
        adapt_from_file(tmp_path / "run", tmp_path / "support.npz")  # not "must be an image folder"
