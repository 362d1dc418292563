"""Every classification algorithm on the canonical Omniglot split at one equal training budget.

    python -m benchmarks.zoo_omniglot --budget 240 --out benchmarks/results/zoo_omniglot.md

Each method meta-trains for ``--budget`` seconds of process CPU time (``budget_clock: cpu``, so
budgets stay equal when the machine is shared; 240 CPU-s ≈ 120 s of wall time on 2 idle cores) on meta-train (5 alphabets of
images_background_small1, rotations ×4, seed-0 validation carve-out), then is scored on the
106 meta-test characters (katakana, Sanskrit, Tagalog) in 5w1s, 5w5s, 20w1s and 20w5s:
mean ± 95 % CI over 600 episodes (15 queries per class), the same episodes for every method.
No method is left out for scoring badly.

``--steps N`` trains exactly N meta-steps instead (to compare settings at equal training), and
``--precision bf16`` trains with bfloat16 autocast (``train.precision``); e.g. the precision check
of the README: ``--methods protonet --steps 1500 --precision bf16`` against ``--precision fp32``.
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
from metalab.engine.config import MEMORY_FORMATS
from metalab.engine.eval_run import evaluate_run
from metalab.engine.precision import PRECISIONS

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


def config_for(algo: str, budget: float | None, episodes: int, steps: int | None = None, precision: str = "fp32",
               seed: int = 0, memory_format: str = "auto") -> RunConfig:
    """The zoo's run of ``algo``: ``budget`` CPU-seconds, or exactly ``steps`` steps when given."""
    episode, options, lr = METHODS[algo]
    length = {"steps": steps, "time_budget": None} if steps else {"steps": 1_000_000, "time_budget": budget, "anneal_by": "time"}
    return RunConfig.from_dict({
        "name": f"zoo-{algo}",
        "data": {"source": "omniglot", "rotations": True, "augment": False, "val_fraction": 0.1, "split_seed": 0},
        "train": {"algo": algo, "backbone": "conv4", **episode, "algo_options": options, "lr": lr, **length,
                  "budget_clock": "cpu", "val_every": 10_000, "checkpoint_every": 10_000, "seed": seed, "device": "cpu",
                  "precision": precision, "memory_format": memory_format},
        "eval": {"episodes": episodes, "settings": SETTINGS, "queries": 15, "seed": 2024},
    })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0, help="CPU-seconds of meta-training per method")
    parser.add_argument("--steps", type=int, help="train exactly this many meta-steps instead of a CPU budget "
                        "(to compare settings at equal training, e.g. --precision)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="training precision (train.precision)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (initialisation and episodes; the split stays seed 0)")
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                        help="conv4 layout (train.memory_format): contiguous = NCHW, tighter fp32 gradients on CPU")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo_omniglot.md"))
    args = parser.parse_args(argv)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="metalab-zoo-"))
    for algo in args.methods:
        cfg = config_for(algo, args.budget, args.episodes, args.steps, args.precision, args.seed, args.memory_format)
        start = time.perf_counter()
        trainer = MetaTrainer(cfg, root / algo, show_progress=False, log=lambda m: None)
        result = trainer.train()
        train_s = time.perf_counter() - start
        eval_start = time.perf_counter()
        record = evaluate_run(root / algo, show_progress=False)
        cells = [f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}" for r in record["results"]]
        rows.append((algo, result.steps, result.steps * cfg.train.meta_batch, cells, time.perf_counter() - eval_start, train_s))
        print(f"{algo:12s} steps {result.steps:5d} ({args.precision}, {train_s:.0f} s) | " + " | ".join(cells)
              + f" | eval {rows[-1][4]:.0f} s", flush=True)
        del trainer
    write_table(args, rows)


def write_table(args, rows) -> None:
    command = "python -m benchmarks.zoo_omniglot " + " ".join(sys.argv[1:])
    lines = [
        "# Omniglot zoo: every classification method at " + ("an equal number of steps" if args.steps else "an equal training budget"),
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}  ",
        (f"Length: {args.steps} meta-steps per method (conv4, 28×28, Adam, warm-up + cosine annealed over the steps), "
         f"seed {args.seed}, training precision {args.precision}, conv4 layout {args.memory_format}.  " if args.steps else
         f"Budget: {args.budget:.0f} CPU-seconds of meta-training per method (process CPU time, ≈ half that in wall "
         f"time on 2 idle cores; conv4, 28×28, Adam, warm-up + cosine annealed over the budget), seed {args.seed}, training "
         f"precision {args.precision}, conv4 layout {args.memory_format}.  "),
        "Split: meta-train = the 5 alphabets of images_background_small1 (122 characters after a seed-0 validation "
        "carve-out of 14, ×4 rotations); meta-test = katakana, Sanskrit, Tagalog (106 characters never trained on).  ",
        f"Evaluation: {args.episodes} episodes per setting, 15 queries per class, the same episodes for every method; "
        "mean accuracy (%) ± 95 % CI.",
        "",
        "| method | training episodes | steps | tasks seen | training wall s | 5w1s | 5w5s | 20w1s | 20w5s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, steps, tasks, cells, _, train_s in rows:
        ep, options, _ = METHODS[algo]
        desc = f"{ep['ways']}w{ep['shots']}s{ep['queries']}q ×{ep['meta_batch']}"
        if options:
            desc += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
        lines.append(f"| {algo} | {desc} | {steps} | {tasks} | {train_s:.0f} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
