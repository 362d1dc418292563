"""Second-order MAML: metalab against the learn2learn-style reference at equal training.

    python -m benchmarks.maml_accuracy --steps 300 --out benchmarks/results/maml_accuracy.md
    python -m benchmarks.maml_accuracy --arms metalab --memory-format contiguous --out ...   # metalab in NCHW

The speed table (:mod:`benchmarks.speed`) times one meta-step; this checks that metalab's faster
step does not buy its speed with accuracy. Both arms meta-train from the same seed on the *same*
meta-batches (the zoo's Omniglot split: meta-train alphabets with rotations; 5-way 1-shot,
15 queries, meta-batch 32 as in the speed table), with Adam at the same learning rate and the
trainer's schedule (5 % warm-up, cosine), inner lr 0.4 and 1 inner step; then both adapt with
``--test-steps`` steps (lr 0.4) to the same 600 5-way 1-shot episodes of the unseen meta-test
alphabets. Printed and written: accuracy ± 95 % CI, training wall time and s/step per arm.

By default the arms are the methods as each library defines them, not two renderings of one
network: the reference is learn2learn's Omniglot CNN with a ``Linear(64, 5)`` head cloned and
adapted per task (:mod:`benchmarks.reference_l2l`); metalab's MAML starts every class's head from
one learned row (Ye & Chao 2022, :mod:`metalab.algorithms.maml`). With ``--head per-class``
metalab uses the reference's head, and both arms then start from bit-identical weights (same
seed, same layer order), so they differ only in float rounding and in the dropped round-off
gradients of conv biases before a norm.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import reference_l2l as ref
from benchmarks.zoo_omniglot import config_for
from metalab.algorithms.base import Predictor
from metalab.engine import MetaTrainer, RunConfig
from metalab.engine.config import MEMORY_FORMATS
from metalab.engine.evaluate import evaluate
from metalab.engine.trainer import lr_at


class ReferenceLearner(nn.Module):
    """The reference's MAML wrapped in the two calls :func:`~metalab.engine.evaluate.evaluate`
    makes (``params`` and ``task_logits``): each task adapts a fresh clone for ``steps`` steps."""

    frozen_features = False

    def __init__(self, maml: ref.ReferenceMAML, steps: int) -> None:
        super().__init__()
        self.maml, self.steps = maml, steps

    def params(self) -> dict[str, torch.Tensor]:
        return {}

    def adapt(self, params, support_x, support_y, ways) -> Predictor:
        learner = ref.ReferenceMAML(ref.clone_module(self.maml.module), self.maml.lr, first_order=True)
        with torch.enable_grad():
            for _ in range(self.steps):
                learner.adapt(F.cross_entropy(learner(support_x), support_y))
        return Predictor(lambda x: learner(x).detach(), {})

    def task_logits(self, params, batch) -> torch.Tensor:
        return torch.stack([self.adapt(params, batch.support_x[t], batch.support_y[t], batch.ways).logits(batch.query_x[t])
                            for t in range(batch.tasks)])


def config(steps: int, meta_batch: int, test_steps: int, seed: int, episodes: int, memory_format: str = "auto",
           head: str = "row") -> RunConfig:
    cfg = config_for("maml", None, episodes, steps=steps, seed=seed, memory_format=memory_format).to_dict()
    cfg["train"]["meta_batch"] = meta_batch
    cfg["train"]["algo_options"] = {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": test_steps, "head": head}
    cfg["eval"]["settings"] = [[5, 1]]
    return RunConfig.from_dict(cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="meta-steps per arm")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--test-steps", type=int, default=10, help="adaptation steps at test time (both arms)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                        help="metalab's conv4 layout (train.memory_format; contiguous = NCHW)")
    parser.add_argument("--head", choices=("row", "per-class"), default="row",
                        help="metalab's MAML head (algo_options.head): one shared row, or the reference's Linear(64, 5)")
    parser.add_argument("--arms", nargs="+", choices=("metalab", "reference"), default=["metalab", "reference"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/maml_accuracy.md"))
    args = parser.parse_args(argv)
    cfg = config(args.steps, args.meta_batch, args.test_steps, args.seed, args.episodes, args.memory_format, args.head)
    root = Path(tempfile.mkdtemp(prefix="metalab-maml-accuracy-"))

    trainer = MetaTrainer(cfg, root / "metalab", show_progress=False, log=lambda m: None)  # (also the reference's batches)
    test = trainer.splits.test
    rows = []
    if "metalab" in args.arms:
        start = time.perf_counter()
        trainer.train()  # (its time includes one validation pass at the last step and the checkpoint)
        seconds = time.perf_counter() - start
        result = evaluate(trainer.algorithm, test, 5, 1, 15, args.episodes, seed=cfg.eval.seed, show_progress=False)
        rows.append((f"metalab (`--algo maml`, head {args.head}, layout {args.memory_format})", result, seconds))
    if "reference" in args.arms:
        torch.manual_seed(args.seed)
        maml = ref.ReferenceMAML(ref.omniglot_cnn(5), lr=0.4)
        optimizer = torch.optim.Adam(maml.parameters(), cfg.train.lr)
        start = time.perf_counter()
        for step in range(args.steps):  # the trainer's meta-batches and learning-rate schedule
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step / args.steps)
            ref.meta_step(maml, optimizer, trainer._prepare(step))
        seconds = time.perf_counter() - start
        result = evaluate(ReferenceLearner(maml, args.test_steps), test, 5, 1, 15, args.episodes, seed=cfg.eval.seed,
                          show_progress=False)
        rows.append(("reference (learn2learn clone/adapt loop)", result, seconds))
    for name, result, seconds in rows:
        print(f"{name}: {args.steps} steps in {seconds:.0f} s ({seconds / args.steps:.2f} s/step), "
              f"5w1s {100 * result.mean:.1f} ± {100 * result.ci95:.1f} %", flush=True)

    command = "python -m benchmarks.maml_accuracy " + " ".join(sys.argv[1:])
    lines = [
        "# Second-order MAML: metalab against the learn2learn-style reference at equal training",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}  ",
        f"Training: {args.steps} meta-steps of {args.meta_batch} 5-way 1-shot 15-query tasks, the same meta-batches for "
        f"both arms (Omniglot meta-train alphabets with rotations), Adam lr {cfg.train.lr} with 5 % warm-up and cosine "
        f"annealing, inner lr 0.4, 1 inner step, second order, seed {args.seed}.  ",
        f"Evaluation: the same {args.episodes} 5-way 1-shot episodes (15 queries) of the unseen meta-test alphabets, "
        f"{args.test_steps} adaptation steps at lr 0.4; mean accuracy ± 95 % CI. metalab's training time includes one "
        f"validation pass ({cfg.train.val_episodes} episodes) and a checkpoint; the step-time comparison is "
        f"`python -m benchmarks.speed`.",
        "",
        "| arm | 5w1s accuracy | training wall s | s/step |",
        "|---|---|---|---|",
    ] + [f"| {name} | {100 * r.mean:.1f} ± {100 * r.ci95:.1f} | {seconds:.0f} | {seconds / args.steps:.2f} |"
         for name, r, seconds in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
