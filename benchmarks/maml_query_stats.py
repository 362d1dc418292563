"""How MAML's batch-statistics norms should treat queries: in training, and at prediction.

A MAML-family backbone (``task-batch`` norm) normalises each support set by its own statistics in
the inner loop. For the queries there are two choices, each measured here on the canonical Omniglot
split (the zoo's FOMAML recipe, ``--steps`` meta-steps, then 200 test episodes per setting, the same
episodes for every arm):

* in training (``algo_options.query_stats``): ``batch`` — the queries' own batch statistics (MAML's
  original, transductive training) — or ``support`` — the support's statistics under the adapted
  weights, as at prediction;
* at prediction: the support's statistics (what ``Predictor`` does now: an input's scores depend on
  it and the adapted model only) or, for comparison, the transductive scores the library gave before
  (the query batch's statistics: a prediction changed with the rest of the batch).

    python -m benchmarks.maml_query_stats [--algo fomaml] [--steps 300] [--out benchmarks/results/maml_query_stats.md]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import metalab.algorithms.maml as maml_module
from benchmarks.zoo_omniglot import config_for
from metalab.engine import MetaTrainer
from metalab.engine.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]


def transductive(self, fast, support_x, x):  # the predictor before: queries normalised by their own batch
    return self.forward_fast(fast, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", default="fomaml", choices=["maml", "fomaml", "metasgd"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "maml_query_stats.md")
    args = parser.parse_args()
    rows = []
    for training in ("batch", "support"):
        cfg = config_for(args.algo, None, args.episodes, steps=args.steps)
        cfg.train.algo_options["query_stats"] = training
        cfg.train.val_every = 10 ** 9  # no validation passes: the arms differ in the training loss only
        start = time.process_time()
        trainer = MetaTrainer(cfg, Path(tempfile.mkdtemp()) / "run", show_progress=False, log=lambda m: None)
        trainer.train()
        cpu = time.process_time() - start
        algorithm = trainer.algorithm.eval()
        for prediction, patch in (("support statistics", None), ("transductive (before)", transductive)):
            original = maml_module.MAML.with_support_stats
            if patch is not None:
                maml_module.MAML.with_support_stats = patch
            try:
                cells = []
                for ways, shots in ((5, 1), (5, 5), (20, 1)):
                    r = evaluate(algorithm, trainer.splits.test, ways, shots, 15, args.episodes, seed=0, show_progress=False)
                    cells.append(f"{100 * r.mean:.1f} ± {100 * r.ci95:.1f}")
            finally:
                maml_module.MAML.with_support_stats = original
            rows.append((training, prediction, cells, cpu))
            print(training, prediction, cells, flush=True)
    lines = [f"# MAML's norms and the queries (`python -m benchmarks.maml_query_stats --algo {args.algo} --steps {args.steps} "
             f"--episodes {args.episodes}`)", "",
             f"{args.algo}, the zoo's recipe (5-way 1-shot meta-batches of 16, inner lr 0.4, 1 inner step, 3 at test), "
             f"{args.steps} meta-steps on the canonical Omniglot split, {args.episodes} test episodes per setting "
             f"(15 queries per class). {platform.machine()}, {time.strftime('%Y-%m-%d')}.", "",
             "| training: queries normalised by | prediction: inputs normalised by | 5w1s % | 5w5s % | 20w1s % | train CPU-s |",
             "|---|---|---|---|---|---|"]
    for training, prediction, cells, cpu in rows:
        lines.append(f"| {'their own batch' if training == 'batch' else 'the support'} (`query_stats: {training}`) | "
                     f"{prediction} | {' | '.join(cells)} | {cpu:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
