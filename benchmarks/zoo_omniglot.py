"""Every classification algorithm on the canonical Omniglot split at one equal training budget.

    python -m benchmarks.zoo_omniglot --budget 240 --out benchmarks/results/zoo_omniglot.md

Each method meta-trains for ``--budget`` seconds of process CPU time (``budget_clock: cpu``, so
budgets stay equal when the machine is shared; 240 CPU-s ≈ 120 s of wall time on 2 idle cores) on meta-train (5 alphabets of
images_background_small1, rotations ×4, seed-0 validation carve-out), then is scored on the
106 meta-test characters (katakana, Sanskrit, Tagalog) in 5w1s, 5w5s, 20w1s and 20w5s:
mean ± 95 % CI over 600 episodes (15 queries per class), the same episodes for every method.
No method is left out for scoring badly.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from metalab.engine import MetaTrainer, RunConfig
from metalab.engine.eval_run import evaluate_run

# Method → (training episodes, algorithm options, outer lr). Metric methods train on 20-way
# episodes, gradient-based methods on 5-way 1-shot meta-batches; test-time inner steps follow
# the MAML paper's Omniglot protocol (3 steps).
METHODS: dict[str, tuple[dict, dict, float]] = {
    "protonet": ({"ways": 20, "shots": 1, "queries": 5, "meta_batch": 1}, {}, 2e-3),
    "matchingnet": ({"ways": 20, "shots": 1, "queries": 5, "meta_batch": 1}, {}, 2e-3),
    "r2d2": ({"ways": 20, "shots": 1, "queries": 5, "meta_batch": 1}, {}, 2e-3),
    "anil": ({"ways": 5, "shots": 1, "queries": 15, "meta_batch": 8}, {"inner_lr": 0.5, "inner_steps": 5, "test_inner_steps": 10}, 2e-3),
    "maml": ({"ways": 5, "shots": 1, "queries": 15, "meta_batch": 16}, {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3}, 1e-3),
    "fomaml": ({"ways": 5, "shots": 1, "queries": 15, "meta_batch": 16}, {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3}, 1e-3),
    "metasgd": ({"ways": 5, "shots": 1, "queries": 15, "meta_batch": 16}, {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3}, 1e-3),
    "reptile": ({"ways": 5, "shots": 1, "queries": 15, "meta_batch": 8}, {"inner_lr": 0.1, "inner_steps": 5, "test_inner_steps": 5}, 1e-3),
    "baseline": ({"ways": 60, "shots": 1, "queries": 5, "meta_batch": 1}, {}, 2e-3),
    "baseline++": ({"ways": 60, "shots": 1, "queries": 5, "meta_batch": 1}, {}, 2e-3),
    "multitask": ({"ways": 60, "shots": 1, "queries": 5, "meta_batch": 1}, {}, 2e-3),
}
SETTINGS = [[5, 1], [5, 5], [20, 1], [20, 5]]


def config_for(algo: str, budget: float, episodes: int) -> RunConfig:
    episode, options, lr = METHODS[algo]
    return RunConfig.from_dict({
        "name": f"zoo-{algo}",
        "data": {"source": "omniglot", "rotations": True, "augment": False, "val_fraction": 0.1, "split_seed": 0},
        "train": {"algo": algo, "backbone": "conv4", **episode, "algo_options": options, "lr": lr, "steps": 1_000_000,
                  "time_budget": budget, "budget_clock": "cpu", "val_every": 10_000, "checkpoint_every": 10_000, "seed": 0, "device": "cpu"},
        "eval": {"episodes": episodes, "settings": SETTINGS, "queries": 15, "seed": 2024},
    })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0, help="CPU-seconds of meta-training per method")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo_omniglot.md"))
    args = parser.parse_args(argv)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="metalab-zoo-"))
    for algo in args.methods:
        cfg = config_for(algo, args.budget, args.episodes)
        start = time.perf_counter()
        trainer = MetaTrainer(cfg, root / algo, show_progress=False, log=lambda m: None)
        result = trainer.train()
        eval_start = time.perf_counter()
        record = evaluate_run(root / algo, show_progress=False)
        cells = [f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}" for r in record["results"]]
        rows.append((algo, result.steps, result.steps * cfg.train.meta_batch, cells, time.perf_counter() - eval_start))
        print(f"{algo:12s} steps {result.steps:5d} | " + " | ".join(cells) + f" | eval {rows[-1][4]:.0f} s", flush=True)
        del trainer
    write_table(args, rows)


def write_table(args, rows) -> None:
    command = "python -m benchmarks.zoo_omniglot " + " ".join(sys.argv[1:])
    lines = [
        "# Omniglot zoo: every classification method at an equal training budget",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}  ",
        f"Budget: {args.budget:.0f} CPU-seconds of meta-training per method (process CPU time, ≈ half that in wall "
        "time on 2 idle cores; conv4, 28×28, Adam, warm-up + cosine annealed over the budget), seed 0.  ",
        "Split: meta-train = the 5 alphabets of images_background_small1 (122 characters after a seed-0 validation "
        "carve-out of 14, ×4 rotations); meta-test = katakana, Sanskrit, Tagalog (106 characters never trained on).  ",
        f"Evaluation: {args.episodes} episodes per setting, 15 queries per class, the same episodes for every method; "
        "mean accuracy (%) ± 95 % CI.",
        "",
        "| method | training episodes | steps | tasks seen | 5w1s | 5w5s | 20w1s | 20w5s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo, steps, tasks, cells, _ in rows:
        ep, options, _ = METHODS[algo]
        desc = f"{ep['ways']}w{ep['shots']}s{ep['queries']}q ×{ep['meta_batch']}"
        if options:
            desc += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
        lines.append(f"| {algo} | {desc} | {steps} | {tasks} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
