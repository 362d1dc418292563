"""Few-shot evaluation as the field reports it: mean accuracy (or MSE for regression) ± 95 % CI
over many test episodes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from metalab.algorithms.base import Algorithm, accuracy
from metalab.data.sampler import EpisodeSampler
from metalab.data.source import LabelledSource
from metalab.engine import distributed
from metalab.engine.progress import progress_bar


@dataclass
class EvalResult:
    ways: int
    shots: int
    queries: int
    episodes: int
    mean: float  #: mean accuracy in [0, 1] (or mean squared error for regression) over episodes
    ci95: float  #: half-width of the 95 % confidence interval (1.96 · std / √episodes)
    metric: str = "accuracy"
    steps: int | None = None  #: adaptation steps, for gradient-based adaptation

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        what = f"{self.shots}-shot" + (f", {self.steps} steps" if self.steps else "")
        if self.metric == "mse":
            return f"{what}: MSE {self.mean:.3f} ± {self.ci95:.3f}"
        return f"{self.ways}-way {what}: {100 * self.mean:.2f} ± {100 * self.ci95:.2f} %"


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(n)


@torch.no_grad()
def encode_source(algorithm: Algorithm, source: LabelledSource, device: torch.device, batch_size: int = 1024) -> LabelledSource:
    """The source with every example replaced by its backbone features ``[M, D]`` (eval mode)."""
    params = algorithm.params()
    feats = []
    for i in range(0, source.x.shape[0], batch_size):
        x = source.x[i : i + batch_size].to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        feats.append(algorithm.encode(params, x).cpu())
    return LabelledSource(torch.cat(feats), source.y, source.class_names, source.class_domains,
                          source.domain_names, name=f"{source.name}:features", meta=source.meta)


def task_scores(algorithm: Algorithm, batch, features: bool, regression: bool = False, steps: int | None = None) -> torch.Tensor:
    """Per-task accuracy ``[T]`` (or MSE for regression) of adapting to each task of ``batch``."""
    if features:
        with torch.no_grad():
            logits = algorithm.classify_features(batch.support_x, batch.support_y, batch.query_x, batch.ways)
        return accuracy(logits, batch.query_y)
    params = algorithm.params()
    if regression:
        out = []
        for t in range(batch.tasks):
            predictor = algorithm.adapt(params, batch.support_x[t], batch.support_y[t], batch.ways, steps=steps)
            out.append(torch.nn.functional.mse_loss(predictor.logits(batch.query_x[t]), batch.query_y[t]))
        return torch.stack(out)
    return accuracy(algorithm.task_logits(params, batch).detach(), batch.query_y)


def evaluate_sampler(algorithm: Algorithm, sampler, episodes: int, device: torch.device | str = "cpu",
                     features: bool = False, regression: bool = False, steps: int | None = None,
                     description: str = "eval", show_progress: bool = True) -> torch.Tensor:
    """Scores of ``episodes`` tasks drawn from ``sampler`` (anything with ``tasks`` and ``sample(i)``)."""
    device = torch.device(device)
    was_training = algorithm.training
    algorithm.eval()
    try:
        ctx = distributed.current()  # under torchrun, ranks score interleaved batches, then gather
        batches = math.ceil(episodes / sampler.tasks)
        mine = range(ctx.rank, batches, ctx.world_size)
        scores: dict[int, torch.Tensor] = {}
        with progress_bar(description, len(mine), enabled=show_progress and ctx.is_main) as bar:
            for i in mine:
                batch = sampler.sample(i).to(device)
                scores[i] = task_scores(algorithm, batch, features, regression, steps).detach().cpu()
                bar.advance()
        if ctx.active:
            scores = {i: v for part in distributed.gather_objects(scores, ctx) for i, v in part.items()}
        return torch.cat([scores[i] for i in range(batches)])[:episodes]
    finally:
        algorithm.train(was_training)


def setting_unfit(source: LabelledSource, ways: int, shots: int, queries: int, split: str = "test") -> str | None:
    """Why ``ways``-way ``shots``-shot tasks with ``queries`` queries per class cannot be drawn from
    ``source``, the ``split`` split ("needs … but …"), or ``None`` when they can."""
    if ways > source.num_classes:
        return f"needs {ways} classes but the {split} split has {source.num_classes}"
    counts = source.class_counts()
    if int(counts.min()) < shots + queries:
        return (f"needs {shots + queries} examples per class ({shots} shot{'s' * (shots != 1)} + {queries} queries) but the {split} split's "
                f"'{source.class_names[int(counts.argmin())]}' has {int(counts.min())}")
    return None


def unfit_settings(source: LabelledSource, settings, queries: int, split: str = "test") -> dict[tuple[int, int], str]:
    """``{(ways, shots): why}`` for each ``[ways, shots]`` setting ``source`` cannot give (:func:`setting_unfit`)."""
    return {(w, k): why for w, k in settings if (why := setting_unfit(source, w, k, queries, split))}


def none_fits(unfit: dict[tuple[int, int], str], split: str = "test") -> str:
    """The start of the error when no setting fits: each one with its reason."""
    return f"No evaluation setting fits the {split} split ({'; '.join(f'{w}-way {k}-shot {why}' for (w, k), why in unfit.items())})"


def evaluate(
    algorithm: Algorithm,
    source: LabelledSource,
    ways: int,
    shots: int,
    queries: int = 15,
    episodes: int = 600,
    seed: int = 2024,
    tasks_per_batch: int = 50,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> EvalResult:
    """Accuracy of ``algorithm`` on ``episodes`` ``ways``-way ``shots``-shot tasks from ``source``.

    Episodes depend only on ``(seed, ways, shots, queries)``, so every algorithm and every run is
    scored on the same tasks. ``frozen_features`` algorithms encode the source once and classify
    episodes over features (same numbers, far less compute).
    """
    features = algorithm.frozen_features
    if features:
        was_training = algorithm.training
        algorithm.eval()
        data = encode_source(algorithm, source, torch.device(device))
        algorithm.train(was_training)
    else:
        data = source
    sampler = EpisodeSampler(data, ways, shots, queries, tasks=min(tasks_per_batch, episodes), seed=seed)
    values = evaluate_sampler(algorithm, sampler, episodes, device, features, description=f"eval {ways}w{shots}s",
                              show_progress=show_progress)
    mean, ci = mean_ci95(values)
    return EvalResult(ways, shots, queries, int(values.numel()), mean, ci)


def evaluate_regression(algorithm: Algorithm, family, steps: int, episodes: int = 600, device: torch.device | str = "cpu",
                        show_progress: bool = True) -> EvalResult:
    """Mean squared error on the query points after ``steps`` adaptation steps on each task's
    ``family.shots`` support points, over ``episodes`` tasks of ``family`` (a task family with the
    sampler interface, e.g. :class:`~metalab.data.sinusoid.SinusoidTasks`)."""
    ran = steps if steps is not None else getattr(algorithm, "test_inner_steps", None)  # recorded: "default" hides it
    values = evaluate_sampler(algorithm, family, episodes, device, regression=True, steps=steps,
                              description=f"eval {family.shots}-shot {ran} steps", show_progress=show_progress)
    mean, ci = mean_ci95(values)
    return EvalResult(1, family.shots, family.queries, int(values.numel()), mean, ci, metric="mse", steps=ran)


def divergence_note(algorithm: Algorithm, results: list[EvalResult]) -> str | None:
    """One sentence when adaptation blew up (a non-finite MSE) on some setting, naming the options
    that set its step size; ``None`` when every figure is finite."""
    bad = [r for r in results if not math.isfinite(r.mean)]
    if not bad:
        return None
    where = ", ".join(f"{r.shots}-shot" + (f" after {r.steps} steps" if r.steps is not None else "") for r in bad)
    lr = getattr(algorithm, "inner_lr", None)
    return (f"adaptation diverged (MSE {bad[0].mean}) at {where}: the inner loop's steps are too large for this loss; "
            f"lower train.algo_options.inner_lr (now {lr}) or test_inner_steps and train again.")
