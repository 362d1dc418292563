"""The realistic text task: every intent of a set of classes at K shots, scored on held-out
utterances, with macro precision / recall / F1, a per-class report and out-of-scope rejection.

Support comes from the file's ``train`` part of each class, queries from its ``test`` part (or,
for files without parts, from the examples not drawn as support). Out-of-scope rejection
thresholds the top logit (:func:`confidence`); the threshold is fitted on data that is *not* the
evaluated utterances (validation utterances and CLINC's ``oos_val``), as in Larson et al. 2019.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from metalab.data.source import LabelledSource
from metalab.engine.progress import progress_bar
from metalab.errors import DataError

#: ``(support_x [S, D], support_y [S], ways) -> (query_x [Q, D] -> logits [Q, ways])``
HeadFactory = Callable[[torch.Tensor, torch.Tensor, int], Callable[[torch.Tensor], torch.Tensor]]


def parts_of(source: LabelledSource) -> list[str]:
    return source.meta.get("per_example", {}).get("part") or ["train"] * source.x.shape[0]


def full_task_unfit(source: LabelledSource, shots: int, support_part: str = "train") -> str | None:
    """Why "all classes at ``shots`` shots" cannot be drawn from ``source`` ("needs … but …"), or
    ``None`` when every class has ``shots`` examples in ``support_part``."""
    in_part = torch.tensor([p == support_part for p in parts_of(source)])
    counts = torch.bincount(source.y[in_part], minlength=source.num_classes)
    if int(counts.min()) < shots:
        short = source.class_names[int(counts.argmin())]
        return f"needs {shots} '{support_part}' examples of every class but '{short}' has {int(counts.min())}"
    return None


def draw_support(source: LabelledSource, shots: int, seed: int, support_part: str = "train",
                 query_part: str | None = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(support [C*shots], queries [Q])``: ``shots`` random ``support_part`` examples
    per class (seeded), queries from ``query_part`` (or every non-support example when the source
    has no such part)."""
    parts = parts_of(source)
    g = torch.Generator().manual_seed(seed)
    is_support_part = torch.tensor([p == support_part for p in parts])
    support = []
    for c in range(source.num_classes):
        pool = ((source.y == c) & is_support_part).nonzero().flatten()
        if len(pool) < shots:
            raise DataError(f"Class '{source.class_names[c]}' has {len(pool)} '{support_part}' examples but {shots} shots were asked; lower shots or add examples.")
        support.append(pool[torch.randperm(len(pool), generator=g)[:shots]])
    support = torch.cat(support)
    if query_part is not None and query_part in parts:
        queries = torch.tensor([p == query_part for p in parts]).nonzero().flatten()
    else:
        mask = torch.ones(source.x.shape[0], dtype=torch.bool)
        mask[support] = False
        queries = mask.nonzero().flatten()
    if len(queries) == 0:
        raise DataError(f"Source '{source.name}' has no examples left to score after drawing {shots} shots per class; add examples.")
    return support, queries


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro precision / recall / F1 and a per-class report (scikit-learn's definitions;
    a class never predicted has precision 0)."""
    from sklearn.metrics import precision_recall_fscore_support  # here, not at the top: sklearn takes ~2 s to import

    labels = np.arange(len(class_names))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = [{"class": class_names[i], "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                  "support": int(support[i])} for i in labels]
    return {"accuracy": float((y_true == y_pred).mean()), "macro_precision": float(p.mean()),
            "macro_recall": float(r.mean()), "macro_f1": float(f.mean()), "per_class": per_class}


def fit_oos_threshold(in_scope_conf: torch.Tensor, in_scope_correct: torch.Tensor, oos_conf: torch.Tensor) -> float:
    """The confidence threshold that maximises the mean of in-scope accuracy (a rejected in-scope
    utterance counts as wrong) and out-of-scope recall, over the given validation scores."""
    candidates = torch.cat([in_scope_conf, oos_conf]).unique()
    best, best_t = -1.0, 0.0
    for t in candidates.tolist():
        in_acc = ((in_scope_conf >= t) & in_scope_correct).float().mean().item()
        oos_rec = (oos_conf < t).float().mean().item()
        if (in_acc + oos_rec) / 2 > best:
            best, best_t = (in_acc + oos_rec) / 2, t
    return best_t


def oos_metrics(in_conf: torch.Tensor, in_correct: torch.Tensor, oos_conf: torch.Tensor, threshold: float) -> dict:
    """In-scope accuracy and out-of-scope recall under ``threshold`` (Larson et al.'s two numbers)."""
    return {"threshold": threshold,
            "in_scope_accuracy": ((in_conf >= threshold) & in_correct).float().mean().item(),
            "oos_recall": (oos_conf < threshold).float().mean().item()}


def _ci(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    return 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values))


@torch.no_grad()
def evaluate_full_task(head: HeadFactory, source: LabelledSource, shots: int, draws: int = 10, seed: int = 0,
                       oos_queries: torch.Tensor | None = None, threshold_task: tuple | None = None,
                       show_progress: bool = True, description: str = "full task") -> dict:
    """All of ``source``'s classes at ``shots`` shots, ``draws`` random support draws.

    ``threshold_task``: ``(val_source, oos_val [V, D])`` to fit the out-of-scope threshold on
    (support from its ``train`` part, in-scope from its ``val`` part), each draw; with
    ``oos_queries`` (``[O, D]``) the report adds in-scope accuracy and out-of-scope recall.
    Returns mean ± 95 % CI over draws of accuracy and macro P/R/F1, the per-class report pooled
    over draws, and OOS figures.
    """
    ways = source.num_classes
    accs, precs, recs, f1s, oos = [], [], [], [], []
    y_true_all, y_pred_all = [], []
    with progress_bar(f"{description}: {ways}-way {shots}-shot × {draws}", draws, enabled=show_progress) as bar:
        for d in range(draws):
            support, queries = draw_support(source, shots, seed + d)
            scorer = head(source.x[support], source.y[support], ways)
            logits = scorer(source.x[queries])
            pred = logits.argmax(-1)
            y_true = source.y[queries]
            m = classification_metrics(y_true.numpy(), pred.numpy(), source.class_names)
            accs.append(m["accuracy"]); precs.append(m["macro_precision"])
            recs.append(m["macro_recall"]); f1s.append(m["macro_f1"])
            y_true_all.append(y_true); y_pred_all.append(pred)
            if oos_queries is not None and threshold_task is not None:
                threshold = _fit_threshold_on(head, *threshold_task, shots, seed + d)
                conf = confidence(logits)
                oos_conf = confidence(scorer(oos_queries))
                oos.append(oos_metrics(conf, pred == y_true, oos_conf, threshold))
            bar.advance()
    pooled = classification_metrics(torch.cat(y_true_all).numpy(), torch.cat(y_pred_all).numpy(), source.class_names)
    record = {"ways": ways, "shots": shots, "draws": draws, "queries": int(len(y_true_all[0])),
              "accuracy": float(np.mean(accs)), "accuracy_ci95": _ci(accs), "draw_accuracies": [float(a) for a in accs],
              "macro_precision": float(np.mean(precs)), "macro_recall": float(np.mean(recs)),
              "macro_f1": float(np.mean(f1s)), "macro_f1_ci95": _ci(f1s),
              "per_class": sorted(pooled["per_class"], key=lambda r: r["f1"])}
    if oos:
        record["out_of_scope"] = {
            "threshold": float(np.mean([o["threshold"] for o in oos])),
            "in_scope_accuracy": float(np.mean([o["in_scope_accuracy"] for o in oos])),
            "in_scope_accuracy_ci95": _ci([o["in_scope_accuracy"] for o in oos]),
            "oos_recall": float(np.mean([o["oos_recall"] for o in oos])),
            "oos_recall_ci95": _ci([o["oos_recall"] for o in oos]),
            "oos_queries": int(oos_queries.shape[0]),
        }
    return record


def _fit_threshold_on(head: HeadFactory, val_source: LabelledSource, oos_val: torch.Tensor, shots: int, seed: int) -> float:
    support, queries = draw_support(val_source, shots, seed, "train", "val")
    scorer = head(val_source.x[support], val_source.y[support], val_source.num_classes)
    logits = scorer(val_source.x[queries])
    correct = logits.argmax(-1) == val_source.y[queries]
    return fit_oos_threshold(confidence(logits), correct, confidence(scorer(oos_val)))


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """How sure a head is of its best label ``[Q]``: the top logit. Unlike the top softmax
    probability it does not shrink as labels are added, so a threshold fitted on a 10-label
    validation task carries over to a 45- or 150-label task."""
    return logits.max(-1).values
