"""`metalab adapt` on CLINC150's held-out domains: frozen encoder against `--finetune-epochs`.

    python -m benchmarks.clinc150_adapt [--draws 5] [--epochs 4] [--out benchmarks/results/clinc150_adapt.md]

The path a user takes: a ProtoNet run with a meta-learned per-dimension weighting of the
layers-4-6 embeddings, meta-trained on the intents of CLINC150's 7 meta-train domains only; then
`adapt_from_file` (what `metalab adapt` calls) on a support CSV with 5 train-split utterances per
intent, ``head="logistic"``, ``names_as_examples=True``, with the encoder frozen and fine-tuned on
that support. Tasks: all 45 intents of the 3 held-out domains, and the 15 travel intents alone;
scored on those intents' whole test split; mean ± 95 % CI over support draws (seeds 0..draws-1).
The run never saw these intents, so the figures are honest few-shot figures.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metalab.data.catalog import CLINC150_TEST_DOMAINS
from metalab.data.text import load_clinc150
from metalab.engine import MetaTrainer, RunConfig
from metalab.engine.adapter import adapt_from_file
from metalab.engine.evaluate import mean_ci95


def meta_train_run(steps: int, log) -> Path:
    config = RunConfig.from_dict({"name": "clinc-protonet-diagonal", "data": {"source": "clinc150"},
                                  "train": {"algo": "protonet", "backbone": "diagonal", "ways": 5, "shots": [1, 5],
                                            "queries": 10, "meta_batch": 16, "steps": steps, "lr": 1e-2,
                                            "val_every": 100, "checkpoint_every": steps}})
    run_dir = Path("runs") / f"bench-clinc-adapt-{time.strftime('%Y%m%d-%H%M%S')}"
    t = time.perf_counter()
    MetaTrainer(config, run_dir, show_progress=False, log=lambda *_: None).train()
    log(f"meta-trained ProtoNet + diagonal head on the 7 meta-train domains: {steps} steps in {time.perf_counter() - t:.0f} s ({run_dir})")
    return run_dir


def task(corpus, domains: list[str], seed: int, folder: Path) -> tuple[Path, list[str], list[str]]:
    """A support CSV (5 train utterances per intent of ``domains``) and the test texts and labels."""
    wanted = {corpus.domain_names.index(d) for d in domains}
    intents = [c for c, d in enumerate(corpus.class_domains.tolist()) if d in wanted]
    rng = random.Random(seed)
    rows, texts, labels = [], [], []
    for c in intents:
        mine = [(t, p) for t, y, p in zip(corpus.texts, corpus.y.tolist(), corpus.parts) if y == c]
        rows += [(t, corpus.class_names[c]) for t in rng.sample([t for t, p in mine if p == "train"], 5)]
        texts += [t for t, p in mine if p == "test"]
        labels += [corpus.class_names[c]] * sum(p == "test" for _, p in mine)
    path = folder / f"support-{'-'.join(domains)}-{seed}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path, texts, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--meta-steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clinc150_adapt.md"))
    args = parser.parse_args()
    lines: list[str] = []
    log = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731
    start = time.strftime("%Y-%m-%d %H:%M")
    run = meta_train_run(args.meta_steps, log)
    corpus = load_clinc150()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for domains in (list(CLINC150_TEST_DOMAINS), ["travel"]):
            acc: dict[str, list[float]] = {"frozen": [], "fine-tuned": []}
            seconds = []
            for d in range(args.draws):
                support, texts, labels = task(corpus, domains, d, Path(tmp))
                for route, epochs in (("frozen", 0), ("fine-tuned", args.epochs)):
                    t = time.perf_counter()
                    adapter = adapt_from_file(run, support, head="logistic", names_as_examples=True,
                                              finetune_epochs=epochs, seed=d)
                    if epochs:
                        seconds.append(time.perf_counter() - t)
                    predicted = [p.label for p in adapter.predict(texts)]
                    acc[route].append(sum(p == l for p, l in zip(predicted, labels)) / len(labels))
                log(f"{'+'.join(domains)} draw {d}: frozen {100 * acc['frozen'][-1]:.2f} %, "
                    f"fine-tuned {100 * acc['fine-tuned'][-1]:.2f} % ({seconds[-1]:.0f} s to adapt)")
            ways = len(set(labels))
            diff = mean_ci95(torch.tensor(acc["fine-tuned"]) - torch.tensor(acc["frozen"]))
            for route in acc:
                mean, ci = mean_ci95(torch.tensor(acc[route]))
                rows.append((f"{', '.join(domains)} ({ways} intents, {len(labels)} test texts)", route, mean, ci))
                log(f"{'+'.join(domains)} {route}: {100 * mean:.2f} ± {100 * ci:.2f} %")
            rows.append((f"{', '.join(domains)}", "difference (paired)", *diff))
            log(f"{'+'.join(domains)} fine-tuned − frozen: {100 * diff[0]:+.2f} ± {100 * diff[1]:.2f} "
                f"(fine-tuning + adapting {statistics.mean(seconds):.0f} s per task)")
    md = [f"# `metalab adapt` on CLINC150's held-out domains ({start}, {torch.get_num_threads()} CPU threads, torch {torch.__version__})",
          "", f"Run: ProtoNet + diagonal head, meta-trained {args.meta_steps} steps on the 7 meta-train domains only. "
          f"Adapter: `head=logistic`, `names_as_examples`, 5 shots per intent from train; fine-tuned: "
          f"`--finetune-epochs {args.epochs}` (lr 1e-4, seed = draw). Mean ± 95 % CI over {args.draws} support draws.", "",
          "| task | encoder | accuracy (%) |", "|---|---|---|"]
    md += [f"| {t} | {r} | {100 * m:+.2f} ± {100 * c:.2f} |" if r.startswith("difference") else
           f"| {t} | {r} | {100 * m:.2f} ± {100 * c:.2f} |" for t, r, m, c in rows]
    md += ["", "## Log", "", "```", *lines, "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
