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
    "protomaml": ({"ways": 5, "shots": 1, "queries": 15, "meta_batch": 16}, {"inner_lr": 0.1, "inner_steps": 1, "test_inner_steps": 3}, 1e-3),
    "reptile": ({"ways": 5, "shots": 1, "queries": 15, "meta_batch": 8}, {"inner_lr": 0.1, "inner_steps": 5, "test_inner_steps": 5}, 1e-3),
    "baseline": ({"ways": 60, "shots": 1, "queries": 5, "meta_batch": 1}, {}, 2e-3),
    "baseline++": ({"ways": 60, "shots": 1, "queries": 5, "meta_batch": 1}, {}, 2e-3),
    "multitask": ({"ways": 60, "shots": 1, "queries": 5, "meta_batch": 1}, {}, 2e-3),
}
SETTINGS = [[5, 1], [5, 5], [20, 1], [20, 5]]
GRADIENT_BASED = ("maml", "fomaml", "metasgd", "protomaml", "anil", "reptile")


def config_for(algo: str, budget: float | None, episodes: int, steps: int | None = None, precision: str = "fp32",
               seed: int = 0, memory_format: str = "auto", backbone: str = "conv4", overrides: dict | None = None,
               ) -> RunConfig:
    """The zoo's run of ``algo``: ``budget`` CPU-seconds, or exactly ``steps`` steps when given;
    ``overrides`` replace training-episode fields (ways, meta_batch, ...), ``lr`` or algorithm options."""
    episode, options, lr = METHODS[algo]
    episode, options = dict(episode), dict(options)
    for key, value in (overrides or {}).items():
        if key == "lr":
            lr = value
        elif key in episode:
            episode[key] = value
        else:
            options[key] = value
    length = {"steps": steps, "time_budget": None} if steps else {"steps": 1_000_000, "time_budget": budget, "anneal_by": "time"}
    return RunConfig.from_dict({
        "name": f"zoo-{algo}",
        "data": {"source": "omniglot", "rotations": True, "augment": False, "val_fraction": 0.1, "split_seed": 0},
        "train": {"algo": algo, "backbone": backbone, **episode, "algo_options": options, "lr": lr, **length,
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
    parser.add_argument("--backbone", default="conv4", help="conv4 (max-pool) or conv4-strided (the MAML paper's)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="score on meta-test, or on the validation classes (to choose settings without the test alphabets)")
    parser.add_argument("--pretrain", type=float, default=0.0, metavar="CPU_S",
                        help="spend this much of each gradient-based method's budget pre-training a ProtoNet on the same "
                        "backbone, then start the method's backbone from it (train.init_from); the budget stays the total")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training-episode field, lr or an algorithm option (YAML value), e.g. --set inner_lr=0.2")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo_omniglot.md"))
    args = parser.parse_args(argv)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="metalab-zoo-"))
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    pretrained, pretrain_s = None, 0.0
    for algo in args.methods:
        budget = args.budget
        cfg = config_for(algo, budget, args.episodes, args.steps, args.precision, args.seed, args.memory_format,
                         args.backbone, overrides)
        if args.pretrain and algo in GRADIENT_BASED:
            if pretrained is None:  # one ProtoNet for every method; its time is charged to each
                began = time.perf_counter()
                pre = config_for("protonet", args.pretrain, args.episodes, None, args.precision, args.seed,
                                 args.memory_format, args.backbone)
                pre.train.name = "zoo-pretrain"
                MetaTrainer(pre, root / "pretrain", show_progress=False, log=lambda m: None).train()
                pretrained, pretrain_s = root / "pretrain", time.perf_counter() - began
            cfg = config_for(algo, budget - args.pretrain, args.episodes, args.steps, args.precision, args.seed,
                             args.memory_format, args.backbone, overrides)
            cfg.train.init_from = str(pretrained)
        start = time.perf_counter()
        trainer = MetaTrainer(cfg, root / algo, show_progress=False, log=lambda m: None)
        result = trainer.train()
        train_s = time.perf_counter() - start + (pretrain_s if cfg.train.init_from else 0.0)
        eval_start = time.perf_counter()
        record = evaluate_run(root / algo, show_progress=False, split=args.split)
        cells = [f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}" for r in record["results"]]
        rows.append((algo, result.steps, result.steps * cfg.train.meta_batch, cells, time.perf_counter() - eval_start, train_s,
                     cfg))
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
        (f"Length: {args.steps} meta-steps per method (28×28, Adam, warm-up + cosine annealed over the steps), "
         f"seed {args.seed}, training precision {args.precision}, conv4 layout {args.memory_format}.  " if args.steps else
         f"Budget: {args.budget:.0f} CPU-seconds of meta-training per method (process CPU time, ≈ half that in wall "
         f"time on 2 idle cores; 28×28, Adam, warm-up + cosine annealed over the budget), seed {args.seed}, training "
         f"precision {args.precision}, conv4 layout {args.memory_format}.  "),
        "Split: meta-train = the 5 alphabets of images_background_small1 (122 characters after a seed-0 validation "
        "carve-out of 14, ×4 rotations); meta-test = katakana, Sanskrit, Tagalog (106 characters never trained on).  ",
        f"Scored on: {'meta-test' if args.split == 'test' else 'the 14 validation characters (no rotation classes, so 5-way settings only), to choose settings'}.  ",
        f"Evaluation: {args.episodes} episodes per setting, 15 queries per class, the same episodes for every method; "
        "mean accuracy (%) ± 95 % CI.",
        "",
        "| method | training episodes | steps | tasks seen | training wall s | 5w1s | 5w5s | 20w1s | 20w5s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, steps, tasks, cells, _, train_s, cfg in rows:
        t = cfg.train
        desc = f"{t.ways}w{t.shots}s{t.queries}q ×{t.meta_batch}, lr {t.lr:g}, {t.backbone}"
        if t.algo_options:
            desc += " (" + ", ".join(f"{k}={v}" for k, v in t.algo_options.items()) + ")"
        if t.init_from:
            desc += f"; backbone from a {args.pretrain:.0f} CPU-s ProtoNet, within the budget"
        lines.append(f"| {algo} | {desc} | {steps} | {tasks} | {train_s:.0f} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
