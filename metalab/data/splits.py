"""Class-level splits: meta-train / validation / meta-test never share a class."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalab.data.source import LabelledSource
from metalab.errors import DataError


@dataclass(frozen=True)
class Splits:
    """Three sources over disjoint classes, and how they were made (for reports and configs)."""

    train: LabelledSource
    val: LabelledSource | None  #: None: no classes carved out for validation
    test: LabelledSource | None  #: None: no meta-test classes (``test_domains=[]``: every class meta-trains)
    description: str

    def require(self, part: str) -> LabelledSource:
        """The ``val`` or ``test`` source, or an error saying the split has none."""
        source = getattr(self, part)
        if source is None:
            what = {"test": "meta-test classes (data.test_domains is [])", "val": "validation classes (data.val_fraction is 0)"}[part]
            raise DataError(f"This split has no {what}; evaluate the run on another labelled set (metalab adapt + "
                            "metalab predict --labelled), or train with held-out classes.")
        return source


def _make_splits(source: LabelledSource, train: torch.Tensor, val: torch.Tensor, test: torch.Tensor, desc: str,
                 optional: tuple[str, ...] = ()) -> Splits:
    """``optional``: parts (``val``, ``test``) that may be left without classes (then ``None``)."""
    for part, key, classes, fix in (("validation", "val", val, "raise data.val_fraction"),
                                    ("meta-test", "test", test, "raise data.test_fraction")):
        if len(classes) == 0 and key not in optional:  # each split needs classes of its own
            raise DataError(f"Source '{source.name}' has {source.num_classes} classes and its split leaves none for "
                            f"{part} ({desc.split(': ', 1)[-1]}); {fix} so that one class at least goes there, or add classes.")
    if len(train) == 0:
        raise DataError(f"Source '{source.name}' has no classes left to meta-train on ({desc.split(': ', 1)[-1]}); "
                        "hold out fewer classes.")
    subset = lambda classes, part: source.subset(classes.sort().values, f"{source.name}:{part}") if len(classes) else None  # noqa: E731
    return Splits(subset(train, "train"), subset(val, "val"), subset(test, "test"), desc)


def _permuted(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split_by_class(
    source: LabelledSource, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> Splits:
    """Random split of a source's classes (seeded): every class lands in exactly one split."""
    if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum to less than 1."
        )
    order = _permuted(source.num_classes, seed)
    n_test = max(1, round(test_fraction * source.num_classes))
    n_val = max(1, round(val_fraction * source.num_classes)) if val_fraction > 0 else 0  # some validation, however few the classes
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    if len(train) == 0:
        raise DataError(f"Source '{source.name}' has {source.num_classes} classes: too few to split; add classes.")
    desc = (
        f"random class split of '{source.name}' (seed {seed}): {len(train)} train / {len(val)} val / "
        f"{len(test)} test classes"
    )
    return _make_splits(source, train, val, test, desc, ("val",) if val_fraction == 0 else ())


def split_by_domain(
    source: LabelledSource, train_domains: list[str], test_domains: list[str], val_fraction: float = 0.1, seed: int = 0
) -> Splits:
    """Train on the classes of ``train_domains`` (minus a seeded validation carve-out), test on
    the classes of ``test_domains``. Unknown domain names are an error that lists the known ones."""
    known = set(source.domain_names)
    for d in [*train_domains, *test_domains]:
        if d not in known:
            raise DataError(f"Domain '{d}' is not in source '{source.name}'; known domains: {sorted(known)}.")
    if set(train_domains) & set(test_domains):
        raise DataError(f"Domains {sorted(set(train_domains) & set(test_domains))} are in both train and test; a domain belongs to one side.")
    dom_of = [source.domain_names[int(d)] for d in source.class_domains]
    train_all = torch.tensor([c for c, d in enumerate(dom_of) if d in train_domains], dtype=torch.long)
    test = torch.tensor([c for c, d in enumerate(dom_of) if d in test_domains], dtype=torch.long)
    order = train_all[_permuted(len(train_all), seed)]
    n_val = max(1, round(val_fraction * len(train_all))) if val_fraction > 0 else 0
    val, train = order[:n_val], order[n_val:]
    desc = (
        f"split of '{source.name}' by domain: meta-train {sorted(train_domains)} ({len(train)} classes, "
        f"{len(val)} of them carved out for validation with seed {seed}); "
        + (f"meta-test {sorted(test_domains)} ({len(test)} classes)" if test_domains else "no meta-test classes")
    )
    optional = (("val",) if val_fraction == 0 else ()) + (() if test_domains else ("test",))
    return _make_splits(source, train, val, test, desc, optional)


def omniglot_canonical_split(source: LabelledSource, val_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Meta-train: alphabets of ``images_background_small1``; meta-test: alphabets found only in
    ``images_background_small2`` (katakana, Sanskrit, Tagalog); validation characters carved
    from meta-train by seed."""
    train_alphabets = source.meta["train_alphabets"]
    test_alphabets = [d for d in source.domain_names if d not in train_alphabets]
    return split_by_domain(source, train_alphabets, test_alphabets, val_fraction, seed)
