import pytest
import torch

from metalab.data import EpisodeSampler, LabelledSource
from metalab.errors import ConfigError, DataError


def indexed_source(classes=30, per_class=20, domains=3, uneven=False):
    """x holds each example's own index, so episodes reveal which examples they used
    (``uneven``: class ``c`` has ``per_class + c % 7`` examples, so class rows end in padding)."""
    counts = per_class + torch.arange(classes) % 7 if uneven else torch.full((classes,), per_class)
    y = torch.arange(classes).repeat_interleave(counts)
    x = torch.arange(len(y), dtype=torch.float32)[:, None]
    return LabelledSource(x, y, [f"c{i}" for i in range(classes)], torch.arange(classes) % domains,
                          [f"d{i}" for i in range(domains)], name="indexed")


def test_shapes_and_labels():
    b = EpisodeSampler(indexed_source(), ways=5, shots=2, queries=3, tasks=7).sample(0)
    assert b.support_x.shape == (7, 10, 1) and b.query_x.shape == (7, 15, 1)
    assert torch.equal(b.support_y[0], torch.arange(5).repeat_interleave(2))
    assert torch.equal(b.query_y[3], torch.arange(5).repeat_interleave(3))
    assert b.classes.shape == (7, 5)


@pytest.mark.parametrize("uneven", [False, True])
def test_support_and_query_never_share_an_example_and_match_their_class(uneven):
    src = indexed_source(uneven=uneven)
    sampler = EpisodeSampler(src, ways=5, shots=5, queries=15, tasks=50)
    for i in range(5):
        b = sampler.sample(i)
        for t in range(b.tasks):
            s, q = b.support_x[t, :, 0].long(), b.query_x[t, :, 0].long()
            assert len(set(s.tolist()) | set(q.tolist())) == len(s) + len(q)  # all distinct
            assert torch.equal(src.y[s], b.classes[t][b.support_y[t]])
            assert torch.equal(src.y[q], b.classes[t][b.query_y[t]])
        assert all(len(set(row.tolist())) == 5 for row in b.classes)  # distinct classes per task


def test_seeding_is_reproducible_and_indices_differ():
    a = EpisodeSampler(indexed_source(), 5, 1, 5, 4, seed=3)
    b = EpisodeSampler(indexed_source(), 5, 1, 5, 4, seed=3)
    assert torch.equal(a.sample(10).support_x, b.sample(10).support_x)
    assert not torch.equal(a.sample(10).support_x, a.sample(11).support_x)
    c = EpisodeSampler(indexed_source(), 5, 1, 5, 4, seed=4)
    assert not torch.equal(a.sample(10).support_x, c.sample(10).support_x)


def test_same_domain_tasks_stay_in_one_domain():
    src = indexed_source(domains=3)
    b = EpisodeSampler(src, ways=5, shots=1, queries=1, tasks=100, same_domain=True).sample(0)
    doms = src.class_domains[b.classes]
    assert (doms == doms[:, :1]).all()
    assert len(doms[:, 0].unique()) > 1  # and all domains get used


def test_variable_way_and_shot_stay_in_range():
    sampler = EpisodeSampler(indexed_source(), ways=(3, 8), shots=(1, 4), queries=2, tasks=2)
    seen = set()
    for i in range(40):
        b = sampler.sample(i)
        assert 3 <= b.ways <= 8 and 1 <= b.shots <= 4
        assert b.support_x.shape[1] == b.ways * b.shots
        seen.add((b.ways, b.shots))
    assert len(seen) > 5


def test_class_with_too_few_examples_is_named():
    src = indexed_source()
    keep = ~((src.y == 7) & (torch.arange(len(src.y)) % 20 >= 4))  # class c7 keeps 4 examples
    small = LabelledSource(src.x[keep], src.y[keep], src.class_names, src.class_domains, src.domain_names, "small")
    with pytest.raises(DataError, match=r"Class 'c7'.*has 4 examples.*need 6"):
        EpisodeSampler(small, ways=5, shots=1, queries=5)


def test_too_many_ways_and_bad_arguments():
    with pytest.raises(DataError, match="40-way tasks need 40 classes"):
        EpisodeSampler(indexed_source(classes=30), ways=40)
    with pytest.raises(ConfigError, match="ways"):
        EpisodeSampler(indexed_source(), ways=0)
    with pytest.raises(ConfigError, match="queries"):
        EpisodeSampler(indexed_source(), queries=0)


def test_uint8_images_arrive_as_floats_in_unit_range(omniglot):
    sampler = EpisodeSampler(omniglot, ways=5, shots=1, queries=2, tasks=3, seed=0)
    b = sampler.sample(0)
    assert b.support_x.dtype == torch.float32 and 0 <= b.support_x.min() and b.support_x.max() <= 1
    raw = EpisodeSampler(omniglot, ways=5, shots=1, queries=2, tasks=3, seed=0, to_float=False).sample(0)
    assert raw.support_x.dtype == torch.uint8
    assert torch.equal(b.support_x, raw.support_x.float() / 255)
