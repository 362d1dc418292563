"""A meta-batch of few-shot tasks, as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Episodes:
    """``tasks`` N-way K-shot Q-query tasks, stacked.

    Within each task, labels are ``0..ways-1`` and examples are class-major
    (``support_y == arange(ways).repeat_interleave(shots)``).

    Attributes:
        support_x: ``[tasks, ways*shots, ...]``
        support_y: ``int64 [tasks, ways*shots]``
        query_x: ``[tasks, ways*queries, ...]``
        query_y: ``int64 [tasks, ways*queries]`` (float targets for regression sources)
        classes: source class index of each task's labels ``int64 [tasks, ways]``
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    ways: int
    shots: int
    queries: int

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> "Episodes":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Episodes(
            move(self.support_x), move(self.support_y), move(self.query_x), move(self.query_y),
            self.classes, self.ways, self.shots, self.queries,
        )

    def task(self, i: int) -> "Episodes":
        """Task ``i`` alone, as a meta-batch of one."""
        s = slice(i, i + 1)
        return Episodes(
            self.support_x[s], self.support_y[s], self.query_x[s], self.query_y[s], self.classes[s],
            self.ways, self.shots, self.queries,
        )

    def split_tasks(self, parts: int, index: int) -> "Episodes":
        """The ``index``-th of ``parts`` contiguous chunks of tasks (for data-parallel training)."""
        chunk = -(-self.tasks // parts)
        s = slice(index * chunk, (index + 1) * chunk)
        return Episodes(
            self.support_x[s], self.support_y[s], self.query_x[s], self.query_y[s], self.classes[s],
            self.ways, self.shots, self.queries,
        )
