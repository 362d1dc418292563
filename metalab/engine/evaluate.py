"""Few-shot evaluation as the field reports it: mean accuracy ± 95 % CI over many test episodes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from metalab.algorithms.base import Algorithm, accuracy
from metalab.data.sampler import EpisodeSampler
from metalab.data.source import LabelledSource
from metalab.engine.progress import progress_bar


@dataclass
class EvalResult:
    ways: int
    shots: int
    queries: int
    episodes: int
    mean: float  #: mean accuracy over episodes, in [0, 1]
    ci95: float  #: half-width of the 95 % confidence interval (1.96 · std / √episodes)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.ways}-way {self.shots}-shot: {100 * self.mean:.2f} ± {100 * self.ci95:.2f} %"


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
    device = torch.device(device)
    was_training = algorithm.training
    algorithm.eval()
    try:
        features = algorithm.frozen_features
        data = encode_source(algorithm, source, device) if features else source
        sampler = EpisodeSampler(data, ways, shots, queries, tasks=min(tasks_per_batch, episodes), seed=seed)
        params = algorithm.params()
        accs = []
        batches = math.ceil(episodes / sampler.tasks)
        with progress_bar(f"eval {ways}w{shots}s", batches, enabled=show_progress) as bar:
            for i in range(batches):
                batch = sampler.sample(i).to(device)
                with torch.no_grad() if features else torch.enable_grad():
                    if features:
                        logits = algorithm.classify_features(batch.support_x, batch.support_y, batch.query_x, ways)
                    else:
                        logits = algorithm.task_logits(params, batch)
                accs.append(accuracy(logits.detach(), batch.query_y).cpu())
                bar.advance()
        values = torch.cat(accs)[:episodes]
        mean, ci = mean_ci95(values)
        return EvalResult(ways, shots, queries, int(values.numel()), mean, ci)
    finally:
        algorithm.train(was_training)
