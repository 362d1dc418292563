"""The one interface every algorithm implements.

* ``meta_loss(params, batch) -> (loss, metrics)``: the training objective on a meta-batch.
* ``adapt(params, support_x, support_y, ways) -> Predictor``: learn a new task from its support set.
* ``task_logits(params, batch) -> [tasks, ways*queries, ways]``: adapt to every task of a batch and
  score its queries (evaluation). Algorithms whose adaptation only needs fixed per-example
  features set ``frozen_features = True`` and implement ``encode`` + ``classify_features``, so
  evaluation encodes a split once and draws episodes over features.

``params`` is a ``dict[str, Tensor]`` (by default the module's own parameters) so inner loops,
data-parallel training and serving can all work functionally.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalab.algorithms.task_threads import module_for_thread, per_task_backward, resolve_task_threads, supports_task_threads
from metalab.data.episodes import Episodes
from metalab.errors import DataError
from metalab.models.backbones import normalised_biases


def sub_params(params: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries of ``params`` under ``prefix`` with the prefix stripped."""
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def check_task(support_x: torch.Tensor, support_y: torch.Tensor, ways: int) -> None:
    """A clear error for a malformed task given to ``adapt``: one label per support example, and
    class labels ``0..ways-1`` (float targets are regression and pass)."""
    if len(support_x) != len(support_y):
        raise DataError(f"adapt() got {len(support_x)} support examples but {len(support_y)} labels; give one label per example.")
    if len(support_y) and not support_y.dtype.is_floating_point:
        low, high = int(support_y.min()), int(support_y.max())
        if low < 0 or high >= ways:
            raise DataError(f"adapt() got labels {low}..{high} for a {ways}-way task; number the classes 0..{ways - 1}.")


class Predictor:
    """An adapted task: scores new inputs against the task's ``ways`` labels."""

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        self._logits_fn = logits_fn
        self.state = state  # the tensors that define the adaptation (prototypes, head, weights)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` inputs → ``[B, ways]`` scores."""
        return self._logits_fn(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(-1)


class Algorithm(nn.Module):
    """Base class: holds the meta-learned modules; subclasses define the method."""

    name = "algorithm"
    frozen_features = False
    #: per-task training loops on CPU: worker threads, one task per core ('auto'), or a number
    #: (1: one task after another); see :mod:`metalab.algorithms.task_threads`
    task_threads: int | str = "auto"
    #: how far meta-training has come, 0 to 1 (set by the trainer before each step, as the learning
    #: rate's schedule reads it); options that anneal over training read it (MAML++'s). Outside
    #: training it stays 1: the end-of-training behaviour.
    training_progress: float = 1.0

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                ways: int | None = None) -> torch.Tensor:
        """One task, easyfsl-style: adapt to the support ``[N*K, ...]`` with labels ``[N*K]`` in
        ``0..ways-1`` (default: the largest label + 1) and score the queries ``[M, ...]`` → ``[M, ways]``
        logits. Training goes through :meth:`meta_loss` / :meth:`meta_backward` instead."""
        ways = int(support_y.max()) + 1 if ways is None else ways
        return self.adapt(self.params(), support_x, support_y, ways).logits(query_x)

    def encode(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[B, D]`` of inputs ``[B, ...]`` under ``params``."""
        buffers = dict(self.backbone.named_buffers())
        return functional_call(self.backbone, {**sub_params(params, "backbone."), **buffers}, (x,))

    def meta_loss(self, params: dict[str, torch.Tensor], batch: Episodes) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def trainable(self) -> list[torch.Tensor]:
        """The parameters that receive gradients."""
        return [p for p in self.parameters() if p.requires_grad]

    def task_workers(self, batch: Episodes, buffers_passed: bool) -> int:
        """Threads for this meta-batch's per-task loop (1 unless the backbone can run in several
        threads at once: :func:`~metalab.algorithms.task_threads.supports_task_threads`). ``auto``
        keeps tasks in turn for backbones without convolutions: an MLP task is too small for the
        hand-off (150 steps of 4 cluster tasks measured 1.0-1.5x slower threaded)."""
        if self.task_threads == "auto" and not any(isinstance(m, nn.Conv2d) for m in self.backbone.modules()):
            return 1
        workers = resolve_task_threads(self.task_threads, batch.support_x.device, batch.tasks)
        return workers if workers > 1 and supports_task_threads(self.backbone, buffers_passed) else 1

    def meta_backward(self, params: dict[str, torch.Tensor], batch: Episodes) -> tuple[torch.Tensor, dict[str, float]]:
        """Back-propagate the meta-loss into ``.grad`` and return it (detached) with its metrics.
        Algorithms may override this to bound memory (e.g. per-task backward); the gradients must
        equal those of ``meta_loss(params, batch)[0].backward()``."""
        loss, metrics = self.meta_loss(params, batch)
        if torch.isfinite(loss):
            loss.backward()
        self.drop_invariant_grads()
        return loss.detach(), metrics

    #: parameters the loss provably does not depend on, besides biases that feed a norm layer
    #: (see :meth:`drop_invariant_grads`)
    invariant_params: tuple[str, ...] = ()

    def drop_invariant_grads(self) -> None:
        """Clear the gradients of ``invariant_params``. Their true gradient is zero; what autograd
        returns is float round-off, which Adam would scale up into full-size random steps (and
        which differs between one process and several)."""
        invariant = self.__dict__.get("_invariant_names")
        if invariant is None:
            invariant = set(self.invariant_params) | {f"backbone.{n}" for n in normalised_biases(self.backbone)}
            self.__dict__["_invariant_names"] = invariant
        for name, p in self.named_parameters():
            if name in invariant:
                p.grad = None

    def adapt(self, params: dict[str, torch.Tensor], support_x: torch.Tensor, support_y: torch.Tensor, ways: int) -> Predictor:
        """A new task's support ``[N*K, ...]`` with labels ``[N*K]`` in ``0..ways-1`` → its :class:`Predictor`."""
        raise NotImplementedError

    def task_logits(self, params: dict[str, torch.Tensor], batch: Episodes) -> torch.Tensor:
        """Adapt to each task and score its queries: ``[tasks, ways*queries, ways]``."""
        out = []
        for t in range(batch.tasks):
            predictor = self.adapt(params, batch.support_x[t], batch.support_y[t], batch.ways)
            out.append(predictor.logits(batch.query_x[t]))
        return torch.stack(out)

    def classify_features(self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor, ways: int,
                          params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """For ``frozen_features`` algorithms: ``[T, N*K, D]``, ``[T, N*K]``, ``[T, M, D]`` → ``[T, M, N]``."""
        raise NotImplementedError


class FeatureHeadAlgorithm(Algorithm):
    """Methods that embed every example with one shared backbone and solve each task with a
    head on those features (ProtoNet, Matching Nets, R2D2, ANIL); heads are batched over tasks.

    In training the backbone runs task by task, each task's support and query images together,
    so batch normalisation uses each task's own statistics (learn2learn's convention) and the
    running statistics take one step per meta-batch (:meth:`per_task_statistics`); training
    back-propagates task by task (:meth:`meta_backward`). Per task keeps the activations in cache:
    on 2 CPU cores one pass over a 32-task meta-batch measured 1.7x slower, with 5x the memory.
    Outside training (running statistics) it is one pass.

    Subclasses implement ``classify_features(support_z, support_y, query_z, ways, params)``.
    """

    frozen_features = True
    #: batch statistics are per task: under ``torchrun`` they need no synchronisation
    per_task_norm = True

    def encode_episodes(self, params, batch: Episodes) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query features ``[T, N*K, D]``, ``[T, N*Q, D]``."""
        t, s, q = batch.tasks, batch.support_x.shape[1], batch.query_x.shape[1]
        if not self.training:
            z = self.encode(params, torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)]))
            return z[: t * s].view(t, s, -1), z[t * s :].view(t, q, -1)
        with self.per_task_statistics() as encode_task:
            z = torch.stack([encode_task(params, torch.cat([batch.support_x[i], batch.query_x[i]])) for i in range(t)])
        return z[:, :s], z[:, s:]

    @contextmanager
    def per_task_statistics(self):
        """Yields ``encode_task(params, x [B, ...], slot=None) -> [B, D]``, one backbone call per task.

        Each call updates its own copy of the running statistics (``slot``: the task's index, so
        calls from several threads keep a fixed order); on exit the module keeps their mean, which
        is exactly one momentum step toward the mean of the tasks' statistics (the update is linear
        in them). Under ``torch.distributed`` the mean is over every rank's tasks."""
        buffers = dict(self.backbone.named_buffers())
        copies: dict[int, dict[str, torch.Tensor]] = {}

        def encode_task(params, x: torch.Tensor, slot: int | None = None) -> torch.Tensor:
            fresh = {k: v.clone() for k, v in buffers.items()}
            copies[len(copies) if slot is None else slot] = fresh
            return functional_call(module_for_thread(self.backbone), {**sub_params(params, "backbone."), **fresh}, (x,))

        yield encode_task
        if not copies:
            return
        ordered = [copies[k] for k in sorted(copies)]
        with torch.no_grad():
            for k, v in buffers.items():
                if not v.is_floating_point():  # num_batches_tracked: one step, like every copy
                    v.copy_(ordered[-1][k])
                    continue
                mean = torch.stack([c[k] for c in ordered]).to(torch.float64).mean(0)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(mean)
                    mean /= torch.distributed.get_world_size()
                v.copy_(mean.to(v.dtype))

    def meta_backward(self, params, batch: Episodes):
        """Training: per task, encode its images, score its queries and back-propagate its share
        of the loss at once, so memory holds one task's graph (as learn2learn's loop does); on CPU
        the tasks run side by side on :attr:`task_threads` threads. The loss and gradients equal
        those of ``meta_loss`` (tested)."""
        if not self.training:
            return super().meta_backward(params, batch)
        s = batch.support_x.shape[1]
        workers = self.task_workers(batch, buffers_passed=True)
        with self.per_task_statistics() as encode_task:
            def task_loss(i: int):
                z = encode_task(params, torch.cat([batch.support_x[i], batch.query_x[i]]), slot=i)[None]
                logits = self.classify_features(z[:, :s], batch.support_y[i : i + 1], z[:, s:], batch.ways, params)
                loss = F.cross_entropy(logits[0], batch.query_y[i])
                extra = self.auxiliary_loss(params, z[:, :s], z[:, s:], batch.task(i))
                return (loss if extra is None else loss + extra), accuracy(logits.detach(), batch.query_y[i : i + 1])

            results = per_task_backward(task_loss, batch.tasks, workers, self.trainable(), [self.backbone])
        self.drop_invariant_grads()
        loss = torch.stack([r[0] for r in results]).mean()
        return loss, {"loss": loss.item(), "acc": torch.cat([r[1] for r in results]).mean().item()}

    def meta_loss(self, params, batch: Episodes):
        support_z, query_z = self.encode_episodes(params, batch)
        logits = self.classify_features(support_z, batch.support_y, query_z, batch.ways, params)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        if self.training and (extra := self.auxiliary_loss(params, support_z, query_z, batch)) is not None:
            loss = loss + extra
        return loss, {"loss": loss.item(), "acc": accuracy(logits.detach(), batch.query_y).mean().item()}

    def auxiliary_loss(self, params, support_z: torch.Tensor, query_z: torch.Tensor,
                       batch: Episodes) -> torch.Tensor | None:
        """An extra training term on the tasks' features ``[T, N*K, D]``, ``[T, N*Q, D]`` (averaged
        over tasks like the episode loss), or None (the default: none)."""
        return None

    def adapt(self, params, support_x, support_y, ways):
        check_task(support_x, support_y, ways)
        with torch.no_grad():
            support_z = self.encode(params, support_x)[None]
        return Predictor(
            lambda x: self.classify_features(support_z, support_y[None], self.encode(params, x)[None], ways, params)[0],
            {"support_features": support_z[0], "support_labels": support_y},
        )


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy ``[T]`` from ``[T, M, N]`` logits and ``[T, M]`` labels."""
    return (logits.argmax(-1) == labels).float().mean(-1)
