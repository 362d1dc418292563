"""The sinusoid regression task family of the MAML paper (Finn et al. 2017, §5.1).

A task is ``y = A · sin(x − φ)`` with amplitude ``A ~ U[0.1, 5]``, phase ``φ ~ U[0, π]`` and
inputs ``x ~ U[−5, 5]``. :class:`SinusoidTasks` has the sampler's interface: ``sample(index)``
returns :class:`~metalab.data.episodes.Episodes` (``ways = 1``, float targets ``[T, K, 1]``),
a pure function of ``(seed, index)``, so regression uses the same engine as classification.
"""

from __future__ import annotations

import math

import torch

from metalab.data.episodes import Episodes
from metalab.errors import ConfigError


class SinusoidTasks:
    """Meta-batches of ``tasks`` sinusoids with ``shots`` support and ``queries`` query points."""

    def __init__(self, shots: int = 10, queries: int = 10, tasks: int = 25, seed: int = 0,
                 amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0)) -> None:
        if shots < 1 or queries < 1 or tasks < 1:
            raise ConfigError(f"shots={shots}, queries={queries}, tasks={tasks}: all must be at least 1.")
        self.shots, self.queries, self.tasks, self.seed = shots, queries, tasks, seed
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def draw_tasks(self, g: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitudes and phases ``[count, 1, 1]``."""
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * torch.rand(count, 1, 1, generator=g)
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * torch.rand(count, 1, 1, generator=g)
        return amp, phase

    def sample(self, index: int = 0) -> Episodes:
        return self.sample_with_params(index)[0]

    def sample_with_params(self, index: int = 0) -> tuple[Episodes, torch.Tensor, torch.Tensor]:
        """Meta-batch ``index`` and its tasks' amplitudes and phases ``[T, 1, 1]``."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (2**63 - 1) + 17)
        amp, phase = self.draw_tasks(g, self.tasks)
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(self.tasks, self.shots + self.queries, 1, generator=g)
        y = amp * torch.sin(x - phase)
        k = self.shots
        episodes = Episodes(support_x=x[:, :k], support_y=y[:, :k], query_x=x[:, k:], query_y=y[:, k:],
                            classes=torch.zeros(self.tasks, 1, dtype=torch.long), ways=1, shots=k, queries=self.queries)
        return episodes, amp, phase

    @staticmethod
    def curve(amp: float, phase: float, points: int = 200, x_range=(-5.0, 5.0)) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.linspace(x_range[0], x_range[1], points)[:, None]
        return x, amp * torch.sin(x - phase)
