"""Classifier heads fitted on frozen features of one task (no meta-training).

Each head takes support features ``z [S, D]`` with labels ``y [S]`` in ``range(ways)`` and
returns a :class:`FrozenHead`, whose ``scores(q) -> [Q, ways]`` are logits (higher = more
likely). They are the transfer baselines for text (a frozen sentence encoder) and the heads
adapters are made of in ``metalab adapt`` / ``metalab serve``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalab.errors import ConfigError


@dataclass
class FrozenHead:
    """A linear scorer ``scores(q) = scale · (norm(q) @ weight.T) + bias``.

    Attributes:
        weight: ``[ways, D]``; bias: ``[ways]``.
        normalize: L2-normalise queries first (cosine heads).
        center: subtracted from queries first ``[D]`` (or ``None``).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    normalize: bool = True
    center: torch.Tensor | None = None
    scale: float = 1.0

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """``[Q, D]`` features → ``[Q, ways]`` logits."""
        q = _prepare(q, self.center, self.normalize)
        return self.scale * q @ self.weight.T + self.bias

    def state(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight, "bias": self.bias, "scale": torch.tensor(float(self.scale)),
               "normalize": torch.tensor(int(self.normalize))}
        if self.center is not None:
            out["center"] = self.center
        return out

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "FrozenHead":
        return cls(state["weight"], state["bias"], bool(int(state["normalize"])), state.get("center"),
                   float(state["scale"]))


def _prepare(z: torch.Tensor, center: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    z = z.float()
    if center is not None:
        z = z - center
    return F.normalize(z, dim=-1) if normalize else z


def _class_means(z: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
    one_hot = F.one_hot(y, ways).to(z.dtype)
    counts = one_hot.sum(0)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ConfigError(f"Classes {missing} have no support examples; every class needs at least one.")
    return (one_hot.T @ z) / counts[:, None]


def prototype_head(z: torch.Tensor, y: torch.Tensor, ways: int, scale: float = 10.0, center: bool = False) -> FrozenHead:
    """Cosine prototypes: class means of the normalised support, compared by cosine."""
    c = z.float().mean(0) if center else None
    protos = F.normalize(_class_means(_prepare(z, c, True), y, ways), dim=-1)
    return FrozenHead(protos, torch.zeros(ways), True, c, scale)


def ridge_head(z: torch.Tensor, y: torch.Tensor, ways: int, lam: float = 1.0, scale: float = 10.0) -> FrozenHead:
    """Closed-form ridge regression onto one-hot targets, solved in the ``S × S`` dual (R2D2)."""
    x = _prepare(z, None, True)
    targets = F.one_hot(y, ways).float()
    gram = x @ x.T + lam * torch.eye(x.shape[0])
    weight = (x.T @ torch.linalg.solve(gram, targets)).T  # [ways, D]
    return FrozenHead(weight, torch.zeros(ways), True, None, scale)


def logistic_head(z: torch.Tensor, y: torch.Tensor, ways: int, c: float = 30.0, steps: int = 25, center: bool = False) -> FrozenHead:
    """Multinomial logistic regression (L2 penalty ``1/(2c)·|W|²`` per example-sum, as scikit-learn's
    ``C``) on normalised features, fitted with L-BFGS from a prototype start."""
    cen = z.float().mean(0) if center else None
    x = _prepare(z, cen, True)
    weight = (F.normalize(_class_means(x, y, ways), dim=-1) * 10.0).clone().requires_grad_()
    bias = torch.zeros(ways, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y, reduction="sum") + 0.5 / c * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return FrozenHead(weight.detach(), bias.detach(), True, cen, 1.0)


HEADS = {"prototypes": prototype_head, "logistic": logistic_head, "ridge": ridge_head}


def fit_head(kind: str, z: torch.Tensor, y: torch.Tensor, ways: int, **options) -> FrozenHead:
    """A head by name: ``prototypes`` (cosine), ``logistic`` or ``ridge``."""
    if kind not in HEADS:
        raise ConfigError(f"Unknown head '{kind}'; choose one of: {', '.join(HEADS)}.")
    return HEADS[kind](z, y, ways, **options)
