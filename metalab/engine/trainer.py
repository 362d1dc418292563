"""The meta-training loop, shared by every algorithm.

Each step: draw meta-batch ``step`` (a pure function of the seed and the step), optionally
jitter it, take ``algorithm.meta_loss`` (under ``train.precision``), check it is finite, step
the optimiser. Validation, logging to ``metrics.jsonl`` and atomic checkpoints happen on fixed
step intervals, so a run resumed from a checkpoint retraces the uninterrupted run's numbers
exactly.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from metalab.algorithms import algorithm_norm, build_algorithm
from metalab.algorithms.base import Algorithm
from metalab.data.augment import random_affine
from metalab.data.text import is_text_spec
from metalab.data.catalog import is_task_family, load_splits, load_task_family, text_options
from metalab.data.episodes import Episodes
from metalab.data.planner import TaskPlanner
from metalab.data.sampler import EpisodeSampler
from metalab.data.source import LabelledSource
from metalab.data.splits import Splits
from metalab.engine.checkpoint import latest_good_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from metalab.engine.cpu_memory import keep_freed_memory
from metalab.engine.config import RunConfig
from metalab.engine.evaluate import divergence_note, evaluate, evaluate_regression, none_fits, unfit_settings
from metalab.engine.interrupt import StopRequest
from metalab.engine.precision import precision_note, training_precision
from metalab.engine.progress import progress_bar
from metalab.engine.small_data import fit_defaults
from metalab.engine.run import RunFolder
from metalab.engine.distributed import (all_mean, average_gradients, barrier, broadcast_parameters, check_divisible,
                                        from_main, init_distributed, sync_batch_norm)
from metalab.errors import CheckpointError, ConfigError, TrainingDiverged
from metalab.models import build_backbone


RNG_PREFIX = "rng."
PLANNER_PREFIX = "planner/"


def rng_state() -> dict[str, torch.Tensor]:
    """Global random generator states (episodes and jitter are step-seeded and need none)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def split_rng_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(model weights, RNG states)`` of a checkpoint's tensors (the task planner's are neither)."""
    model = {k: v for k, v in state.items() if not k.startswith((RNG_PREFIX, PLANNER_PREFIX))}
    rng = {k[len(RNG_PREFIX):]: v for k, v in state.items() if k.startswith(RNG_PREFIX)}
    return model, rng


def resume_point(run: RunFolder, log: Callable[[str], None], writer: bool = True):
    """The run's last good checkpoint ``(step, path, contents)``; ``None`` (metrics cleared by the
    ``writer``, training restarts from step 0) if it has none."""
    found = latest_good_checkpoint(run.path, warn=log)
    if found is None and list_checkpoints(run.path):  # every one damaged: refuse, and change nothing
        raise CheckpointError(f"Every checkpoint in run folder '{run.path}' is damaged, so there is nothing to resume "
                              "from; nothing was changed. Restore a good copy, or move the checkpoints aside to "
                              "train it again from step 0.")
    if found is None:
        log(f"No usable checkpoint in '{run.path}'; starting from step 0.")
        if writer:
            run.truncate_metrics(-1)
    return found


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` → a device this machine has (errors name ``field``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{field}='{name}' is not a device; use 'auto', 'cpu' or 'cuda[:N]'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}='{name}' but this machine has no CUDA GPU; use 'cpu' or 'auto'.")
    return device


def check_eval_fits(config: RunConfig, test: LabelledSource, log: Callable[[str], None] = print) -> None:
    """Before training: the run's ``eval.settings`` (and, for text, ``eval.full_task_shots``) that
    ``test`` cannot give are named now, as evaluation will leave them out; if no setting fits it is
    an error (else a run would train, then fail to evaluate)."""
    unfit = unfit_settings(test, config.eval.settings, config.eval.queries)
    if unfit and len(unfit) == len(config.eval.settings):
        raise ConfigError(f"{none_fits(unfit)}; set eval.settings (e.g. --set 'eval.settings=[[{min(5, test.num_classes)}, 1]]'), "
                          "lower eval.queries, or train with --no-eval.")
    for (w, k), why in unfit.items():
        log(f"evaluation will leave out {w}-way {k}-shot: it {why}.")
    if test.meta.get("modality") == "text":
        from metalab.engine.text_eval import full_task_unfit

        for shots in config.eval.full_task_shots:
            if why := full_task_unfit(test, shots):
                log(f"evaluation will leave out all test classes at {shots} shots: it {why}.")


def resolve_backbone(name: str, example_shape: tuple[int, ...], source: str) -> str:
    """``auto`` → ``conv4`` for images ``[C, H, W]``, ``diagonal`` for text embeddings (a full
    ``linear`` projection overfits the meta-train intents: see benchmarks/results), else ``mlp``."""
    if name != "auto":
        return name
    if len(example_shape) == 3:
        return "conv4"
    return "diagonal" if is_text_spec(source) else "mlp"


def build_model(config: RunConfig, example_shape: tuple[int, ...], device: torch.device, context: dict | None = None,
                backbone: torch.nn.Module | None = None) -> Algorithm:
    """The algorithm of ``config`` with freshly initialised (seeded) weights, on ``device``.
    ``context`` is what the data tells the algorithm (task kind, meta-train classes). ``backbone``:
    one already built (a tuned-encoder run's, in training); a tuned-encoder run otherwise gets the
    identity over its embeddings ``[D]``, as its encoder is applied before (inference)."""
    t = config.train
    torch.manual_seed(t.seed)
    regression = (context or {}).get("task") == "regression"
    norm = "none" if regression else algorithm_norm(t.algo)  # no normalisation for function regression
    if backbone is None and t.tune_encoder is not None:
        backbone = build_backbone("identity", tuple(example_shape))
    name = "given" if backbone is not None else resolve_backbone(t.backbone, tuple(example_shape), config.data.source)
    backbone = backbone if backbone is not None else build_backbone(name, tuple(example_shape), t.hidden, norm=norm)
    algorithm = build_algorithm(t.algo, backbone, t.algo_options, context).to(device)
    algorithm.task_threads = t.task_threads
    layout = t.memory_format
    if name in ("conv4", "conv4-spatial") and (layout == "channels_last" or (layout == "auto" and device.type == "cpu")):
        # channels-last weights and inputs: faster convolutions and pooling on CPU (MAML's step
        # 1.25x, the backbone alone 1.6x on 2 cores); the inputs need explicit channels-last
        # strides, else one-channel images keep the whole backbone in NCHW (Conv4.channels_last).
        # Its fp32 gradients are looser than NCHW's on CPU (PyTorch's channels-last batch norm sums
        # sequentially: MAML's middle blocks 1e-4 off float64 against 1e-5-1e-6 in NCHW;
        # benchmarks/grad_precision.py), hence train.memory_format: contiguous.
        algorithm = algorithm.to(memory_format=torch.channels_last)
        algorithm.backbone.channels_last = True
        # one compiled kernel for a one-channel first block (metalab.models.first_block), for every
        # method: its backward is differentiable again, so MAML's second order runs through it too
        # (ProtoNet's step 1.25x, ANIL's 1.15x, MAML's and FOMAML's 1.16x on 2 cores; README, speed)
        algorithm.backbone.fused_first_block = True
    return algorithm


def lr_at(config: RunConfig, progress: float) -> float:
    """Learning rate at ``progress`` in [0, 1] of the run: 5 % linear warm-up, then cosine to 0."""
    t = config.train
    if t.schedule == "constant":
        return t.lr
    warm = 0.05
    if progress < warm:
        return t.lr * (progress + 1e-3) / warm
    return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warm) / (1 - warm))))


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    stopped_by: str  #: 'steps', 'time_budget' or 'interrupted' (Ctrl-C; a checkpoint of the last step is kept)
    last: dict
    validation_seconds: float = 0.0  #: of ``seconds``, the time spent validating (wall clock)


class MetaTrainer:
    """Meta-trains ``config``'s algorithm into ``run_dir`` (new, or resumed with ``resume=True``)."""

    def __init__(self, config: RunConfig, run_dir: str | Path, splits: Splits | None = None, resume: bool = False,
                 show_progress: bool = True, log: Callable[[str], None] = print, check_eval: bool = False) -> None:
        """``check_eval``: before anything is trained or written, check what of the run's evaluation its
        test split can give (:func:`check_eval_fits`; `metalab train` evaluates when training ends)."""
        d, t = config.data, config.train
        self.device = resolve_device(t.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # reuse freed activations instead of page-faulting them in every step
        self.dist = init_distributed(self.device)
        check_divisible(t.meta_batch, self.dist)
        self.config, self.show_progress = config, show_progress and self.dist.is_main
        self.log = log if self.dist.is_main else (lambda *_: None)
        self.planner = None
        if is_task_family(d.source):
            self.splits = None
            self.sampler = load_task_family(d.source, shots=_max(t.shots), queries=t.queries, tasks=t.meta_batch, seed=t.seed)
            self.context, example_shape = {"task": "regression", "outputs": 1}, (1,)
            self.example_dtype = "float32"
        else:
            tuned = t.tune_encoder is not None  # episodes of text ids, through the encoder's trainable top layers
            self.splits = splits or load_splits(d.source, d.image_size, d.val_fraction, d.test_fraction, d.split_seed, d.rotations,
                                                     {**text_options(d), "progress": self.show_progress}, d.test_domains,
                                                     channels=d.channels, progress=self.show_progress, text_ids=tuned)
            train = self.splits.train
            if not resume:
                if tuned:
                    tuned_defaults(config, train.num_classes, self.log)
                fit_defaults(config, self.splits, self.log)
            self.planner = TaskPlanner(t.planner, train.num_classes, train.class_domains)
            if t.planner != "uniform" and self.dist.active:
                raise ConfigError(f"train.planner='{t.planner}' runs in a single process for now (its statistics are not "
                                  "synchronised across ranks); use train.planner=uniform under torchrun.")
            self.sampler = EpisodeSampler(train, _range(t.ways), _range(t.shots), t.queries, t.meta_batch, seed=t.seed,
                                          planner=self.planner)
            self.context = {"task": "classification", "num_classes": train.num_classes,
                            "class_domains": train.class_domains.tolist()}
            example_shape = tuple(train.x.shape[1:])
            self.example_dtype = str(train.x.dtype).removeprefix("torch.")  # uint8 inputs are scaled to 0-1
            if check_eval:
                check_eval_fits(config, self.splits.require("test"), self.log)
        backbone = None
        if self.splits is not None and t.tune_encoder is not None:
            backbone = build_tuned_backbone(config, self.splits, self.show_progress)
            self.context["tuned_encoder"] = {"first": backbone.first, "base": backbone.base_id,
                                             "features": list(backbone.features)}
            example_shape, self.example_dtype = (backbone.out_dim,), "float32"  # what the run's head sees at inference
        self.example_shape = list(example_shape)
        self.algorithm = build_model(config, example_shape, self.device, self.context, backbone)
        if t.init_from and not resume:  # (a resumed run has its own weights in its checkpoint)
            self.log(init_backbone_from(self.algorithm, t.init_from, config))
        if self.dist.active:
            if not getattr(self.algorithm, "per_task_norm", False):  # per-task statistics need no sync
                sync_batch_norm(self.algorithm)
            broadcast_parameters(self.algorithm, self.dist)
        if resume:
            self.run = RunFolder.open(run_dir)
            if self.dist.is_main:  # one process trains a run at a time (rank 0 holds the lock for its group)
                self.run.lock()
        else:  # rank 0 creates the folder; the others open it once it exists
            self.run = RunFolder.create(run_dir, config, lock=True) if self.dist.is_main else None
            barrier(self.dist)
            self.run = self.run or RunFolder.open(run_dir)
        if not any(p.requires_grad for p in self.algorithm.parameters()):
            raise ConfigError(f"'{t.algo}' with backbone '{t.backbone}' has nothing to train; pick a trainable backbone "
                              "(e.g. 'linear' or 'diagonal' for embeddings) — 'identity' is for evaluation only.")
        self.optimizer = torch.optim.Adam(self.algorithm.parameters(), lr=t.lr)
        if (note := precision_note(t.precision, self.device)) is not None:
            self.log(note)
        self.start_step, self.elapsed_before = 0, 0.0
        if resume:
            self._restore()

    def _restore(self) -> None:
        found = resume_point(self.run, self.log, self.dist.is_main)
        if found is None:
            return
        step, path, (model_state, optim_state, info) = found
        if self.planner is not None:
            self.planner.load_state_dict(model_state)
        model_state, rng = split_rng_state(model_state)
        self.algorithm.load_state_dict(model_state)
        set_rng_state(rng)
        if optim_state is not None:
            self.optimizer.load_state_dict(optim_state)
        self.start_step, self.elapsed_before = step, float(info.get("elapsed", 0.0))
        if self.dist.is_main:
            self.run.truncate_metrics(step)
        barrier(self.dist)  # nobody trains on until rank 0 has trimmed the metrics
        self.log(f"Resuming '{self.run.path}' from step {step} ({path.name}).")

    def save(self, step: int, elapsed: float) -> Path:
        path = self.run.checkpoint_path(step)
        if not self.dist.is_main:  # the weights are the same on every rank; rank 0 writes them
            return path
        info = {"step": step, "elapsed": elapsed, "algo": self.config.train.algo,
                "example_shape": self.example_shape, "example_dtype": self.example_dtype, "context": self.context}
        state = {**self.algorithm.state_dict(), **{f"{RNG_PREFIX}{k}": v for k, v in rng_state().items()},
                 **(self.planner.state_dict() if self.planner is not None and self.planner.strategy != "uniform" else {})}
        save_checkpoint(path, state, self.optimizer.state_dict(), info)
        self.run.prune_checkpoints(self.config.train.keep_checkpoints, newest=step)
        return path

    def _prepare(self, step: int) -> Episodes:
        batch = self.sampler.sample(step)
        if self.config.data.augment and batch.support_x.dim() == 5:
            g = torch.Generator().manual_seed(self.config.train.seed * 7919 + step)
            k = self.config.data.augment_strength
            for name in ("support_x", "query_x"):
                x = getattr(batch, name)
                setattr(batch, name, random_affine(x.flatten(0, 1), g, 10.0 * k, 0.1 * k, 0.1 * k).view_as(x))
        return batch.to(self.device)

    def validate(self) -> dict:
        e = self.config.eval
        if self.splits is None:  # a task family: fresh tasks from a held-out seed
            family = load_task_family(self.config.data.source, shots=_max(self.config.train.shots),
                                      queries=self.config.train.queries, tasks=e.tasks_per_batch, seed=e.seed + 1)
            res = evaluate_regression(self.algorithm, family, steps=None, episodes=self.config.train.val_episodes,
                                      device=self.device, show_progress=False)
            if note := divergence_note(self.algorithm, [res]):
                self.log(f"validation: {note}")
            return {"val_mse": res.mean, "val_ci95": res.ci95}
        val = self.splits.val
        if val is None or val.num_classes < 2:
            return {}
        ways = min(e.settings[0][0], val.num_classes)
        shots = e.settings[0][1]
        queries = max(1, min(e.queries, int(val.class_counts().min()) - shots))
        res = evaluate(self.algorithm, val, ways, shots, queries, self.config.train.val_episodes, seed=e.seed,
                       tasks_per_batch=e.tasks_per_batch, device=self.device, show_progress=False)
        return {"val_acc": res.mean, "val_ci95": res.ci95, "val_setting": f"{ways}w{shots}s"}

    def train(self) -> TrainResult:
        """Meta-train to ``train.steps`` (or the time budget, or Ctrl-C); the run folder's training
        lock is given back at the end, however training ends."""
        try:
            return self._train()
        finally:
            self.run.unlock()

    def _train(self) -> TrainResult:
        t = self.config.train
        clock = time.process_time if t.budget_clock == "cpu" else time.perf_counter
        start = clock()
        elapsed = lambda: self.elapsed_before + clock() - start  # noqa: E731
        self.algorithm.train()
        try:
            return self._train_loop(t, elapsed)
        finally:
            self.algorithm.training_progress = 1.0  # evaluation and adaptation: the end-of-training behaviour

    def _train_loop(self, t, elapsed: Callable[[], float]) -> TrainResult:
        step, stopped_by, last = self.start_step, "steps", {}
        # The schedule follows the steps: a time budget stops the run and never changes its learning rates,
        # so a run that finishes its steps ends on the same weights however busy the machine was. With
        # anneal_by 'time' it follows whichever runs out first; that clock leaves out this process's first
        # step (start-up: lazy set-up, cold caches), and does not run during it.
        first_spent, startup = None, None
        window_t, window_tasks, validating = time.perf_counter(), 0, 0.0
        with progress_bar(f"train {t.algo}", t.steps, enabled=self.show_progress, status=True) as bar, \
                StopRequest(enabled=not self.dist.active) as stop:
            bar.advance(step)
            while step < t.steps:
                spent = from_main(elapsed(), self.dist)  # every rank follows rank 0's clock
                if t.time_budget is not None and spent >= t.time_budget:
                    stopped_by = "time_budget"
                    break
                if stop.requested:  # Ctrl-C: between steps, where the weights are whole
                    stopped_by = "interrupted"
                    break
                if first_spent is None:
                    first_spent = spent
                elif startup is None:
                    startup = spent - first_spent
                progress = step / t.steps
                if t.anneal_by == "time" and startup is not None:  # anneal on whichever runs out first: steps or time
                    progress = max(progress, (spent - startup) / (t.time_budget - startup))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(self.config, progress)
                self.algorithm.training_progress = progress
                if self.planner is not None:
                    self.planner.progress = progress
                    if self.planner.strategy == "hard" and step % t.planner_refresh == 0:
                        self._refresh_neighbours()
                batch = self._prepare(step)
                if self.dist.active:  # this rank's contiguous share of the global meta-batch
                    batch = batch.split_tasks(self.dist.world_size, self.dist.rank)
                self.optimizer.zero_grad(set_to_none=True)
                with training_precision(t.precision, self.device):
                    loss, metrics = self.algorithm.meta_backward(self.algorithm.params(), batch)
                if self.dist.active:
                    metrics = all_mean({**metrics, "loss": float(loss)}, self.dist)
                    loss = torch.tensor(metrics["loss"])
                    average_gradients(self.algorithm, self.dist)
                if not torch.isfinite(loss):
                    self._diverged(step, loss)  # before the optimiser step: the weights stay good
                self.optimizer.step()
                step += 1
                if self.planner is not None and self.planner.strategy != "uniform" and step % t.planner_every == 0:
                    self._observe(batch)
                window_tasks += batch.tasks * self.dist.world_size
                _maybe_inject_fault(step, self.dist)
                if step % t.log_every == 0 or step == t.steps:
                    now = time.perf_counter()
                    last = {"step": step, **metrics, "lr": self.optimizer.param_groups[0]["lr"],
                            "tasks_per_s": window_tasks / max(now - window_t, 1e-9), "elapsed": elapsed()}
                    window_t, window_tasks = now, 0
                    if step % t.val_every == 0 or step == t.steps:
                        began = time.perf_counter()
                        last.update(self.validate())
                        validating += time.perf_counter() - began
                    if self.dist.is_main:
                        self.run.append_metrics(last)
                    shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                    bar.set(status=f"{shown} {last['tasks_per_s']:.0f} tasks/s")
                if step % t.checkpoint_every == 0:
                    self.save(step, elapsed())
                bar.advance()
        if step % t.checkpoint_every != 0 or step == 0:
            self.save(step, elapsed())
        barrier(self.dist)  # the last checkpoint is on disk (rank 0 wrote it) before any rank evaluates or resumes from it
        return TrainResult(self.run.path, step, elapsed(), stopped_by, last, validating)

    def _observe(self, batch: Episodes) -> None:
        """Feed the planner this meta-batch's query predictions (after the step: how the learner does now)."""
        logits = self.algorithm.task_logits(self.algorithm.params(), batch).detach()
        self.planner.observe(batch.classes.cpu(), batch.query_y.cpu(), logits.argmax(-1).cpu())

    @torch.no_grad()
    def _refresh_neighbours(self) -> None:
        """Hard-task mining: each training class's nearest classes under the current backbone."""
        from metalab.report.graph import class_prototypes, nearest_classes

        was_training = self.algorithm.training
        protos = class_prototypes(self.algorithm, self.splits.train, per_class=2, seed=self.config.train.seed)
        self.algorithm.train(was_training)
        self.planner.set_neighbours(nearest_classes(protos, self.config.train.planner_neighbours)[0])

    def _diverged(self, step: int, loss: torch.Tensor) -> None:
        found = [p.name for p in sorted(self.run.path.glob("checkpoint-*.safetensors"))]
        keep = f"the last good checkpoint is '{found[-1]}'" if found else "no checkpoint was written"
        raise TrainingDiverged(
            f"Meta-training stopped at step {step}: the loss became {loss.item()} (non-finite); {keep} in "
            f"'{self.run.path}'. Lower train.lr (now {self.config.train.lr}) or check the data for NaN/inf values."
        )


#: what a tuned-encoder run trains with where its config leaves a field out: many-way 5-shot
#: episodes (a new intent set has dozens of intents), a transformer's fine-tuning rate, and a
#: metric scale that makes the softmax over normalised features sharp
TUNED_DEFAULTS = {"train.lr": 3e-5, "train.ways": 32, "train.shots": 5, "train.queries": 5, "train.steps": 500,
                  "train.val_every": 100, "train.checkpoint_every": 100, "train.val_episodes": 100}


def tuned_defaults(config: RunConfig, train_classes: int, log: Callable[[str], None]) -> None:
    """Set :data:`TUNED_DEFAULTS` (and ProtoNet's ``metric_scale`` 10) on the fields a config read
    from a file or the command line left out (``config.given``), and say which."""
    given = getattr(config, "given", None)
    if given is None:  # a RunConfig built in Python: what it says is what it gets
        return
    t, changed = config.train, []
    for key, value in TUNED_DEFAULTS.items():
        if key not in given:
            field = key.split(".", 1)[1]
            value = min(value, train_classes) if field == "ways" else value
            if getattr(t, field) != value:
                setattr(t, field, value)
                changed.append(f"{key}={value}")
    options = dict(t.algo_options or {})
    if t.algo == "protonet" and "metric_scale" not in options:
        t.algo_options = {**options, "metric_scale": 10.0}
        changed.append("train.algo_options.metric_scale=10")
    if changed:
        log(f"tuned-encoder run: {', '.join(changed)} (set them to change)")


def build_tuned_backbone(config: RunConfig, splits: Splits, show_progress: bool = True):
    """The trainable top layers of ``config``'s encoder over the meta-train and validation texts
    (:class:`~metalab.models.text_tuned.TunedTextBackbone`)."""
    from metalab.models.text_encoder import load_encoder
    from metalab.models.text_tuned import TunedTextBackbone

    d, t = config.data, config.train
    encoder = load_encoder(d.encoder, layers=d.encoder_layers)
    ids = torch.cat([part.x.flatten() for part in (splits.train, splits.val) if part is not None])
    with progress_bar("encoder states below the tuned layers", len(ids), enabled=show_progress) as bar:
        backbone = TunedTextBackbone(encoder, splits.train.meta["texts"], ids, t.tune_encoder, t.tune_params,
                                     progress=bar.advance)
    backbone.base_id = encoder.model_id
    return backbone


def _maybe_inject_fault(step: int, ctx) -> None:
    """Fault injection for fault-tolerance tests: with ``METALAB_FAULT_AT_STEP=N`` the last rank
    dies abruptly (no clean-up, like ``kill -9``) after step N, on torchrun's first attempt only."""
    at = os.environ.get("METALAB_FAULT_AT_STEP")
    if at and step == int(at) and ctx.rank == ctx.world_size - 1 \
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os._exit(17)


def _range(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _max(value) -> int:
    return max(value) if isinstance(value, (list, tuple)) else value


def refuse_rl_run(path: Path, config: RunConfig) -> None:
    """One sentence for a command that needs a few-shot learner but was given a meta-RL run."""
    if config.rl.task is not None:
        raise ConfigError(f"'{path}' is a meta-RL run (rl.task={config.rl.task}): it holds a policy, not a "
                          "classifier; use `metalab eval` or `metalab report` on it.")


def refuse_regression_run(path: Path, config: RunConfig) -> None:
    """One sentence for a command that needs a classifier (adapt, predict, serve, graph) but was given
    a regression run (a task family such as ``sinusoid``)."""
    if is_task_family(config.data.source):
        raise ConfigError(f"'{path}' is a regression run ({config.data.source} tasks): it fits a function to a few "
                          "points and has no classes for this command; use `metalab eval` or `metalab report` on it.")


def init_backbone_from(algorithm: Algorithm, run_dir: str | Path, config: RunConfig) -> str:
    """Copy the backbone of run folder ``run_dir`` (its newest good checkpoint: weights, and
    running statistics where both backbones keep them) into ``algorithm``'s, whatever algorithm
    trained it (norm layers of both kinds share their scales and shifts). Refused in one sentence
    when the backbones differ in shape. Returns a line saying what was copied."""
    source_config, source, info = load_trained(run_dir, "cpu")
    theirs = source.backbone.state_dict()
    ours = algorithm.backbone.state_dict()
    mine = dict(algorithm.backbone.named_parameters())
    t, s = config.train, source_config.train
    missing = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
    if missing:
        raise ConfigError(f"train.init_from='{run_dir}' has a '{s.backbone}' backbone (hidden {s.hidden}) that does not fit "
                          f"this run's '{t.backbone}' (hidden {t.hidden}): {missing[0]} differs; train both with the same "
                          "train.backbone and train.hidden.")
    copied = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    with torch.no_grad():
        for k, v in copied.items():
            ours[k].copy_(v)
    return (f"backbone initialised from '{run_dir}' ({s.algo}, step {info['step']}): {len(copied)} tensors; "
            f"the head starts fresh")


def load_trained(run_dir: str | Path, device: str = "cpu", checkpoint: str | Path | None = None) -> tuple[RunConfig, Algorithm, dict]:
    """``(config, algorithm with trained weights, checkpoint info)`` of a run folder."""
    run = RunFolder.open(run_dir)
    config = run.config()
    refuse_rl_run(run.path, config)
    if checkpoint is not None:
        model_state, _, info = load_checkpoint(Path(checkpoint))
    else:
        problems: list[str] = []
        found = latest_good_checkpoint(run.path, warn=problems.append)
        if found is None:
            why = " ".join(p.removeprefix("warning: ").removesuffix(" Using the previous checkpoint.") for p in problems)
            raise CheckpointError(
                f"Run folder '{run.path}' has no usable checkpoint" + (f": {why}" if why else "; train it first (metalab train).")
            )
        for problem in problems:
            print(problem, file=sys.stderr)
        _, _, (model_state, _, info) = found
    model_state, _ = split_rng_state(model_state)
    dev = resolve_device(device, "device")
    algorithm = build_model(config, tuple(info["example_shape"]), dev, info.get("context"))
    if config.train.tune_encoder is not None:  # the tuned layers go to the run's encoder; the head sees its embeddings
        from metalab.models.text_tuned import encoder_state

        first = (info.get("context") or {}).get("tuned_encoder", {}).get("first")
        if first is None:
            raise CheckpointError(f"The checkpoint of '{run.path}' does not say which encoder layers it tuned; train it again.")
        config.data.tuned_encoder = encoder_state(model_state, int(first))
        model_state = {**{k: v for k, v in model_state.items() if not k.startswith("backbone.")},
                       **{f"backbone.{k}": v for k, v in algorithm.backbone.state_dict().items()}}
    try:
        algorithm.load_state_dict(model_state)
    except RuntimeError:
        raise CheckpointError(f"The checkpoint of '{run.path}' does not match its config.yaml (algorithm/backbone changed?); restore the original config.") from None
    return config, algorithm, info
