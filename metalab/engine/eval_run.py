"""Evaluate a trained run folder on its meta-test split (or fresh tasks of its task family) and
add to ``eval.json``."""

from __future__ import annotations

import time
from pathlib import Path

from metalab.data.catalog import is_task_family, load_splits, load_task_family, text_options
from metalab.engine.distributed import current
from metalab.engine.evaluate import EvalResult, divergence_note, evaluate, evaluate_regression, none_fits, unfit_settings
from metalab.engine.run import RunFolder
from metalab.engine.trainer import load_trained
from metalab.errors import ConfigError, DataError


def run_splits(config, show_progress: bool = False, example_shape=None):
    """The class splits a run was trained and is evaluated on (from its config; no rotation classes).
    ``example_shape``: the trained model's input shape, whose channels an image folder is read with
    (so a run keeps the channels it was trained on)."""
    d = config.data
    channels = example_shape[0] if example_shape is not None and len(example_shape) == 3 else d.channels
    return load_splits(d.source, d.image_size, d.val_fraction, d.test_fraction, d.split_seed, rotations=False,
                       text={**text_options(d), "progress": show_progress}, test_domains=d.test_domains, channels=channels,
                       progress=show_progress)


def evaluate_run(run_dir: str | Path, settings: list | None = None, episodes: int | None = None,
                 device: str = "cpu", show_progress: bool = True, split: str = "test") -> dict:
    """Score the run's latest good checkpoint on ``split`` for each ``[ways, shots]`` setting
    (regression: each shots × ``eval.adapt_steps``, on fresh tasks of seed ``eval.seed``, or for
    ``split="val"`` of validation's ``eval.seed + 1``); returns the record and, for the test split,
    adds it to ``eval.json`` (mean ± 95 % CI per setting; a result replaces only the one of the same
    setting, episodes and seed)."""
    config, algorithm, info = load_trained(run_dir, device)
    d, e = config.data, config.eval
    episodes = e.episodes if episodes is None else episodes
    if not isinstance(episodes, int) or episodes < 1:
        raise ConfigError(f"episodes={episodes!r} is invalid; evaluate on a positive number of episodes (600 is the field's norm).")
    results: list[EvalResult] = []
    record = {"run": str(run_dir), "step": info["step"], "algo": config.train.algo, "split": split}
    if split not in ("test", "val"):
        raise DataError(f"split='{split}' is unknown; use 'test' or 'val'.")
    if is_task_family(d.source):
        seed = e.seed if split == "test" else e.seed + 1  # validation's tasks, as the trainer draws them
        record["split_description"] = f"fresh '{d.source}' tasks drawn with seed {seed} (training used seed {config.train.seed})"
        for shots in dict.fromkeys(shots for _, shots in settings or e.settings):  # ways mean nothing here
            family = load_task_family(d.source, shots=shots, queries=e.queries, tasks=e.tasks_per_batch, seed=seed)
            for steps in e.adapt_steps or [None]:
                results.append(evaluate_regression(algorithm, family, steps, episodes, device, show_progress))
        if note := divergence_note(algorithm, results):
            record["diverged"] = note
        if split == "test":
            from metalab.report.sinusoid_plot import plot_sinusoid_adaptation

            family = load_task_family(d.source, shots=(settings or e.settings)[-1][1], queries=e.queries, tasks=3, seed=e.seed)
            plot = plot_sinusoid_adaptation(algorithm, family, Path(run_dir) / "adaptation.png",
                                            steps=tuple(e.adapt_steps or [algorithm.test_inner_steps]))
            record["figures"] = [plot.name]
    else:
        splits = run_splits(config, show_progress, info["example_shape"])
        source = splits.require(split)
        record["split_description"] = splits.description
        unfit = unfit_settings(source, settings or e.settings, e.queries, split)
        if settings and unfit:  # asked for by name: all of them, or an error
            (w, k), why = next(iter(unfit.items()))
            raise DataError(f"{w}-way {k}-shot {why}; lower ways, shots or eval.queries.")
        if unfit and len(unfit) == len(e.settings):
            raise DataError(f"{none_fits(unfit, split)}; pass --setting (e.g. 2w1s), set eval.settings or lower eval.queries.")
        record["left_out"] = [{"ways": w, "shots": k, "reason": why} for (w, k), why in unfit.items()]
        for ways, shots in settings or e.settings:
            if (ways, shots) in unfit:
                continue
            results.append(evaluate(algorithm, source, ways, shots, e.queries, episodes, seed=e.seed,
                                    tasks_per_batch=e.tasks_per_batch, device=device, show_progress=show_progress))
        if source.meta.get("modality") == "text":
            record["full_task"], record["full_task_left_out"] = _text_full_tasks(algorithm, splits, source, e, device, show_progress)
    record["evaluated_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    seed = e.seed + 1 if split == "val" and is_task_family(d.source) else e.seed  # (the seed the episodes were drawn with)
    record["results"] = [{**r.as_dict(), "seed": seed, "step": info["step"]} for r in results]
    if split == "test" and current().is_main:  # under torchrun every rank evaluated its share; rank 0 writes
        RunFolder.open(run_dir).write_eval(record)  # added to what eval.json held: nothing measured before is lost
    return record


def _text_full_tasks(algorithm, splits, source, e, device, show_progress: bool) -> tuple[list[dict], list[dict]]:
    """Every class of the evaluated split at once, at each of ``eval.full_task_shots``, with macro
    P/R/F1 and (CLINC150) out-of-scope rejection fitted on the validation split and ``oos_val``;
    and the shots left out (a class with fewer examples), with the reason."""
    from metalab.engine.text_eval import evaluate_full_task, full_task_unfit

    params = algorithm.params()
    algorithm.eval()

    def head(support_x, support_y, ways):
        return algorithm.adapt(params, support_x.to(device), support_y.to(device), ways).logits

    oos = source.meta.get("out_of_scope", {})
    oos_test, oos_val = oos.get("test"), oos.get("val")
    threshold_task = (splits.val, oos_val) if oos_val is not None and splits.val is not None and splits.val.num_classes >= 2 else None
    out, left_out = [], []
    for shots in e.full_task_shots:
        if why := full_task_unfit(source, shots):
            left_out.append({"shots": shots, "reason": why})
            continue
        rec = evaluate_full_task(head, source, shots, e.full_task_draws, seed=e.seed, oos_queries=oos_test,
                                 threshold_task=threshold_task, show_progress=show_progress)
        out.append(rec)
    return out, left_out
