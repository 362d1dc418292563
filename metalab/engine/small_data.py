"""Defaults that fit small data: a user's own folder of 6 classes × 5 images should train and
evaluate on the defaults, not fail three times on 15 queries, 20-way settings and 5 ways.

Only fields the user did not write are changed (``RunConfig.given``), each with a note, and the
changed values are what the run folder's ``config.yaml`` records, so a resume trains the same run.
"""

from __future__ import annotations

from typing import Callable

from metalab.data.splits import Splits
from metalab.engine.config import RunConfig


def _top(value) -> int:
    return max(value) if isinstance(value, (list, tuple)) else int(value)


def _defaulted(config: RunConfig) -> set[str]:
    """The fields left to their defaults: not written by the user (``RunConfig.given``) and, in case
    code changed them after the config was built, still equal to the default."""
    given = getattr(config, "given", None)
    if given is None:  # a config not built from a dict (e.g. RunConfig() in code): every field counts as given
        return set()
    fresh = RunConfig()
    out = set()
    for key in ("train.ways", "train.queries", "eval.settings", "eval.queries"):
        section, name = key.split(".")
        if key not in given and getattr(getattr(config, section), name) == getattr(getattr(fresh, section), name):
            out.add(key)
    return out


def fit_defaults(config: RunConfig, splits: Splits, log: Callable[[str], None] = print) -> None:
    """Scale the defaults of ``train.ways``, ``train.queries``, ``eval.settings`` and ``eval.queries``
    down to what ``splits`` can fill (in place), saying what changed."""
    defaulted = _defaulted(config)
    t, e = config.train, config.eval
    train, test = splits.train, splits.test
    notes = []
    if "train.ways" in defaulted and isinstance(t.ways, int) and 2 <= train.num_classes < t.ways:
        notes.append(f"train.ways {t.ways} → {train.num_classes} (the training split has {train.num_classes} classes)")
        t.ways = train.num_classes
    smallest = int(train.class_counts().min()) if train.num_classes else 0
    if "train.queries" in defaulted and smallest - _top(t.shots) < t.queries and smallest - _top(t.shots) >= 1:
        fitted = smallest - _top(t.shots)
        notes.append(f"train.queries {t.queries} → {fitted} (the smallest training class has {smallest} examples)")
        t.queries = fitted
    if test is not None and test.num_classes >= 2:
        test_smallest = int(test.class_counts().min())
        if "eval.settings" in defaulted:
            fits = []  # each setting at the ways the test split has, while its shots leave a query
            for w, k in e.settings:
                pair = [min(w, test.num_classes), k]
                if k + 1 <= test_smallest and pair not in fits:
                    fits.append(pair)
            if fits and fits != e.settings:
                notes.append(f"eval.settings {e.settings} → {fits} (the test split has {test.num_classes} classes, "
                             f"the smallest with {test_smallest} examples)")
                e.settings = fits
        room = test_smallest - max(k for _, k in e.settings)
        if "eval.queries" in defaulted and 1 <= room < e.queries:
            notes.append(f"eval.queries {e.queries} → {room}")
            e.queries = room
    if notes:
        log("small data: " + "; ".join(notes) + ". Set these fields to keep other values.")
