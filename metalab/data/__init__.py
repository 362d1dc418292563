"""Data: sources → class splits → episode sampling."""

from metalab.data.augment import with_rotations
from metalab.data.episodes import Episodes
from metalab.data.sampler import EpisodeSampler
from metalab.data.source import LabelledSource
from metalab.data.splits import Splits, omniglot_canonical_split, split_by_class, split_by_domain

__all__ = [
    "EpisodeSampler", "Episodes", "LabelledSource", "Splits", "omniglot_canonical_split",
    "split_by_class", "split_by_domain", "with_rotations",
]
