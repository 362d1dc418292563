"""A labelled source held in memory as tensors: the start of the data flow.

A :class:`LabelledSource` is what every loader (Omniglot zips, image folders, arrays, text)
produces and what :class:`~metalab.data.sampler.EpisodeSampler` draws from. Examples live in one
tensor so an episode is a gather, never a Python loop over items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metalab.errors import DataError


@dataclass(frozen=True)
class LabelledSource:
    """Examples, their class, and each class's domain.

    Attributes:
        x: examples ``[M, ...]`` (images as ``uint8 [M, C, H, W]``, features as float).
        y: class index of each example ``int64 [M]``, in ``range(len(class_names))``.
        class_names: one name per class (unique).
        class_domains: domain index of each class ``int64 [num_classes]``.
        domain_names: one name per domain.
        name: a short human name for the source (used in messages and reports).
        meta: anything else; ``meta["per_example"]`` maps names to per-example lists or tensors
            (``[M]``) that :meth:`subset` keeps aligned with ``x`` (e.g. the texts behind embeddings).
    """

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    class_domains: torch.Tensor
    domain_names: list[str]
    name: str = "source"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"Source '{self.name}' has {self.x.shape[0]} examples but {self.y.shape[0]} labels; "
                "give one label per example."
            )
        if self.x.shape[0] == 0:
            raise DataError(f"Source '{self.name}' is empty; it needs at least one labelled example.")
        if len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"Source '{self.name}' has duplicate class names; class names must be unique.")
        if self.class_domains.shape[0] != len(self.class_names):
            raise DataError(
                f"Source '{self.name}' gives {self.class_domains.shape[0]} class domains for "
                f"{len(self.class_names)} classes; give one domain per class."
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def class_counts(self) -> torch.Tensor:
        """Examples per class ``int64 [num_classes]``."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def subset(self, classes: list[int] | torch.Tensor, name: str | None = None) -> "LabelledSource":
        """The source restricted to ``classes`` (re-indexed 0..len-1 in the given order)."""
        classes = torch.as_tensor(classes, dtype=torch.long)
        remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        remap[classes] = torch.arange(len(classes))
        keep = remap[self.y] >= 0
        old_domains = self.class_domains[classes]
        used_domains, new_domains = torch.unique(old_domains, return_inverse=True)
        return LabelledSource(
            x=self.x[keep],
            y=remap[self.y[keep]],
            class_names=[self.class_names[int(c)] for c in classes],
            class_domains=new_domains,
            domain_names=[self.domain_names[int(d)] for d in used_domains],
            name=name or self.name,
            meta=_subset_meta(self.meta, keep),
        )

    def describe(self) -> dict:
        counts = self.class_counts()
        return {
            "name": self.name,
            "examples": int(self.x.shape[0]),
            "classes": self.num_classes,
            "domains": self.num_domains,
            "min_per_class": int(counts.min()),
            "max_per_class": int(counts.max()),
            "example_shape": list(self.x.shape[1:]),
        }


def _subset_meta(meta: dict, keep: torch.Tensor) -> dict:
    """Copy ``meta``; its ``per_example`` entries (lists or tensors of length M) follow ``keep``."""
    out = dict(meta)
    if "per_example" in meta:
        idx = keep.nonzero().flatten().tolist()
        out["per_example"] = {k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in idx])
                              for k, v in meta["per_example"].items()}
    return out


def concat_sources(sources: list[LabelledSource], name: str) -> LabelledSource:
    """Stack sources with disjoint class names into one (domains are merged by name)."""
    domain_names: list[str] = []
    for s in sources:
        domain_names += [d for d in s.domain_names if d not in domain_names]
    xs, ys, names, doms, offset = [], [], [], [], 0
    for s in sources:
        xs.append(s.x)
        ys.append(s.y + offset)
        names += s.class_names
        doms.append(torch.tensor([domain_names.index(s.domain_names[int(d)]) for d in s.class_domains]))
        offset += s.num_classes
    return LabelledSource(torch.cat(xs), torch.cat(ys), names, torch.cat(doms), domain_names, name)
