"""Task planners: which classes go into each training task.

The sampler picks each task's classes as the ``ways`` smallest of one random key per class; a
planner only shapes those keys, so every strategy keeps the sampler's speed and its determinism
(meta-batch ``i`` is a pure function of the seed, ``i`` and the planner's state, which the
checkpoint keeps). Weighted draws without replacement use exponential keys ``−log(u) / w``.

* ``uniform`` — every class equally likely (the default).
* ``domain-balanced`` — each domain (alphabet, intent domain) equally likely, however many classes it has.
* ``curriculum`` — easy classes first, hard ones later: weights ``exp(β·z)`` with ``z`` the
  standardised error of each class and ``β`` going from −2 to +2 over training.
* ``hard`` — hard-task mining: each task is built around an *anchor* class drawn in proportion to
  its current error, and filled with the anchor's nearest classes in the learner's embedding (the
  knowledge graph's neighbours, i.e. what it confuses), the rest at random.

Error statistics come from :meth:`TaskPlanner.observe` (the trainer feeds it the predictions of
training tasks every ``train.planner_every`` steps); neighbours from :meth:`TaskPlanner.set_neighbours`.
"""

from __future__ import annotations

import torch

from metalab.errors import ConfigError

PLANNERS = ("uniform", "domain-balanced", "curriculum", "hard")


class TaskPlanner:
    """Per-class statistics and the keys that pick classes; ``uniform`` unless ``strategy`` says otherwise."""

    def __init__(self, strategy: str, num_classes: int, class_domains: torch.Tensor, neighbour_share: float = 0.5,
                 ema: float = 0.9) -> None:
        if strategy not in PLANNERS:
            raise ConfigError(f"train.planner='{strategy}' is unknown; use one of: {', '.join(PLANNERS)}.")
        self.strategy, self.num_classes = strategy, num_classes
        self.class_domains = torch.as_tensor(class_domains, dtype=torch.long)
        self.neighbour_share, self.ema = neighbour_share, ema
        self.progress = 0.0  #: share of training done, set by the trainer (curriculum)
        self.error = torch.full((num_classes,), float("nan"))  #: running query error per class
        self.neighbours = torch.zeros(num_classes, 0, dtype=torch.long)  #: [C, k] nearest classes

    # ---- statistics ----------------------------------------------------------------------------

    @torch.no_grad()
    def observe(self, classes: torch.Tensor, query_y: torch.Tensor, predicted: torch.Tensor) -> None:
        """Update per-class errors from one meta-batch: ``classes [T, ways]`` (global ids),
        ``query_y`` and ``predicted`` ``[T, M]`` (task-local labels)."""
        true = torch.gather(classes, 1, query_y).flatten()
        wrong = (predicted != query_y).float().flatten()
        totals = torch.bincount(true, minlength=self.num_classes).float()
        errors = torch.bincount(true, weights=wrong, minlength=self.num_classes)
        seen = totals > 0
        batch_error = errors[seen] / totals[seen]
        old = self.error[seen]
        self.error[seen] = torch.where(old.isnan(), batch_error, self.ema * old + (1 - self.ema) * batch_error)

    def set_neighbours(self, neighbours: torch.Tensor) -> None:
        self.neighbours = neighbours.long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"planner/error": self.error.clone(), "planner/neighbours": self.neighbours.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "planner/error" in state:
            self.error = state["planner/error"].clone()
            self.neighbours = state["planner/neighbours"].long().clone()

    def _filled_error(self) -> torch.Tensor:
        known = ~self.error.isnan()
        fill = self.error[known].mean() if known.any() else torch.tensor(0.5)
        return torch.where(known, self.error, fill)

    # ---- keys ----------------------------------------------------------------------------------

    def class_keys(self, tasks: int, g: torch.Generator) -> torch.Tensor:
        """``[tasks, C]`` keys; the sampler takes each task's ``ways`` smallest."""
        u = torch.rand(tasks, self.num_classes, generator=g)
        if self.strategy == "uniform":
            return u
        if self.strategy == "domain-balanced":
            per_domain = torch.bincount(self.class_domains).float()
            return self._weighted(u, 1.0 / per_domain[self.class_domains])
        if self.strategy == "curriculum":
            err = self._filled_error()
            z = (err - err.mean()) / (err.std() + 1e-6) if len(err) > 1 else err * 0
            beta = -2.0 + 4.0 * min(max(self.progress, 0.0), 1.0)
            return self._weighted(u, torch.exp(beta * z))
        return self._hard_keys(u, g)

    @staticmethod
    def _weighted(u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return -torch.log(u.clamp_min(1e-12)) / weights.clamp_min(1e-12)

    def _hard_keys(self, u: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        tasks = u.shape[0]
        weights = self._filled_error() + 0.05  # every class keeps a chance
        anchors = torch.multinomial(weights.expand(tasks, -1), 1, generator=g).squeeze(1)
        keys = u.clone()
        if self.neighbours.shape[1]:
            near = self.neighbours[anchors]  # [T, k]
            chosen = torch.rand(near.shape, generator=g) < self.neighbour_share
            boost = torch.where(chosen, keys.gather(1, near) - 1.0, keys.gather(1, near))
            keys.scatter_(1, near, boost)  # picked neighbours sort before every random class
        keys[torch.arange(tasks), anchors] = -2.0  # the anchor first
        return keys
