"""CLINC150 few-shot intent classification with the frozen (and fine-tuned) all-MiniLM-L6-v2.

    python -m benchmarks.clinc150 [--draws 10] [--finetune-draws 10] [--finetune-members 2] [--lexical-weight 0.1] [--domain-weight 0.25]
                                  [--skip-finetune] [--out benchmarks/results/clinc150.md]

1. All 150 intents at 5 shots per intent (support drawn from CLINC150's train split), scored on
   the whole in-scope test split (4,500 utterances), mean ± 95 % CI over random support draws:
   frozen-encoder heads (cosine prototypes, logistic regression, ridge) on the model's pooled
   embedding and on mean-pooled layers 4-6, with and without the intent *names* as one extra
   example each; the same head combined with a lexical classifier (TF-IDF character and word
   n-grams + logistic regression, fitted on the support texts + names only; weight chosen on the
   validation split); then the fine-tuned-encoder route: one fine-tuned encoder, the mean of
   ``--finetune-members`` encoders fine-tuned with different seeds, each also with the lexical
   classifier, and the last also with a domain prior (a logistic head telling the intents' 10
   domains apart on the same support features; weight and C chosen on the validation split).
   Hyper-parameters (layers, C) were chosen on
   the validation split. No utterance of the test split is ever in a support set.
   Out-of-scope: the rejection threshold is fitted on the val split + ``oos_val`` (Larson et al.),
   and in-scope accuracy / out-of-scope recall are reported on test + ``oos_test``.
2. Cross-domain: ProtoNet with a meta-learned linear projection, meta-trained on 7 domains'
   intents (validation intents carved out), against plain prototypes on the same frozen
   embeddings, on the same 600 5-way 1-shot / 5-shot episodes of the 3 held-out domains.
3. Latency: adapting a new 150-way 5-shot task from cached embeddings (median of 20).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from metalab.algorithms import build_algorithm
from metalab.algorithms.frozen_heads import fit_head
from metalab.data.catalog import CLINC150_TEST_DOMAINS, load_splits
from metalab.data.text import label_name_texts, load_clinc150
from metalab.engine import MetaTrainer, RunConfig
from metalab.data import EpisodeSampler
from metalab.engine.evaluate import encode_source, evaluate_sampler, mean_ci95
from metalab.engine.text_eval import (classification_metrics, confidence, draw_support, evaluate_full_task,
                                      fit_oos_threshold, oos_metrics)
from metalab.models import build_backbone
from metalab.models.text_encoder import SentenceEncoder, embed_corpus, encode_texts
from metalab.models.text_lexical import LexicalClassifier, combine_log_probs

LAYERS = (4, 5, 6)


def _head(kind: str, names: torch.Tensor | None = None, **options):
    """A head factory for evaluate_full_task; ``names [C, D]`` adds each intent's name as one example."""
    def factory(sx, sy, ways):
        if names is not None:
            sx, sy = torch.cat([sx, names]), torch.cat([sy, torch.arange(ways)])
        return fit_head(kind, sx, sy, ways, **options).scores
    return factory


def all_intents(draws: int, log) -> list[tuple[str, dict]]:
    corpus = load_clinc150()
    rows = []
    for layers in (None, LAYERS):
        encoder = SentenceEncoder(layers=layers)
        source = embed_corpus(corpus, encoder)
        names = encode_texts(encoder, label_name_texts(corpus.class_names), progress=False)
        feature = "pooled" if layers is None else "layers 4-6"
        heads = [("prototypes", {}), ("logistic", {"c": 30.0}), ("ridge", {"lam": 1.0})]
        for kind, options in heads:
            for use_names in (False, True):
                t = time.perf_counter()
                rec = evaluate_full_task(_head(kind, names if use_names else None, **options), source, 5, draws,
                                         seed=0, show_progress=False)
                label = f"frozen, {feature}, {kind}{' + intent names' if use_names else ''}"
                rec["oos"] = _oos_clinc(source, _head(kind, names if use_names else None, **options), draws)
                rows.append((label, rec))
                log(f"{label}: {100 * rec['accuracy']:.2f} ± {100 * rec['accuracy_ci95']:.2f} % "
                    f"(macro F1 {rec['macro_f1']:.3f}; {time.perf_counter() - t:.0f} s)")
    return rows


def _oos_clinc(source, head, draws: int) -> dict:
    """CLINC protocol: threshold on val + oos_val, figures on test + oos_test, per draw (mean)."""
    oos = source.meta["out_of_scope"]
    parts = source.meta["per_example"]["part"]
    val_idx = torch.tensor([p == "val" for p in parts]).nonzero().flatten()
    out = []
    for d in range(draws):
        support, queries = draw_support(source, 5, d)
        scorer = head(source.x[support], source.y[support], source.num_classes)
        val_logits = scorer(source.x[val_idx])
        threshold = fit_oos_threshold(confidence(val_logits), val_logits.argmax(-1) == source.y[val_idx],
                                      confidence(scorer(oos["val"])))
        logits = scorer(source.x[queries])
        out.append(oos_metrics(confidence(logits), logits.argmax(-1) == source.y[queries],
                               confidence(scorer(oos["test"])), threshold))
    return {k: statistics.mean(o[k] for o in out) for k in ("in_scope_accuracy", "oos_recall")}


def frozen_with_lexical(draws: int, weight: float, log) -> list[tuple[str, dict]]:
    """The frozen layers-4-6 logistic head + intent names, alone and with the lexical classifier
    (TF-IDF n-grams fitted on the same support texts + names) at ``weight``."""
    corpus = load_clinc150()
    encoder = SentenceEncoder(layers=LAYERS)
    source = embed_corpus(corpus, encoder)
    texts = source.meta["per_example"]["text"]
    names = label_name_texts(corpus.class_names)
    name_z = encode_texts(encoder, names, progress=False)
    scores: dict[str, list] = {"alone": [], "lexical": []}
    t = time.perf_counter()
    for d in range(draws):
        support, queries = draw_support(source, 5, d)
        support_y = torch.cat([source.y[support], torch.arange(150)])
        head = fit_head("logistic", torch.cat([source.x[support], name_z]), support_y, 150, c=30.0)
        log_p = head.scores(source.x[queries]).log_softmax(-1)
        lexical = LexicalClassifier().fit([texts[i] for i in support] + names, support_y, 150)
        lex_p = lexical.log_probs([texts[i] for i in queries])
        for key, lp in (("alone", log_p), ("lexical", combine_log_probs(log_p, lex_p, weight))):
            scores[key].append(classification_metrics(source.y[queries].numpy(), lp.argmax(-1).numpy(), source.class_names))
    rows = []
    for key, label in (("alone", "frozen, layers 4-6, logistic + intent names (this section's draws)"),
                       ("lexical", f"frozen, layers 4-6, logistic + intent names + lexical TF-IDF classifier (weight {weight})")):
        rec = _summary(scores[key])
        rows.append((label, rec))
        log(f"{label}: {100 * rec['accuracy']:.2f} ± {100 * rec['accuracy_ci95']:.2f} % (macro F1 {rec['macro_f1']:.3f})")
    log(f"frozen + lexical: {draws} draws in {time.perf_counter() - t:.0f} s")
    return rows


def _summary(metrics: list[dict]) -> dict:
    accs = [m["accuracy"] for m in metrics]
    return {"accuracy": statistics.mean(accs), "accuracy_ci95": mean_ci95(torch.tensor(accs))[1] if len(accs) > 1 else 0.0,
            "macro_f1": statistics.mean(m["macro_f1"] for m in metrics), "draws": len(accs)}


def finetuned(draws: int, epochs: int, members: int, lexical_weight: float, domain_weight: float,
              log) -> list[tuple[str, dict]]:
    """The fine-tuned-encoder route: per draw, ``members`` copies of the encoder fine-tuned with
    different seeds (draw + 1000 · member) on the support texts + intent names, a logistic head
    on each; rows for one member, the members' mean log-probabilities, and each with the lexical
    classifier at ``lexical_weight``; and the last of these with a domain prior at
    ``domain_weight``: a logistic head on the same support features that tells the intents'
    domains apart (``domains.json``, label metadata like the names; no other texts), whose
    log-probability of each intent's domain is added to that intent's score."""
    from metalab.models.text_finetune import finetune_encoder

    corpus = load_clinc150()
    encoder = SentenceEncoder(layers=LAYERS)
    source = embed_corpus(corpus, encoder)  # only to draw support indices and hold the test texts
    texts = source.meta["per_example"]["text"]
    names = label_name_texts(corpus.class_names)
    class_domains, domains = corpus.class_domains, len(corpus.domain_names)
    metrics: dict[str, list] = {}
    seconds = []
    for d in range(draws):
        support, queries = draw_support(source, 5, d)
        support_texts = [texts[i] for i in support] + names
        query_texts = [texts[i] for i in queries]
        support_y = torch.cat([source.y[support], torch.arange(150)])
        t = time.perf_counter()
        member_log_p, member_domain_log_p = [], []
        for m in range(members):
            tuned = finetune_encoder(encoder, support_texts, support_y, 150, epochs=epochs, lr=1e-4, seed=d + 1000 * m,
                                     progress=False)
            support_z, query_z = tuned.encode(support_texts), tuned.encode(query_texts)
            head = fit_head("logistic", support_z, support_y, 150, c=30.0)
            member_log_p.append(head.scores(query_z).log_softmax(-1))
            # the same support (texts and names) labelled by intent domain: 10 classes of 90 examples each
            domain_head = fit_head("logistic", support_z, class_domains[support_y], domains, c=30.0)
            member_domain_log_p.append(domain_head.scores(query_z).log_softmax(-1))
        lex_p = LexicalClassifier().fit(support_texts, support_y, 150).log_probs(query_texts)
        ensemble = torch.stack(member_log_p).mean(0)
        domain_prior = torch.stack(member_domain_log_p).mean(0)[:, class_domains]  # [Q, 150]: each intent's domain
        variants = {"1": member_log_p[0], "1+lex": combine_log_probs(member_log_p[0], lex_p, lexical_weight)}
        if members > 1:
            variants.update({f"{members}": ensemble, f"{members}+lex": combine_log_probs(ensemble, lex_p, lexical_weight)})
        top = f"{members}+lex" if members > 1 else "1+lex"
        variants[f"{top}+domain"] = combine_log_probs(variants[top], domain_prior, domain_weight)
        for key, lp in variants.items():
            metrics.setdefault(key, []).append(
                classification_metrics(source.y[queries].numpy(), lp.argmax(-1).numpy(), source.class_names))
        seconds.append(time.perf_counter() - t)
        log(f"fine-tuned draw {d}: " + ", ".join(f"{k} {100 * v[-1]['accuracy']:.2f} %" for k, v in metrics.items())
            + f" ({seconds[-1]:.0f} s)")
    base = f"fine-tuned encoder, layers 4-6 ({epochs} epochs, lr 1e-4, cosine-classifier loss) + intent names, logistic"
    labels = {"1": base, "1+lex": f"{base} + lexical (weight {lexical_weight})"}
    if members > 1:
        several = f"{members} {base.replace('encoder', 'encoders (seeds), mean log-probabilities', 1)}"
        labels.update({f"{members}": several, f"{members}+lex": f"{several} + lexical (weight {lexical_weight})"})
    top = f"{members}+lex" if members > 1 else "1+lex"
    labels[f"{top}+domain"] = (f"{labels[top]} + domain prior (a logistic head over the intents' 10 domains on the same "
                               f"support features, its log-probability of each intent's domain at weight {domain_weight})")
    rows = []
    for key, ms in metrics.items():
        rec = _summary(ms)
        rec["seconds_per_draw"] = statistics.mean(seconds)
        rows.append((labels[key], rec))
        log(f"{labels[key]}: {100 * rec['accuracy']:.2f} ± {100 * rec['accuracy_ci95']:.2f} % (macro F1 {rec['macro_f1']:.3f})")
    return rows


def cross_domain(budget_steps: int, log) -> list[tuple[str, str, float, float]]:
    splits = load_splits("clinc150", text={"encoder": "minilm", "layers": list(LAYERS)})
    log(f"split: {splits.description}")
    plain = build_algorithm("protonet", build_backbone("identity", (splits.train.x.shape[1],))).eval()
    heads = [("plain prototypes (frozen embeddings, no training)", plain)]
    for backbone, lr in (("diagonal", 1e-2), ("linear", 1e-3)):
        config = RunConfig.from_dict({"name": f"clinc-protonet-{backbone}", "data": {"source": "clinc150"},
                                      "train": {"algo": "protonet", "backbone": backbone, "ways": 5, "shots": [1, 5],
                                                "queries": 10, "meta_batch": 16, "steps": budget_steps, "lr": lr,
                                                "val_every": 100, "checkpoint_every": budget_steps}})
        run_dir = Path("runs") / f"bench-clinc-protonet-{backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
        trainer = MetaTrainer(config, run_dir, splits=splits, show_progress=False, log=lambda *_: None)
        t = time.perf_counter()
        trainer.train()
        log(f"meta-trained ProtoNet + {backbone} head (lr {lr}): {budget_steps} steps in {time.perf_counter() - t:.0f} s")
        what = "per-dimension weighting" if backbone == "diagonal" else "full linear projection"
        heads.append((f"ProtoNet + meta-learned {what} ({backbone}, lr {lr})", trainer.algorithm.eval()))
    rows = []
    for shots in (1, 5):
        per_episode = {}
        for label, algo in heads:
            per_episode[label] = _episode_accuracies(algo, splits.test, shots)
            mean, ci = mean_ci95(per_episode[label])
            rows.append((f"5w{shots}s", label, mean, ci))
            log(f"5w{shots}s {label}: {100 * mean:.2f} ± {100 * ci:.2f}")
        base = per_episode[heads[0][0]]
        for label, _ in heads[1:]:  # same 600 episodes: the paired difference is the sharper test
            mean, ci = mean_ci95(per_episode[label] - base)
            rows.append((f"5w{shots}s", f"difference: {label.split(' (')[0]} − plain prototypes (paired)", mean, ci))
            log(f"5w{shots}s paired difference {label}: {100 * mean:+.2f} ± {100 * ci:.2f}")
    return rows


def _episode_accuracies(algo, source, shots: int) -> torch.Tensor:
    """Accuracy of each of 600 5-way episodes (15 queries), the same episodes for every head."""
    features = encode_source(algo, source, torch.device("cpu"))
    sampler = EpisodeSampler(features, 5, shots, 15, tasks=50, seed=2024)
    return evaluate_sampler(algo, sampler, 600, "cpu", features=True, show_progress=False)


def latency(log) -> list[tuple[str, float]]:
    corpus = load_clinc150()
    source = embed_corpus(corpus, SentenceEncoder(layers=LAYERS), progress=False)
    support, _ = draw_support(source, 5, 0)
    sx, sy = source.x[support], source.y[support]
    rows = []
    for kind, options in (("prototypes", {}), ("ridge", {"lam": 1.0}), ("logistic", {"c": 30.0})):
        times = []
        for _ in range(20):
            t = time.perf_counter()
            head = fit_head(kind, sx, sy, 150, **options)
            head.scores(sx[:1])
            times.append(time.perf_counter() - t)
        rows.append((kind, statistics.median(times)))
        log(f"adapt 150-way 5-shot ({kind}) + predict 1: {1000 * statistics.median(times):.1f} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--finetune-draws", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--finetune-members", type=int, default=2, help="fine-tuned encoders (seeds) per draw")
    parser.add_argument("--lexical-weight", type=float, default=0.1, help="weight of the lexical classifier's log-probabilities (chosen on val)")
    parser.add_argument("--domain-weight", type=float, default=0.25, help="weight of the domain prior's log-probabilities (chosen on val)")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--meta-steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clinc150.md"))
    parser.add_argument("--only", choices=["cross-domain-and-latency"], help="run only these sections (written to --out)")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines: list[str] = []
    log = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731
    start = time.strftime("%Y-%m-%d %H:%M")
    only = args.only is not None
    frozen = [] if only else all_intents(args.draws, log)
    lexical = [] if only else frozen_with_lexical(args.draws, args.lexical_weight, log)
    cross = cross_domain(args.meta_steps, log)
    lat = latency(log)
    ft = [] if args.skip_finetune or only else finetuned(args.finetune_draws, args.finetune_epochs, args.finetune_members,
                                                         args.lexical_weight, args.domain_weight, log)

    md = [f"# CLINC150 with all-MiniLM-L6-v2 ({start}, {torch.get_num_threads()} CPU threads, torch {torch.__version__})", "",
          *([] if only else ["## All 150 intents, 5 shots each (from the train split), whole in-scope test split (4,500)", ""]),
          *([] if only else [
              f"Mean ± 95 % CI over {args.draws} support draws (seeds 0..{args.draws - 1}). OOS: threshold on the top logit fitted "
              "on val + oos_val, figures on test + oos_test.", "",
              "| route | accuracy (%) | macro F1 | in-scope acc. with OOS (%) | OOS recall (%) |", "|---|---|---|---|---|"])]
    for label, rec in frozen:
        md.append(f"| {label} | {100 * rec['accuracy']:.2f} ± {100 * rec['accuracy_ci95']:.2f} | {rec['macro_f1']:.3f} | "
                  f"{100 * rec['oos']['in_scope_accuracy']:.2f} | {100 * rec['oos']['oos_recall']:.2f} |")
    for label, rec in lexical:
        md.append(f"| {label} | {100 * rec['accuracy']:.2f} ± {100 * rec['accuracy_ci95']:.2f} | {rec['macro_f1']:.3f} | | |")
    for label, rec in ft:
        md.append(f"| {label} ({rec['draws']} draws, {rec['seconds_per_draw']:.0f} s each for all members) | "
                  f"{100 * rec['accuracy']:.2f} ± {100 * rec['accuracy_ci95']:.2f} | {rec['macro_f1']:.3f} | | |")
    md += ["", f"## Cross-domain: meta-test domains {', '.join(CLINC150_TEST_DOMAINS)} (45 intents), 600 episodes, 15 queries", "",
           "| setting | head on frozen layers-4-6 embeddings | accuracy (%) |", "|---|---|---|"]
    md += [f"| {s} | {label} | {100 * m:+.2f} ± {100 * c:.2f} |" if label.startswith("difference") else
           f"| {s} | {label} | {100 * m:.2f} ± {100 * c:.2f} |" for s, label, m, c in cross]
    md += ["", "## Adaptation latency, new 150-way 5-shot task from cached embeddings (median of 20)", "",
           "| head | ms |", "|---|---|"]
    md += [f"| {k} | {1000 * v:.1f} |" for k, v in lat]
    md += ["", "## Log", "", "```", *lines, "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
