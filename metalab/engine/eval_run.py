"""Evaluate a trained run folder on its meta-test split and record ``eval.json``."""

from __future__ import annotations

import time
from pathlib import Path

from metalab.data.catalog import load_splits
from metalab.engine.evaluate import EvalResult, evaluate
from metalab.engine.run import RunFolder
from metalab.engine.trainer import load_trained
from metalab.errors import DataError


def evaluate_run(run_dir: str | Path, settings: list | None = None, episodes: int | None = None,
                 device: str = "cpu", show_progress: bool = True, split: str = "test") -> dict:
    """Score the run's latest good checkpoint on ``split`` for each ``[ways, shots]`` setting;
    writes (and returns) ``eval.json`` with mean ± 95 % CI per setting."""
    config, algorithm, info = load_trained(run_dir, device)
    d, e = config.data, config.eval
    splits = load_splits(d.source, d.image_size, d.val_fraction, d.test_fraction, d.split_seed, rotations=False)
    source = {"test": splits.test, "val": splits.val}.get(split)
    if source is None:
        raise DataError(f"split='{split}' is unknown; use 'test' or 'val'.")
    results: list[EvalResult] = []
    for ways, shots in settings or e.settings:
        if ways > source.num_classes:
            raise DataError(f"{ways}-way evaluation needs {ways} classes but the {split} split has {source.num_classes}; lower ways.")
        results.append(evaluate(algorithm, source, ways, shots, e.queries, episodes or e.episodes, seed=e.seed,
                                tasks_per_batch=e.tasks_per_batch, device=device, show_progress=show_progress))
    record = {
        "run": str(run_dir), "step": info["step"], "algo": config.train.algo, "split": split,
        "split_description": splits.description, "evaluated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": [r.as_dict() for r in results],
    }
    if split == "test":
        RunFolder.open(run_dir).write_eval(record)
    return record
