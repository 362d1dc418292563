"""REFERENCE, NOT METALAB: a re-implementation of learn2learn 0.2.0's MAML mechanism, for speed
comparisons in the same run.

learn2learn itself cannot be installed beside torch 2.13 on Python 3.11 (its pre-generated
Cython C includes ``longintrepr.h``, which Python 3.11 moved; and ``import learn2learn`` imports
torchvision, whose PyPI wheel for torch 2.13 is CUDA-linked and fails beside the CPU torch with
``operator torchvision::nms does not exist``; see README). This module reproduces what its
``MAML(model, lr).clone()`` / ``learner.adapt(loss)`` loop does per task, with plain torch:

* ``clone``: a shallow copy of every module in the tree whose parameters are replaced by
  ``param.clone()`` (so gradients flow back to the original parameters);
* ``adapt``: ``torch.autograd.grad`` of the loss w.r.t. the clone's parameters (with
  ``create_graph`` for second order), then every parameter of the clone swapped for ``p - lr * g``;
* the training loop of its examples: for each task, clone, adapt on the support set, compute the
  query loss and call ``backward()`` on it; scale the accumulated gradients by 1/tasks; step.

The model is metalab's conv4 (conv3×3 with padding - BN - ReLU - max-pool ×4, 64 filters, BatchNorm
without running statistics; 9.82 M multiply-adds per 28×28 image) with a ``Linear(64, ways)`` head,
so both arms run the same network. It is *not* learn2learn's own ``OmniglotCNN`` (stride-2
convolutions without pooling, 2.66 M multiply-adds, the MAML paper's Omniglot network): with each
library's default model the comparison differs (measured against the real learn2learn 0.2.0, its OmniglotCNN runs MAML about as fast as metalab on its conv4 at 32 tasks, faster at 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are differentiable clones of the originals."""
    copy = module.__new__(type(module))
    copy.__dict__ = module.__dict__.copy()
    copy._parameters = {k: (p.clone() if p is not None else None) for k, p in module._parameters.items()}
    copy._buffers = dict(module._buffers)
    copy._modules = {k: (clone_module(m) if m is not None else None) for k, m in module._modules.items()}
    return copy


def swap_parameters(module: nn.Module, new_values: dict[int, torch.Tensor]) -> None:
    """Replace each parameter tensor of the tree by ``new_values[id(param)]`` (in place)."""
    for key, p in module._parameters.items():
        if p is not None and id(p) in new_values:
            module._parameters[key] = new_values[id(p)]
    for child in module._modules.values():
        if child is not None:
            swap_parameters(child, new_values)


class ReferenceMAML(nn.Module):
    """``MAML(model, lr, first_order)`` with ``clone()``; the clone has ``adapt(loss)``."""

    def __init__(self, model: nn.Module, lr: float, first_order: bool = False) -> None:
        super().__init__()
        self.module, self.lr, self.first_order = model, lr, first_order

    def forward(self, x):
        return self.module(x)

    def clone(self) -> "ReferenceMAML":
        return ReferenceMAML(clone_module(self.module), self.lr, self.first_order)

    def adapt(self, loss: torch.Tensor) -> None:
        params = [p for p in _all_params(self.module)]
        second_order = not self.first_order
        grads = torch.autograd.grad(loss, params, retain_graph=second_order, create_graph=second_order)
        swap_parameters(self.module, {id(p): p - self.lr * g for p, g in zip(params, grads)})


def _all_params(module: nn.Module):
    for p in module._parameters.values():
        if p is not None:
            yield p
    for child in module._modules.values():
        if child is not None:
            yield from _all_params(child)


def omniglot_cnn(ways: int, hidden: int = 64) -> nn.Sequential:
    """metalab's conv4 layout (max-pool, not learn2learn's strided ``OmniglotCNN``) with a linear head."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(1 if i == 0 else hidden, hidden, 3, padding=1),
                   nn.BatchNorm2d(hidden, affine=True, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, ways))


def meta_step(maml: ReferenceMAML, optimizer: torch.optim.Optimizer, batch, inner_steps: int = 1) -> float:
    """One meta-training step of the reference loop over ``batch`` (an :class:`Episodes`)."""
    optimizer.zero_grad()
    total = 0.0
    for t in range(batch.tasks):
        learner = maml.clone()
        for _ in range(inner_steps):
            learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
        loss = F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t])
        loss.backward()
        total += loss.item()
    for p in maml.parameters():
        p.grad.mul_(1.0 / batch.tasks)
    optimizer.step()
    return total / batch.tasks


def protonet_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> float:
    """The reference ProtoNet loop (learn2learn's ``protonet_miniimagenet.py``): one task at a
    time, one forward over the task's support and query images together."""
    optimizer.zero_grad()
    total = 0.0
    s = batch.support_x.shape[1]
    for t in range(batch.tasks):
        embeddings = model(torch.cat([batch.support_x[t], batch.query_x[t]]))
        support, query = embeddings[:s], embeddings[s:]
        protos = support.view(batch.ways, batch.shots, -1).mean(1)
        logits = -torch.cdist(query, protos).pow(2)
        loss = F.cross_entropy(logits, batch.query_y[t])
        (loss / batch.tasks).backward()
        total += loss.item()
    optimizer.step()
    return total / batch.tasks


def anil_step(features: nn.Module, head: ReferenceMAML, optimizer: torch.optim.Optimizer, batch, inner_steps: int = 1) -> float:
    """The reference ANIL loop (learn2learn's ``anil_fc100.py``): per task, one forward of the
    features over support and query images together, then a cloned head adapted on the support."""
    optimizer.zero_grad()
    total = 0.0
    s = batch.support_x.shape[1]
    for t in range(batch.tasks):
        learner = head.clone()
        z = features(torch.cat([batch.support_x[t], batch.query_x[t]]))
        sz, qz = z[:s], z[s:]
        for _ in range(inner_steps):
            learner.adapt(F.cross_entropy(learner(sz), batch.support_y[t]))
        loss = F.cross_entropy(learner(qz), batch.query_y[t])
        (loss / batch.tasks).backward()
        total += loss.item()
    optimizer.step()
    return total / batch.tasks
