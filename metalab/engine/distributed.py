"""Data-parallel meta-training with ``torch.distributed`` (started by ``torchrun``).

Semantics (documented in the README):

* Every rank draws the same *global* meta-batch for step ``i`` (the sampler is a pure function of
  ``(seed, i)``) and keeps its contiguous share of the tasks, so the ranks' tasks are disjoint and
  seeded, and the union is exactly what one process would train on.
* Each rank back-propagates the mean loss of its tasks; gradients are summed across ranks and
  divided by the world size, which equals the one-process gradient of the global mean.
* ProtoNet & co. normalise each task by its own batch statistics, so there is nothing to share;
  their running statistics take one step per meta-batch toward the mean over every rank's tasks
  (all-reduced). Methods that normalise one shared pre-training batch (Baseline, multi-task) use
  statistics synchronised across ranks (:class:`SyncBatchStatNorm`). Either way two processes
  compute what one does.
* Rank 0 alone writes the run folder (config, metrics, checkpoints, eval.json) and prints.
* Decisions that must agree (stop on time budget, learning-rate schedule, a non-finite loss)
  are taken from rank 0's clock or from all-reduced values.
* Resuming with another world size is allowed when the global meta-batch divides by it: the
  checkpoint holds the global state only, so the run continues with the same numbers (up to the
  order of float additions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from metalab.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); single process: no-op."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    if not launched_by_torchrun():
        return DistContext()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # a fresh key space per torchrun attempt: after an elastic restart the store still holds the
    # previous attempt's gloo addresses, and connecting to those fails ("connection refused")
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"metalab/attempt-{attempt}", store),
                            rank=rank, world_size=world_size)
    return DistContext(dist.get_rank(), dist.get_world_size())


def current() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


def average_gradients(module: nn.Module, ctx: DistContext) -> None:
    """Sum every parameter's gradient over ranks and divide by the world size (one flat buffer)."""
    if not ctx.active:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(module: nn.Module, ctx: DistContext) -> None:
    """Make every rank start from rank 0's weights and buffers."""
    if not ctx.active:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


def all_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """The mean over ranks of each number in ``values`` (same keys on every rank)."""
    if not ctx.active or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist())}


def from_main(value: float, ctx: DistContext) -> float:
    """Rank 0's ``value`` on every rank."""
    if not ctx.active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.active:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


class SyncBatchStatNorm(nn.Module):
    """Batch normalisation whose training statistics are those of the *global* batch: per-channel
    sums and squared sums are all-reduced (differentiably) across ranks. Same parameters and
    buffers as the ``nn.BatchNorm1d/2d`` it replaces, so checkpoints are interchangeable."""

    subtracts_batch_mean = True

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not current().active:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                self.momentum or 0.0, self.eps)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its replacement has no autograd on gloo yet
            from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), x.pow(2).sum(dims), count])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)  # differentiable: gradients flow through the global statistics
        c = self.num_features
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean.pow(2)
        if self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
                self.num_batches_tracked += 1
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape)


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d`` in ``module`` by :class:`SyncBatchStatNorm` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, SyncBatchStatNorm(child))
        else:
            sync_batch_norm(child)
    return module


def shutdown() -> None:
    """Leave the process group cleanly (all ranks together); without it gloo may abort at exit."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def check_divisible(meta_batch: int, ctx: DistContext) -> None:
    if ctx.active and meta_batch % ctx.world_size:
        raise ConfigError(f"train.meta_batch={meta_batch} does not divide over {ctx.world_size} processes; "
                          f"use a multiple of {ctx.world_size} so every rank gets the same number of tasks.")
