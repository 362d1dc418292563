"""Task planning and the knowledge graph, measured.

1. Uniform vs hard-task mining (and the other planners) on the canonical Omniglot split: a
   Prototypical Network per planner, the same CPU-time budget each, scored on the same 600
   20-way 1-shot (and 5-way 1-shot) meta-test episodes, mean ± 95 % CI.
2. The knowledge graph of a trained run: how often a class's nearest classes (prototype cosine)
   share its domain, against chance — Omniglot characters and alphabets (meta-test alphabets,
   never trained on), CLINC150 intents and domains.

    python -m benchmarks.planner_graph [--budget 150] [--planners uniform hard …] [--out benchmarks/results/planner_graph.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metalab.data.catalog import load_splits
from metalab.engine import MetaTrainer, RunConfig
from metalab.data.sampler import EpisodeSampler
from metalab.engine.eval_run import run_splits
from metalab.engine.evaluate import evaluate_sampler, mean_ci95
from metalab.engine.trainer import load_trained
from metalab.report.graph import class_prototypes, nearest_classes, score_neighbours


def train_planner(planner: str, budget: float, splits, folder: Path):
    cfg = RunConfig.from_dict({
        "name": f"omniglot-protonet-{planner}",
        "train": {"algo": "protonet", "ways": 20, "shots": 1, "queries": 5, "meta_batch": 4, "steps": 100_000,
                  "lr": 1e-3, "time_budget": budget, "budget_clock": "cpu", "schedule": "constant", "planner": planner,
                  "val_every": 100_000, "checkpoint_every": 100_000, "seed": 0},
    })
    trainer = MetaTrainer(cfg, folder, splits=splits, show_progress=False, log=lambda *_: None)
    result = trainer.train()
    return trainer, result


def graph_rates(run: Path, split: str, k: int = 5) -> tuple[int, int, float, float]:
    config, algorithm, _ = load_trained(run)
    splits = run_splits(config)
    source = {"test": splits.test, "train": splits.train}[split]
    score = score_neighbours(nearest_classes(class_prototypes(algorithm, source), k)[0], source.class_domains)
    return source.num_classes, source.num_domains, score.same_domain_rate, score.chance_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=150.0, help="CPU seconds of meta-training per planner")
    parser.add_argument("--planners", nargs="+", default=["uniform", "hard", "domain-balanced", "curriculum"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/planner_graph.md"))
    args = parser.parse_args()
    lines: list[str] = []
    log = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="metalab-planner-"))
    start = time.strftime("%Y-%m-%d %H:%M")
    splits = load_splits("omniglot")
    log(f"split: {splits.description}")
    rows, runs, per_episode = [], {}, {}
    for planner in args.planners:
        trainer, result = train_planner(planner, args.budget, splits, work / planner)
        runs[planner] = work / planner
        scores = {}
        for ways in (20, 5):  # the same 600 episodes for every planner (seeded sampler)
            sampler = EpisodeSampler(splits.test, ways, 1, 15, tasks=50, seed=2024)
            scores[ways] = evaluate_sampler(trainer.algorithm, sampler, 600, show_progress=False)
        per_episode[planner] = scores
        (m20, c20), (m5, c5) = mean_ci95(scores[20]), mean_ci95(scores[5])
        log(f"{planner}: {result.steps} steps in {result.seconds:.0f} CPU-s; 20w1s {100 * m20:.2f} ± {100 * c20:.2f}, "
            f"5w1s {100 * m5:.2f} ± {100 * c5:.2f}")
        diff = ""
        if planner != args.planners[0]:
            base = per_episode[args.planners[0]]
            (d20, e20), (d5, e5) = mean_ci95(scores[20] - base[20]), mean_ci95(scores[5] - base[5])
            diff = f" {100 * d20:+.2f} ± {100 * e20:.2f} | {100 * d5:+.2f} ± {100 * e5:.2f} |"
            log(f"{planner} − {args.planners[0]} (paired, same episodes): 20w1s {100 * d20:+.2f} ± {100 * e20:.2f}, "
                f"5w1s {100 * d5:+.2f} ± {100 * e5:.2f}")
        rows.append(f"| {planner} | {result.steps} | {100 * m20:.2f} ± {100 * c20:.2f} | {100 * m5:.2f} ± {100 * c5:.2f} |"
                    + (diff or " – | – |"))
    graph_rows = []
    n, dom, rate, chance = graph_rates(runs[args.planners[0]], "test")
    graph_rows.append(f"| Omniglot meta-test ({args.planners[0]} run) | {n} characters, {dom} alphabets | "
                      f"{100 * rate:.1f} | {100 * chance:.1f} | {rate / chance:.1f}× |")
    log(f"graph omniglot test: {100 * rate:.1f} % same alphabet vs {100 * chance:.1f} % chance")
    clinc = work / "clinc"
    subprocess.run([sys.executable, "-m", "metalab", "train", "--data", "clinc150", "--algo", "protonet", "--backbone",
                    "diagonal", "--ways", "5", "--shots", "5", "--queries", "10", "--meta-batch", "16", "--steps", "600",
                    "--lr", "0.01", "--no-eval", "--no-progress", "--out", str(clinc)], check=True, stdout=subprocess.DEVNULL)
    for split in ("test", "train"):
        n, dom, rate, chance = graph_rates(clinc, split)
        what = "meta-test domains" if split == "test" else "meta-train domains"
        graph_rows.append(f"| CLINC150 {what} (ProtoNet + diagonal head) | {n} intents, {dom} domains | "
                          f"{100 * rate:.1f} | {100 * chance:.1f} | {rate / chance:.1f}× |")
        log(f"graph clinc150 {split}: {100 * rate:.1f} % same domain vs {100 * chance:.1f} % chance")
    md = [f"# Task planners and the knowledge graph ({start}, {torch.get_num_threads()} CPU threads, torch {torch.__version__})", "",
          "## Planners: ProtoNet on the canonical Omniglot split, equal budget", "",
          f"Each planner meta-trains a ProtoNet (conv4, 20-way 1-shot 5-query tasks, meta-batch 4, Adam 1e-3 constant) "
          f"for {args.budget:.0f} CPU-seconds (the planner's own work — error statistics every 10 steps, nearest classes "
          "every 250 — counts inside the budget), then all are scored on the same 600 meta-test episodes (alphabets never "
          "trained on), 15 queries per class.", "",
          f"| planner | meta-steps | 20-way 1-shot (%) | 5-way 1-shot (%) | 20w1s − {args.planners[0]} (paired) | "
          f"5w1s − {args.planners[0]} (paired) |", "|---|---|---|---|---|---|", *rows, "",
          "## Knowledge graph: nearest classes by prototype cosine (k = 5)", "",
          "| run / classes | size | same-domain share of k-NN edges (%) | chance (%) | lift |", "|---|---|---|---|---|",
          *graph_rows, "", "## Log", "", "```", *lines, "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
