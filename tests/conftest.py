import os
import tempfile

import pytest
import torch

# Tests never touch the user's cache.
os.environ.setdefault("METALAB_CACHE", tempfile.mkdtemp(prefix="metalab-test-cache-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from metalab.data.folders import from_arrays  # noqa: E402


def make_clusters(classes: int = 40, per_class: int = 20, dim: int = 32, informative: int = 4, noise: float = 2.5,
                  seed: int = 0, domains: int = 4):
    """A source where only ``informative`` dims carry the class and the rest are loud noise:
    an untrained learner is near chance, a learner that finds the informative dims is not."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, informative, generator=g) * 1.5
    y = torch.arange(classes).repeat_interleave(per_class)
    signal = centers[y] + 0.3 * torch.randn(len(y), informative, generator=g)
    x = torch.cat([signal, noise * torch.randn(len(y), dim - informative, generator=g)], 1)
    names = [f"class{c:02d}" for c in range(classes)]
    return from_arrays(x.numpy(), y.numpy(), names, torch.arange(classes) % domains,
                       [f"domain{d}" for d in range(domains)], name="clusters")


@pytest.fixture
def clusters():
    return make_clusters()


@pytest.fixture(scope="session")
def omniglot():
    from metalab.data.omniglot import load_omniglot

    return load_omniglot(28)
