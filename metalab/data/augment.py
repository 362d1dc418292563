"""Class-creating augmentations for meta-train sources."""

from __future__ import annotations

import torch

from metalab.data.source import LabelledSource


def with_rotations(source: LabelledSource) -> LabelledSource:
    """Add each class rotated by 90°, 180° and 270° as three new classes (the standard Omniglot
    protocol, Santoro et al. 2016). Apply to meta-train only. ``x`` must be ``[M, C, H, W]``
    with ``H == W``."""
    xs = [torch.rot90(source.x, k, dims=(2, 3)) for k in range(4)]
    c = source.num_classes
    return LabelledSource(
        x=torch.cat(xs),
        y=torch.cat([source.y + k * c for k in range(4)]),
        class_names=[f"{n}@rot{90 * k}" if k else n for k in range(4) for n in source.class_names],
        class_domains=source.class_domains.repeat(4),
        domain_names=list(source.domain_names),
        name=f"{source.name}+rot",
        meta=dict(source.meta),
    )


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0, scale: float = 0.1,
                  translate: float = 0.1) -> torch.Tensor:
    """Small random rotation / scale / shift of each image ``[B, C, H, W]`` (float), one
    ``grid_sample`` for the whole batch. Draws from ``generator`` so a step's jitter is reproducible."""
    import math

    import torch.nn.functional as F

    b = x.shape[0]
    u = torch.rand(b, 4, generator=generator).to(x.device)
    angle = (u[:, 0] - 0.5) * 2 * math.radians(degrees)
    s = 1 + (u[:, 1] - 0.5) * 2 * scale
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = torch.cos(angle) / s
    theta[:, 0, 1] = -torch.sin(angle) / s
    theta[:, 1, 0] = torch.sin(angle) / s
    theta[:, 1, 1] = torch.cos(angle) / s
    theta[:, :, 2] = (u[:, 2:] - 0.5) * 2 * translate
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)
