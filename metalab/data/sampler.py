"""N-way K-shot episode sampling by index arithmetic over a preloaded source.

A meta-batch is drawn in a handful of tensor ops: the smallest of random keys (``topk``) pick each
task's classes, a second ``topk`` picks each class's examples, then one gather builds
``support_x [tasks, ways*shots, ...]`` and ``query_x [tasks, ways*queries, ...]``.
Episode ``i`` depends only on ``(seed, i)``, so training resumes onto the very same episodes.
"""

from __future__ import annotations

import torch

from metalab.data.episodes import Episodes
from metalab.data.source import LabelledSource
from metalab.errors import ConfigError, DataError

IntOrRange = int | tuple[int, int]
FLOAT_COPY_LIMIT_BYTES = 512 * 2**20


def _as_range(value: IntOrRange, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ConfigError(f"{name}={value!r} is invalid; give a positive integer or a (min, max) pair with min <= max.")
    lo, hi = pair
    if lo < 1 or hi < lo:
        raise ConfigError(f"{name}={value!r} is invalid; give a positive integer or a (min, max) pair with min <= max.")
    return int(lo), int(hi)


class EpisodeSampler:
    """Draws meta-batches of few-shot tasks from a :class:`LabelledSource`.

    Args:
        source: the examples to draw from (one split: train, val or test).
        ways: classes per task, or a ``(min, max)`` range drawn per meta-batch.
        shots: support examples per class, or a ``(min, max)`` range drawn per meta-batch.
        queries: query examples per class.
        tasks: tasks per meta-batch.
        seed: base seed; meta-batch ``i`` is a pure function of ``(seed, i)``.
        same_domain: draw every task's classes from a single domain.
        to_float: turn ``uint8`` images into ``float32`` in ``[0, 1]``.
        planner: a :class:`~metalab.data.planner.TaskPlanner` shaping which classes are drawn
            (default: uniform).
    """

    def __init__(
        self,
        source: LabelledSource,
        ways: IntOrRange = 5,
        shots: IntOrRange = 1,
        queries: int = 15,
        tasks: int = 1,
        seed: int = 0,
        same_domain: bool = False,
        to_float: bool = True,
        planner=None,
    ) -> None:
        self.source = source
        self.ways_range = _as_range(ways, "ways")
        self.shots_range = _as_range(shots, "shots")
        if queries < 1:
            raise ConfigError(f"queries={queries} is invalid; each class needs at least one query example.")
        if tasks < 1:
            raise ConfigError(f"tasks={tasks} is invalid; a meta-batch needs at least one task.")
        self.queries, self.tasks, self.seed = queries, tasks, seed
        self.same_domain, self.to_float, self.planner = same_domain, to_float, planner

        counts = source.class_counts()
        need = self.shots_range[1] + queries
        short = (counts < need).nonzero().flatten()
        if len(short):
            c = int(short[0])
            raise DataError(
                f"Class '{source.class_names[c]}' of source '{source.name}' has {int(counts[c])} examples but "
                f"{self.shots_range[1]}-shot {queries}-query episodes need {need}; lower shots/queries or add examples"
                + (f" ({len(short)} classes are short)." if len(short) > 1 else ".")
            )
        max_ways = self._max_ways()
        if self.ways_range[1] > max_ways:
            where = "a single domain" if same_domain else f"source '{source.name}'"
            raise DataError(
                f"{self.ways_range[1]}-way tasks need {self.ways_range[1]} classes but {where} has only "
                f"{max_ways}; lower ways" + (" or drop same_domain." if same_domain else " or add classes.")
            )
        # class_table[c, j] = index (into source.x) of the j-th example of class c
        order = torch.argsort(source.y, stable=True)
        self.counts = counts
        self.class_table = torch.zeros(source.num_classes, int(counts.max()), dtype=torch.long)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(len(order)) - starts[source.y[order]]
        self.class_table[source.y[order], pos] = order
        self._full_rows = bool((counts == self.class_table.shape[1]).all())  # no padding to mask out
        self._labels: dict[tuple[int, int], torch.Tensor] = {}
        # images as float once, when that copy is small; otherwise converted per meta-batch
        x = source.x
        small = x.dtype == torch.uint8 and x.numel() * 4 <= FLOAT_COPY_LIMIT_BYTES
        self._x = x.float().div_(255.0) if (to_float and small) else x
        self._dom_onehot = torch.nn.functional.one_hot(source.class_domains, source.num_domains).bool()
        doms_ok = self._dom_onehot.sum(0) >= self.ways_range[1]
        self._eligible_domains = doms_ok.nonzero().flatten()

    def _max_ways(self) -> int:
        if not self.same_domain:
            return self.source.num_classes
        return int(torch.bincount(self.source.class_domains, minlength=self.source.num_domains).max())

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (2**63 - 1))

    def sample(self, index: int = 0) -> Episodes:
        """Meta-batch number ``index`` (deterministic in ``(seed, index)``)."""
        g = self.generator(index)
        ways = int(torch.randint(self.ways_range[0], self.ways_range[1] + 1, (1,), generator=g))
        shots = int(torch.randint(self.shots_range[0], self.shots_range[1] + 1, (1,), generator=g))
        classes = self.sample_classes(ways, g)
        idx = self.sample_examples(classes, shots + self.queries, g)  # [T, ways, shots+queries]
        return self.gather(idx, classes, ways, shots)

    def sample_classes(self, ways: int, g: torch.Generator) -> torch.Tensor:
        """``int64 [tasks, ways]`` distinct classes per task."""
        if self.planner is None or self.planner.strategy == "uniform":
            keys = torch.rand(self.tasks, self.source.num_classes, generator=g)
        else:
            keys = self.planner.class_keys(self.tasks, g)
        if self.same_domain:
            pick = self._eligible_domains[
                torch.randint(len(self._eligible_domains), (self.tasks,), generator=g)
            ]
            keys = keys + (~self._dom_onehot[:, pick].T).float() * 1e9  # other domains sort last
        return keys.topk(ways, dim=1, largest=False).indices  # the `ways` smallest keys, in order (8x faster than an argsort here)

    def sample_examples(self, classes: torch.Tensor, per_class: int, g: torch.Generator) -> torch.Tensor:
        """``int64 [tasks, ways, per_class]`` distinct example indices of each chosen class."""
        keys = torch.rand(*classes.shape, self.class_table.shape[1], generator=g)
        if not self._full_rows:  # rows of smaller classes end in padding: never pick it
            counts = self.counts[classes]  # [T, N]
            keys = keys.masked_fill(torch.arange(self.class_table.shape[1]) >= counts[..., None], 2.0)
        pos = keys.topk(per_class, dim=2, largest=False).indices
        rows = self.class_table.index_select(0, classes.flatten()).view(*classes.shape, -1)
        return torch.gather(rows, 2, pos)

    def _task_labels(self, ways: int, per_class: int) -> torch.Tensor:
        """``int64 [ways*per_class]``: ``0..ways-1``, each repeated ``per_class`` times (cached)."""
        key = (ways, per_class)
        if key not in self._labels:
            self._labels[key] = torch.arange(ways).repeat_interleave(per_class)
        return self._labels[key]

    def gather(self, idx: torch.Tensor, classes: torch.Tensor, ways: int, shots: int) -> Episodes:
        tasks = idx.shape[0]
        support_idx = idx[..., :shots].reshape(tasks, ways * shots)
        query_idx = idx[..., shots:].reshape(tasks, ways * self.queries)
        x = self._x
        # one index_select over flat indices, support rows first: one memcpy per row (advanced
        # indexing is ~6x slower here); support_x and query_x are contiguous views of the result
        rows = x.index_select(0, torch.cat([support_idx.flatten(), query_idx.flatten()]))
        if self.to_float and x.dtype == torch.uint8:
            rows = rows.float().div_(255.0)
        n_support = support_idx.numel()
        sx = rows[:n_support].view(tasks, ways * shots, *x.shape[1:])
        qx = rows[n_support:].view(tasks, ways * self.queries, *x.shape[1:])
        return Episodes(
            support_x=sx,
            support_y=self._task_labels(ways, shots).expand(tasks, -1).contiguous(),
            query_x=qx,
            query_y=self._task_labels(ways, self.queries).expand(tasks, -1).contiguous(),
            classes=classes,
            ways=ways,
            shots=shots,
            queries=self.queries,
        )
