"""Meta-RL training and evaluation in a run folder: the same config, metrics, atomic checkpoints,
exact resume and time budget as the supervised engine; ``eval.json`` holds return vs adaptation
steps (mean ± 95 % CI over fresh test tasks) and ``adaptation_returns.png`` plots it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from metalab.engine.checkpoint import latest_good_checkpoint, save_checkpoint
from metalab.engine.config import RunConfig
from metalab.engine.interrupt import StopRequest
from metalab.engine.progress import progress_bar
from metalab.engine.run import RunFolder
from metalab.engine.trainer import resume_point
from metalab.errors import CheckpointError, TrainingDiverged
from metalab.rl.base import AdaptationCurve, MetaRLLearner, adaptation_curve
from metalab.rl.envs import make_family
from metalab.rl.maml_rl import MAMLRL
from metalab.rl.policy import Policy
from metalab.rl.pretrained_rl import PretrainedRL
from metalab.rl.reptile_rl import ReptileRL

GENERATOR_KEY = "rng/episodes"


def build_family(config: RunConfig):
    return make_family(config.rl.task, config.rl.horizon, config.rl.arms)


def build_policy(config: RunConfig, family, seed: int | None = None) -> Policy:
    torch.manual_seed(config.train.seed if seed is None else seed)
    hidden = config.rl.hidden if config.rl.hidden is not None else ([100, 100] if config.rl.task == "nav2d" else [])
    return Policy(family.obs_dim, family.action, tuple(hidden))


def inner_lr(config: RunConfig) -> float:
    """The adaptation step size: ``rl.inner_lr``, else the task's default (normalised advantages
    make one step small; a bandit's logits need a large one to commit to an arm)."""
    if config.rl.inner_lr is not None:
        return config.rl.inner_lr
    return 0.1 if config.rl.task == "nav2d" else 10.0


def build_learner(config: RunConfig, policy: Policy, family) -> MetaRLLearner:
    r = config.rl
    args = (policy, family, inner_lr(config), r.inner_steps, r.episodes, r.gamma)
    algo = config.train.algo
    if algo in ("maml-rl", "fomaml-rl"):
        return MAMLRL(*args, first_order=algo == "fomaml-rl")
    if algo == "reptile-rl":
        return ReptileRL(*args)
    return PretrainedRL(*args)


@dataclass
class RLTrainResult:
    run_dir: Path
    steps: int
    seconds: float
    stopped_by: str  #: 'steps', 'time_budget' or 'interrupted', as the few-shot trainer's


class RLTrainer:
    def __init__(self, config: RunConfig, run_dir: str | Path, resume: bool = False, show_progress: bool = True,
                 log=print) -> None:
        self.config, self.log, self.show_progress = config, log, show_progress
        self.run = RunFolder.open(run_dir) if resume else RunFolder.create(run_dir, config, lock=True)
        self.run.lock()  # (one process trains a run at a time; a no-op after create)
        self.family = build_family(config)
        self.policy = build_policy(config, self.family)
        self.learner = build_learner(config, self.policy, self.family)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=config.train.lr)
        self.generator = torch.Generator().manual_seed(config.train.seed + 1)
        self.start_step, self.elapsed_before = 0, 0.0
        if resume:
            self._restore()

    def _restore(self) -> None:
        found = resume_point(self.run, self.log)
        if found is None:
            return
        step, path, (state, optim_state, info) = found
        self.generator.set_state(state.pop(GENERATOR_KEY))
        self.policy.load_state_dict(state)
        if optim_state is not None:
            self.optimizer.load_state_dict(optim_state)
        self.start_step, self.elapsed_before = step, float(info.get("elapsed", 0.0))
        self.run.truncate_metrics(step)
        self.log(f"Resuming '{self.run.path}' from step {step} ({path.name}).")

    def save(self, step: int, elapsed: float) -> None:
        state = {**self.policy.state_dict(), GENERATOR_KEY: self.generator.get_state()}
        info = {"step": step, "elapsed": elapsed, "algo": self.config.train.algo, "task": self.config.rl.task}
        save_checkpoint(self.run.checkpoint_path(step), state, self.optimizer.state_dict(), info)
        self.run.prune_checkpoints(self.config.train.keep_checkpoints, newest=step)

    def train(self) -> RLTrainResult:
        """Meta-train the policy; the run folder's training lock is given back at the end."""
        try:
            return self._train()
        finally:
            self.run.unlock()

    def _train(self) -> RLTrainResult:
        t, r = self.config.train, self.config.rl
        start = time.perf_counter()
        step, stopped_by = self.start_step, "steps"
        elapsed = lambda: self.elapsed_before + time.perf_counter() - start  # noqa: E731
        with progress_bar(f"{t.algo} on {r.task}", t.steps, enabled=self.show_progress, status=True) as bar, \
                StopRequest() as stop:
            bar.advance(step)
            while step < t.steps:
                if t.time_budget is not None and elapsed() >= t.time_budget:
                    stopped_by = "time_budget"
                    break
                if stop.requested:  # Ctrl-C: between steps, where the weights are whole
                    stopped_by = "interrupted"
                    break
                tasks = self.family.sample_tasks(t.meta_batch, self.generator)
                self.optimizer.zero_grad(set_to_none=True)
                stats = self.learner.meta_gradient(tasks, self.generator)
                if not all(torch.isfinite(p.grad).all() for p in self.policy.parameters() if p.grad is not None):
                    raise TrainingDiverged(f"The meta-gradient became NaN/inf at step {step + 1}; the last good checkpoint "
                                           f"is kept. Lower train.lr or rl.inner_lr.")
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), r.grad_clip)
                self.optimizer.step()
                step += 1
                if step % t.log_every == 0 or step == t.steps:
                    self.run.append_metrics({"step": step, "time": round(elapsed(), 3), **{k: round(v, 5) for k, v in stats.items()}})
                if step % t.checkpoint_every == 0:
                    self.save(step, elapsed())
                bar.advance(1, status=f"return after adaptation {stats['return_after']:.2f}")
        self.save(step, elapsed())
        return RLTrainResult(self.run.path, step, elapsed() - self.elapsed_before, stopped_by)


def load_policy(run_dir: str | Path) -> tuple[RunConfig, Policy, dict]:
    run = RunFolder.open(run_dir)
    config = run.config()
    found = latest_good_checkpoint(run.path, warn=print)
    if found is None:
        raise CheckpointError(f"Run folder '{run.path}' has no usable checkpoint; train it first (metalab train --task …).")
    _, _, (state, _, info) = found
    state.pop(GENERATOR_KEY, None)
    policy = build_policy(config, build_family(config))
    policy.load_state_dict(state)
    return config, policy, info


def evaluate_rl_run(run_dir: str | Path, scratch: bool = True) -> dict:
    """Return before and after 1..``rl.eval_steps`` adaptation steps on ``rl.test_tasks`` fresh tasks
    (seed ``eval.seed``), for the run's policy and (``scratch``) an untrained policy adapted the same
    way; writes ``eval.json`` and ``adaptation_returns.png``."""
    config, policy, info = load_policy(run_dir)
    r = config.rl
    family = build_family(config)
    tasks = family.sample_tasks(r.test_tasks, torch.Generator().manual_seed(config.eval.seed))
    lr = inner_lr(config)
    curves = {config.train.algo: adaptation_curve(policy, family, tasks, r.eval_steps, r.episodes, r.gamma, lr,
                                                  seed=config.eval.seed + 1)}
    if scratch:
        fresh = build_policy(config, family, seed=config.train.seed + 10_000)
        curves["scratch (untrained)"] = adaptation_curve(fresh, family, tasks, r.eval_steps, r.episodes, r.gamma,
                                                         lr, seed=config.eval.seed + 1)
    record = {"run": str(run_dir), "step": info["step"], "algo": config.train.algo, "task": r.task,
              "split": f"{r.test_tasks} fresh '{r.task}' tasks drawn with seed {config.eval.seed} "
                       f"(training drew its tasks from seed {config.train.seed + 1})",
              "protocol": f"{r.episodes} episodes per task per step, policy-gradient step size {lr}",
              "rl": {name: c.record() for name, c in curves.items()}}
    plot_returns(curves, Path(run_dir) / "adaptation_returns.png", f"{r.task}: return vs adaptation steps")
    record["figures"] = ["adaptation_returns.png"]
    RunFolder.open(run_dir).write_eval(record)
    return record


def plot_returns(curves: dict[str, AdaptationCurve], path: Path, title: str) -> Path:
    """Mean return ± 95 % CI against adaptation steps, one line per policy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, c in curves.items():
        mean, ci = torch.tensor(c.mean), torch.tensor(c.ci95)
        ax.plot(c.steps, mean, marker="o", label=name)
        ax.fill_between(c.steps, mean - ci, mean + ci, alpha=0.2)
    ax.set_xlabel("policy-gradient adaptation steps")
    ax.set_ylabel(f"mean return ({next(iter(curves.values())).tasks} test tasks)")
    ax.set_xticks(next(iter(curves.values())).steps)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
