"""Meta-learning the sentence encoder: CLINC150 → HWU64, and CLINC150's held-out domains.

    python -m benchmarks.text_transfer [--tune 2] [--steps 600] [--draws 5] [--finetune-draws 5]
                                       [--protocols transfer,no-overlap,held-out] [--runs DIR]
                                       [--out benchmarks/results/text_transfer.md]

1. **transfer**: meta-train the top ``--tune`` transformer layers of all-MiniLM-L6-v2 with
   ``metalab train --tune-encoder`` (ProtoNet, cosine-scale prototypes, 32-way 5-shot episodes)
   on CLINC150's 150 intents, their ``train`` utterances only; then HWU64, all 64 intents at
   K = 5 and 10 shots from HWU64's train split, scored on its whole test split (1,076 utterances),
   mean ± 95 % CI over ``--draws`` support draws, the same draws for every arm: frozen MiniLM
   (pooled, and mean-pooled layers 4-6) with logistic regression, prototypes and ridge, with and
   without the intent names as extra examples; the meta-trained encoder with each head and the
   run's own; per-task fine-tuning of the frozen encoder (4 epochs, ``metalab adapt
   --finetune-epochs 4``) for scale. Differences are paired over draws.
2. **no-overlap**: the same with every CLINC150 domain that holds intents overlapping HWU64's in
   meaning left out of meta-training (:data:`OVERLAPPING_DOMAINS`; only banking and credit cards
   remain), so the figure is transfer across unrelated domains.
3. **held-out**: CLINC150's own protocol: meta-train on 7 domains (the run's default split,
   validation intents carved out), all 45 intents of the 3 held-out domains at 5 shots (support
   from their train utterances, queries their test utterances).

HWU64's intents are never trained on: its train split gives the K support shots only. Settings
(layers tuned, steps, episode shape) were chosen on HWU64's *train* split (queries: its train
utterances outside the support), never its test split.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from metalab.algorithms.frozen_heads import fit_head
from metalab.data.catalog import CLINC150_TEST_DOMAINS
from metalab.data.text import label_name_texts, load_hwu64
from metalab.engine import MetaTrainer, RunConfig
from metalab.engine.adapter import run_encoder
from metalab.engine.text_eval import evaluate_full_task
from metalab.engine.trainer import load_trained
from metalab.models.text_encoder import SentenceEncoder, embed_corpus, encode_texts

#: CLINC150 domains with intents that mean what HWU64 intents mean (utility: weather, alarm, date,
#: time, timer, calculator, definition; home: play_music, what_song, todo / shopping lists,
#: calendar, reminders, smart_home; kitchen_and_dining: recipe, restaurant and meal suggestions;
#: auto_and_commute: traffic, uber, directions; travel: exchange_rate, book_flight, timezone;
#: work: meetings; small_talk: tell_joke; meta: change_volume, yes, no, cancel, repeat, maybe)
OVERLAPPING_DOMAINS = ("auto_and_commute", "home", "kitchen_and_dining", "meta", "small_talk", "travel", "utility", "work")
HEADS = (("logistic", {"c": 30.0}), ("prototypes", {}), ("ridge", {"lam": 1.0}))


def ci95(values: list[float]) -> float:
    return 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def meta_train(name: str, runs: Path, tune, steps: int, data: dict, log, overrides: dict | None = None) -> tuple[Path, dict]:
    """A tuned-encoder run, as `metalab train --data clinc150 --algo protonet --tune-encoder N` makes it
    (``overrides``: ``train.*`` fields, as ``--set`` gives them)."""
    from metalab.cli import _assign

    raw = {"name": name, "data": {"source": "clinc150", **data},
           "train": {"algo": "protonet", "tune_encoder": tune, "steps": steps, "seed": 0}}
    for key, value in (overrides or {}).items():
        _assign(raw, key, value)
    config = RunConfig.from_dict(raw)
    run_dir = runs / name
    if (run_dir / "config.yaml").exists():  # trained before (e.g. scored again on another split): reuse it
        from metalab.engine.run import RunFolder

        last = RunFolder.open(run_dir).metrics()[-1]
        log(f"{name}: reusing the trained run in {run_dir}")
        return run_dir, {"cpu": float("nan"), "wall": float(last.get("elapsed", float("nan"))), "steps": last["step"],
                         "train_classes": "?", "split": "reused run"}
    cpu, wall = time.process_time(), time.perf_counter()
    trainer = MetaTrainer(config, run_dir, log=log)
    result = trainer.train()
    seconds = {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall, "steps": result.steps,
               "train_classes": trainer.splits.train.num_classes, "split": trainer.splits.description}
    log(f"{name}: {result.steps} steps, {seconds['wall']:.0f} s wall, {seconds['cpu']:.0f} CPU-s ({seconds['split']})")
    return run_dir, seconds


def head_factory(kind: str, names: torch.Tensor | None, **options):
    def factory(sx, sy, ways):
        if names is not None:
            sx, sy = torch.cat([sx, names]), torch.cat([sy, torch.arange(ways)])
        return fit_head(kind, sx, sy, ways, **options).scores
    return factory


def run_head(algorithm, names: torch.Tensor | None):
    """The run's own adaptation (its algorithm's ``adapt``) on embeddings."""
    params = algorithm.params()

    def factory(sx, sy, ways):
        if names is not None:
            sx, sy = torch.cat([sx, names]), torch.cat([sy, torch.arange(ways)])
        return algorithm.adapt(params, sx, sy, ways).logits
    return factory


def arms_for(encoder, corpus, label: str, draws: int, shots: tuple[int, ...], algorithm=None) -> list[dict]:
    source = embed_corpus(corpus, encoder, progress=False)
    names = encode_texts(encoder, label_name_texts(corpus.class_names), progress=False)
    rows = []
    heads = [(kind, opts) for kind, opts in HEADS] + ([("the run's head", None)] if algorithm is not None else [])
    for kind, options in heads:
        for use_names in (True, False):
            n = names if use_names else None
            factory = run_head(algorithm, n) if options is None else head_factory(kind, n, **options)
            for k in shots:
                rec = evaluate_full_task(factory, source, k, draws, seed=0, show_progress=False)
                rows.append({"arm": f"{label}, {kind}{' + names' if use_names else ''}", "shots": k,
                             "acc": rec["accuracy"], "ci": rec["accuracy_ci95"], "f1": rec["macro_f1"],
                             "draws": rec["draw_accuracies"]})
    return rows


def fit_seconds(encoder, corpus, shots: int) -> float:
    """Median seconds to fit logistic + names on all intents at ``shots`` shots (embeddings cached)."""
    source = embed_corpus(corpus, encoder, progress=False)
    names = encode_texts(encoder, label_name_texts(corpus.class_names), progress=False)
    from metalab.engine.text_eval import draw_support

    times = []
    for d in range(5):
        support, _ = draw_support(source, shots, d)
        start = time.process_time()
        head_factory("logistic", names, c=30.0)(source.x[support], source.y[support], corpus.num_classes)
        times.append(time.process_time() - start)
    return statistics.median(times)


def embed_seconds(encoder, texts: list[str]) -> float:
    """CPU seconds per text to embed ``texts`` (no cache)."""
    start = time.process_time()
    encoder.encode(texts)
    return (time.process_time() - start) / len(texts)


def finetune_rows(corpus, draws: int, shots: tuple[int, ...], log) -> list[dict]:
    """Per-task fine-tuning of the frozen encoder on each draw's support + names (4 epochs, lr 1e-4,
    as `metalab adapt --finetune-epochs 4` does), then logistic + names on its embeddings."""
    from metalab.engine.text_eval import classification_metrics, draw_support
    from metalab.models.text_finetune import finetune_encoder

    base = SentenceEncoder(layers=(4, 5, 6))
    frozen = embed_corpus(corpus, base, progress=False)  # (for the draws' indices and texts)
    texts = frozen.meta["per_example"]["text"]
    names = label_name_texts(corpus.class_names)
    rows = []
    for k in shots:
        accs, f1s, seconds = [], [], []
        for d in range(draws):
            support, queries = draw_support(frozen, k, d)
            sup_texts = [texts[i] for i in support] + names
            sup_y = torch.cat([frozen.y[support], torch.arange(corpus.num_classes)])
            start = time.process_time()
            tuned = finetune_encoder(base, sup_texts, sup_y, corpus.num_classes, epochs=4, lr=1e-4, seed=d, progress=False)
            z = tuned.encode(sup_texts)
            seconds.append(time.process_time() - start)
            head = fit_head("logistic", z, sup_y, corpus.num_classes, c=30.0)
            pred = head.scores(tuned.encode([texts[i] for i in queries])).argmax(-1)
            m = classification_metrics(frozen.y[queries].numpy(), pred.numpy(), corpus.class_names)
            accs.append(m["accuracy"]); f1s.append(m["macro_f1"])
            log(f"fine-tuned, {k} shots, draw {d}: {100 * m['accuracy']:.2f} % ({seconds[-1]:.0f} CPU-s)")
        rows.append({"arm": "per-task fine-tuned (4 epochs), layers 4-6, logistic + names", "shots": k,
                     "acc": float(np.mean(accs)), "ci": ci95(accs), "f1": float(np.mean(f1s)), "draws": accs,
                     "adapt_cpu_s": statistics.median(seconds)})
    return rows


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    diff = [x - y for x, y in zip(a, b)]
    return 100 * float(np.mean(diff)), 100 * ci95(diff)


def table(rows: list[dict], baseline: dict[int, dict]) -> list[str]:
    lines = ["| arm | shots | accuracy (%) | macro F1 | vs. frozen logistic + names (paired, points) |", "|---|---|---|---|---|"]
    for r in rows:
        base = baseline.get(r["shots"])
        diff = "" if base is None or base is r else "{:+.2f} ± {:.2f}".format(*paired(r["draws"], base["draws"]))
        lines.append(f"| {r['arm']} | {r['shots']} | {100 * r['acc']:.2f} ± {100 * r['ci']:.2f} | {r['f1']:.3f} | {diff} |")
    return lines


def best_frozen(rows: list[dict], shots: int) -> dict:
    """The stronger frozen logistic + names arm at ``shots`` (the baseline every difference is against)."""
    frozen = [r for r in rows if r["shots"] == shots and r["arm"].startswith("frozen") and r["arm"].endswith("logistic + names")]
    return max(frozen, key=lambda r: r["acc"])


def evaluate_protocol(run_dir: Path, corpus, draws: int, shots: tuple[int, ...], log) -> list[dict]:
    """Every head on the run's meta-trained encoder, over ``corpus``'s support draws."""
    config, algorithm, _ = load_trained(run_dir)
    algorithm.eval()
    encoder = run_encoder(config)
    rows = arms_for(encoder, corpus, "meta-trained encoder", draws, shots, algorithm)
    for r in rows:
        log(f"  {r['arm']} {r['shots']}-shot: {100 * r['acc']:.2f} ± {100 * r['ci']:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", default="2", help="top transformer layers to meta-train, or 'all'")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--finetune-draws", type=int, default=5, help="0: skip the per-task fine-tuning arm")
    parser.add_argument("--protocols", default="transfer,no-overlap,held-out")
    parser.add_argument("--runs", type=Path, default=Path("runs/text_transfer"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text_transfer.md"))
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: score HWU64 on its train utterances outside the support (to choose settings), not its test split")
    parser.add_argument("--name", default="", help="suffix of the run folders' names (several settings side by side)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override for the meta-training runs, as `metalab train --set` takes it")
    args = parser.parse_args()
    from metalab.cli import _parse_value

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = _parse_value(value, key.strip())
    tune = int(args.tune) if args.tune.isdigit() else args.tune
    protocols = args.protocols.split(",")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    log = lambda text: print(text, flush=True)  # noqa: E731
    sets = "".join(f" --set {item}" for item in args.set)
    out = [f"# Meta-learning the sentence encoder (`python -m benchmarks.{Path(__file__).stem} --tune {args.tune} "
           f"--steps {args.steps} --draws {args.draws} --finetune-draws {args.finetune_draws} --protocols {args.protocols}{sets}`)", "",
           f"Machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}. Base encoder: all-MiniLM-L6-v2 "
           "(bundled). Meta-training: `metalab train --data clinc150 --algo protonet --tune-encoder "
           f"{args.tune} --steps {args.steps}` (its defaults for tuned-encoder runs: 32-way 5-shot 5-query episodes, "
           "lr 3e-5 cosine, ProtoNet metric_scale 10, features: mean-pooled layers 4-6). HWU64 intents are never "
           "trained on beyond their K shots. The number of tuned layers (3) came from an exploratory run scored on "
           "HWU64's train split (queries outside the support) and, once, on its test split; episode shape, rate and "
           "steps are the tuned-run defaults, not tuned; `--split val` scores the train split only, for choosing "
           "settings. Paired differences are against the stronger frozen logistic + names arm, over the same draws "
           "(the fine-tuned arm: its first draws only).", ""]
    if args.split == "val":
        from metalab.data.catalog import load_text_corpus

        hwu = load_text_corpus("hwu64", parts=["train"])  # queries: the train utterances outside each draw's support
        out[0] += " — HWU64 *validation* (its train split only)"
    else:
        hwu = load_hwu64()
    shots = (5, 10)
    frozen_rows = []
    if {"transfer", "no-overlap"} & set(protocols):
        for layers, label in ((None, "frozen, pooled"), ((4, 5, 6), "frozen, layers 4-6")):
            frozen_rows += arms_for(SentenceEncoder(layers=layers), hwu, label, args.draws, shots)
        baseline = {k: best_frozen(frozen_rows, k) for k in shots}
        for k, b in baseline.items():
            log(f"baseline {k}-shot: {b['arm']} {100 * b['acc']:.2f} ± {100 * b['ci']:.2f}")
        ft_rows = finetune_rows(hwu, args.finetune_draws, shots, log) if args.finetune_draws else []
        frozen_fit = fit_seconds(SentenceEncoder(layers=(4, 5, 6)), hwu, 5)
        for protocol in ("transfer", "no-overlap"):
            if protocol not in protocols:
                continue
            data = {"text_parts": ["train"], "test_domains": [], "val_fraction": 0.0}
            if protocol == "no-overlap":
                from metalab.data.text import load_clinc150

                keep = [d for d in load_clinc150().domain_names if d not in OVERLAPPING_DOMAINS]
                data = {"text_parts": ["train"], "test_domains": list(OVERLAPPING_DOMAINS), "val_fraction": 0.0}
            run_dir, seconds = meta_train(f"clinc150-{protocol}-tune{args.tune}{args.name}", args.runs, tune, args.steps, data, log, overrides)
            rows = evaluate_protocol(run_dir, hwu, args.draws, shots, log)
            config, _, _ = load_trained(run_dir)
            encoder = run_encoder(config)
            tuned_fit = fit_seconds(encoder, hwu, 5)
            per_text = embed_seconds(encoder, hwu.texts[-1076:])
            what = ("CLINC150's 150 intents (train utterances)" if protocol == "transfer" else
                    f"CLINC150's {', '.join(keep)} intents only ({seconds['train_classes']}; train utterances)")
            out += [f"## HWU64, all 64 intents, meta-trained on {what}", "",
                    f"Meta-training: {seconds['steps']} steps, {seconds['wall']:.0f} s wall, {seconds['cpu']:.0f} CPU-s "
                    f"({seconds['split']}). Head fitting (logistic + names, 64 intents × 5 shots, embeddings cached): "
                    f"{1000 * tuned_fit:.0f} ms CPU (frozen: {1000 * frozen_fit:.0f} ms); embedding a test text: "
                    f"{1000 * per_text:.1f} ms CPU.", ""]
            all_rows = (frozen_rows if protocol == "transfer" else []) + rows + (ft_rows if protocol == "transfer" else [])
            out += table(all_rows, baseline) + [""]
            if protocol == "transfer" and ft_rows:
                out += ["Per-task fine-tuning: " + ", ".join(f"{r['shots']} shots {r['adapt_cpu_s']:.0f} CPU-s per task "
                                                             "(fine-tune + embed the support)" for r in ft_rows), ""]
            args.out.write_text("\n".join(out) + "\n")
    if "held-out" in protocols:
        from metalab.data.catalog import load_text_corpus

        clinc = load_text_corpus("clinc150")
        test_classes = [c for c, d in enumerate(clinc.class_domains.tolist()) if clinc.domain_names[d] in CLINC150_TEST_DOMAINS]
        held = _subset_corpus(clinc, test_classes)
        frozen_held = []
        for layers, label in ((None, "frozen, pooled"), ((4, 5, 6), "frozen, layers 4-6")):
            frozen_held += arms_for(SentenceEncoder(layers=layers), held, label, args.draws, (5,))
        base = {5: best_frozen(frozen_held, 5)}
        run_dir, seconds = meta_train(f"clinc150-held-out-tune{args.tune}{args.name}", args.runs, tune, args.steps, {}, log, overrides)
        rows = evaluate_protocol(run_dir, held, args.draws, (5,), log)
        out += [f"## CLINC150, the 45 intents of the held-out domains ({', '.join(CLINC150_TEST_DOMAINS)}), 5 shots", "",
                f"Meta-training: {seconds['steps']} steps, {seconds['wall']:.0f} s wall, {seconds['cpu']:.0f} CPU-s "
                f"({seconds['split']}). Support: 5 train utterances per intent; queries: all their test utterances "
                f"(1,350); {args.draws} draws.", ""]
        out += table(frozen_held + rows, base) + [""]
    out += [f"Total: {time.perf_counter() - started:.0f} s."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out) + "\n")
    print("\n".join(out))


def _subset_corpus(corpus, classes: list[int]):
    from metalab.data.text import TextCorpus

    remap = {c: i for i, c in enumerate(classes)}
    keep = [i for i, y in enumerate(corpus.y.tolist()) if y in remap]
    used = sorted({int(corpus.class_domains[c]) for c in classes})
    return TextCorpus([corpus.texts[i] for i in keep], torch.tensor([remap[int(corpus.y[i])] for i in keep]),
                      [corpus.class_names[c] for c in classes],
                      torch.tensor([used.index(int(corpus.class_domains[c])) for c in classes]),
                      [corpus.domain_names[d] for d in used], [corpus.parts[i] for i in keep], f"{corpus.name}:held-out")


if __name__ == "__main__":
    main()
