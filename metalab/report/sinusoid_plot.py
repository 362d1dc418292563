"""Pre/post-adaptation curves for a few sinusoid tasks (the MAML paper's Figure 2, as a PNG)."""

from __future__ import annotations

from pathlib import Path

import torch

from metalab.algorithms.base import Algorithm


def plot_sinusoid_adaptation(algorithm: Algorithm, family, path: Path, steps: tuple[int, ...] = (1, 10),
                             tasks: int = 3) -> Path:
    """For ``tasks`` tasks of ``family``: the true curve, the K support points, and the model's
    prediction before adaptation and after each number of ``steps``. Writes ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch, amps, phases = family.sample_with_params(10_000)
    params = algorithm.params()
    fig, axes = plt.subplots(1, tasks, figsize=(4.2 * tasks, 3.4), sharey=True)
    for t, ax in enumerate(axes):
        x, y = family.curve(float(amps[t]), float(phases[t]), x_range=family.x_range)
        ax.plot(x, y, color="black", lw=2, label="true")
        with torch.no_grad():
            before = algorithm.forward_fast(algorithm.task_init(params, 1), x)
        ax.plot(x, before, ls=":", color="grey", label="before adaptation")
        for k in steps:
            predictor = algorithm.adapt(params, batch.support_x[t], batch.support_y[t], 1, steps=k)
            ax.plot(x, predictor.logits(x), label=f"after {k} step{'s' if k > 1 else ''}")
        ax.scatter(batch.support_x[t], batch.support_y[t], color="red", zorder=5, s=18, label=f"{family.shots} shots")
        ax.set_title(f"A={float(amps[t]):.2f}, phase={float(phases[t]):.2f}")
        ax.set_xlabel("x")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{algorithm.name}: sinusoid regression, {family.shots}-shot adaptation")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
