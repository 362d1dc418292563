"""Task planners, the knowledge graph and the HTML report (parsed, figures present, rendered in a
headless browser)."""

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

from helpers import cluster_config, train_on
from metalab.data.folders import from_arrays
from metalab.data.planner import TaskPlanner
from metalab.data.sampler import EpisodeSampler
from metalab.engine import MetaTrainer, RunConfig
from metalab.errors import ConfigError
from metalab.report.graph import build_graph, export_graph, nearest_classes, score_neighbours


def domain_source(per_domain=(30, 3), per_class=6, dim=8, seed=0):
    """Classes grouped in domains: a class = its domain's centre + a small offset."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, doms = [], [], []
    c = 0
    for d, n in enumerate(per_domain):
        centre = torch.randn(dim, generator=g) * 5
        for _ in range(n):
            mean = centre + torch.randn(dim, generator=g)
            xs.append(mean + 0.1 * torch.randn(per_class, dim, generator=g))
            ys += [c] * per_class
            doms.append(d)
            c += 1
    return from_arrays(torch.cat(xs), ys, [f"c{i}" for i in range(c)], doms, [f"d{i}" for i in range(len(per_domain))])


def picked_share(planner, source, domain=1, batches=40):
    sampler = EpisodeSampler(source, 5, 1, 1, tasks=20, seed=0, planner=planner)
    classes = torch.cat([sampler.sample(i).classes.flatten() for i in range(batches)])
    return float((source.class_domains[classes] == domain).float().mean())


def test_domain_balanced_planner_equalises_domains():
    source = domain_source()
    uniform = picked_share(TaskPlanner("uniform", source.num_classes, source.class_domains), source)
    balanced = picked_share(TaskPlanner("domain-balanced", source.num_classes, source.class_domains), source)
    assert uniform < 0.15 and balanced > 0.3  # 3 of 33 classes: ~9 % uniformly; capped by 3-of-5 per task when balanced


def test_hard_mining_builds_tasks_around_confused_classes():
    source = domain_source((10, 10, 10))
    planner = TaskPlanner("hard", source.num_classes, source.class_domains)
    planner.observe(torch.tensor([[7, 1, 2]]), torch.tensor([[0, 0, 1, 2]]), torch.tensor([[1, 2, 1, 2]]))  # class 7 wrong twice
    every = torch.arange(3).repeat(10, 1)
    planner.observe(torch.arange(30).view(10, 3), every, every)  # every class seen once, all right
    neighbours = torch.stack([torch.roll(torch.arange(30), -i)[1:4] for i in range(30)])  # class c's neighbours: c+1..c+3
    planner.set_neighbours(neighbours)
    sampler = EpisodeSampler(source, 4, 1, 1, tasks=200, seed=0, planner=planner)
    batch = sampler.sample(0)
    anchored = batch.classes[:, 0] == 7  # the anchor sorts first
    # anchor weights: error + 0.05 → class 7: 0.95 of 2.4 in all (≈ 40 % of anchors); uniformly 4/30 ≈ 13 %
    assert anchored.float().mean() > 0.3
    neighbours_in = torch.isin(batch.classes[anchored], torch.tensor([8, 9, 10])).sum(1).float().mean()
    assert neighbours_in > 1.0  # ~half of 3 neighbours join the anchor, vs 3·3/29 ≈ 0.3 at random
    again = EpisodeSampler(source, 4, 1, 1, tasks=200, seed=0, planner=planner).sample(0)
    assert torch.equal(batch.classes, again.classes)  # deterministic given the planner's state


def test_curriculum_goes_from_easy_to_hard():
    source = domain_source((10, 10))
    planner = TaskPlanner("curriculum", source.num_classes, source.class_domains)
    errors = torch.tensor([0.0] * 10 + [0.8] * 10)  # domain 1's classes are hard
    planner.error = errors.clone()
    planner.progress = 0.0
    early = picked_share(planner, source)
    planner.progress = 1.0
    late = picked_share(planner, source)
    assert early < 0.35 < 0.65 < late


def test_unknown_planner_is_a_config_error():
    with pytest.raises(ConfigError, match="train.planner='smart' is unknown"):
        RunConfig.from_dict({"train": {"planner": "smart"}})


def test_hard_planner_training_resumes_exactly(clusters, tmp_path):
    cfg = cluster_config("protonet", steps=40, planner="hard", planner_every=5, planner_refresh=20, checkpoint_every=20,
                         schedule="constant")
    full = train_on(clusters, cfg, tmp_path / "full")
    full.train()
    assert full.planner.neighbours.shape[1] == 10 and not full.planner.error.isnan().all()
    short = cluster_config("protonet", steps=20, planner="hard", planner_every=5, planner_refresh=20, checkpoint_every=20,
                           schedule="constant")
    part = train_on(clusters, short, tmp_path / "part")
    part.train()
    from helpers import cluster_splits

    resumed = MetaTrainer(cfg, tmp_path / "part", splits=cluster_splits(clusters), resume=True, show_progress=False,
                          log=lambda m: None)
    assert torch.equal(resumed.planner.error, part.planner.error)
    resumed.train()
    for k, v in full.algorithm.state_dict().items():
        assert torch.equal(v, resumed.algorithm.state_dict()[k]), k


def test_knowledge_graph_groups_domains_and_exports(tmp_path):
    import networkx as nx

    source = domain_source((8, 8, 8))
    protos = torch.nn.functional.normalize(torch.stack([source.x[source.y == c].mean(0) for c in range(24)]), dim=1)
    score = score_neighbours(nearest_classes(protos, 3)[0], source.class_domains)
    assert score.same_domain_rate > 0.9 and abs(score.chance_rate - 7 / 23) < 1e-6
    graph = build_graph(source, protos, 3)
    json_path, graphml_path = export_graph(graph, tmp_path)
    again = nx.read_graphml(graphml_path)
    kinds = nx.get_node_attributes(again, "kind")
    assert sum(k == "class" for k in kinds.values()) == 24 and sum(k == "domain" for k in kinds.values()) == 3
    assert {d["kind"] for _, _, d in again.edges(data=True)} == {"member", "similar"}
    assert len(json.loads(json_path.read_text())["nodes"]) == 27


class Parsed(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.tags = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags += 1
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])


@pytest.fixture(scope="module")
def omniglot_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    runs = []
    for algo in ("protonet", "matchingnet"):
        cfg = RunConfig.from_dict({"train": {"algo": algo, "steps": 4, "val_every": 2, "log_every": 1, "device": "cpu"}})
        MetaTrainer(cfg, root / algo, show_progress=False, log=lambda m: None).train()
        runs.append(root / algo)
    return runs


def test_report_html_parses_and_every_figure_exists(omniglot_runs, tmp_path):
    from metalab.report.html import build_comparison, build_report

    path = build_report(omniglot_runs[0], tmp_path / "report", episodes=20)
    parsed = Parsed()
    parsed.feed(path.read_text(encoding="utf-8"))
    assert parsed.tags > 50 and len(parsed.images) >= 5
    for src in parsed.images + parsed.links:
        assert (path.parent / src).exists(), src
    text = path.read_text(encoding="utf-8")
    for section in ("Learning curves", "Accuracy vs shots", "Per domain", "Weakest classes", "Knowledge graph", "Configuration"):
        assert f"<h2>{section}</h2>" in text
    assert "http://" not in text and "https://" not in text  # opens offline
    assert "20-shot left out" in text  # Omniglot classes have 20 drawings: no room for 20 shots + queries
    compared = build_comparison(omniglot_runs, tmp_path / "compare")
    assert "protonet" in compared.read_text() and "matchingnet" in compared.read_text()
    assert (compared.parent / "figures" / "learning_curves.png").exists()
    assert "Not like for like" not in compared.read_text()  # same data, split and episodes
    other = tmp_path / "other-seed"
    shutil.copytree(omniglot_runs[1], other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["data"]["split_seed"], config["eval"]["seed"] = 7, 8
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    text = build_comparison([omniglot_runs[0], other], tmp_path / "compare2").read_text()
    assert "Not like for like" in text and "data.split_seed: protonet 0, other-seed 7" in text and "eval.seed: protonet 2024, other-seed 8" in text


def test_compare_keeps_one_colour_per_run_and_ignores_fields_a_run_does_not_read(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from metalab.report.html import config_differences, plot_learning_curves

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to look at it
    runs = {"rl": [{"step": 1, "loss": 2.0}], "proto": [{"step": 1, "loss": 1.0, "acc": 0.5}, {"step": 2, "loss": 0.5, "acc": 0.7}]}
    plot_learning_curves(runs, tmp_path / "curves.png")
    loss, acc = kept[0].axes
    colour = {line.get_label(): line.get_color() for line in loss.get_lines()}
    assert [line.get_color() for line in acc.get_lines()] == [colour["proto"]]  # not the first colour of the cycle
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["rl", "proto"]

    rl = RunConfig.from_dict({"rl": {"task": "bandit"}, "train": {"algo": "maml-rl"}})  # data.* unused: 'omniglot' by default
    assert config_differences({"rl": rl, "proto": RunConfig.from_dict({})}) == ["rl.task: rl 'bandit', proto None"]
    sine = RunConfig.from_dict({"data": {"source": "sinusoid"}, "train": {"algo": "maml"}})
    assert "data.source: rl unused, sine 'sinusoid', proto 'omniglot'" in config_differences(
        {"rl": rl, "sine": sine, "proto": RunConfig.from_dict({})})


def test_report_renders_in_a_headless_browser(omniglot_runs, tmp_path):
    from test_serve_browser import CHROMIUM, launch, non_blank

    if CHROMIUM is None and not os.environ.get("METALAB_REQUIRE_BROWSER"):
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    out = subprocess.run([sys.executable, "-m", "metalab", "report", str(omniglot_runs[1]), "--out", str(tmp_path / "r"),
                          "--episodes", "20"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto((tmp_path / "r" / "index.html").as_uri())
        assert page.locator("img.fig").count() >= 4
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        shot = page.screenshot(full_page=True)
        browser.close()
    (tmp_path / "report.png").write_bytes(shot)
    std, colours = non_blank(shot)
    assert std > 20 and colours > 50, (std, colours)


def test_per_domain_accuracy_carries_a_ci_and_curves_are_in_percent(tmp_path, clusters):
    """The report's per-domain bars have 95 % intervals; its accuracy curves are in %, from 0 to 100."""
    from metalab.algorithms import build_algorithm
    from metalab.models import build_backbone
    from metalab.report.html import per_class_analysis, plot_learning_curves

    source = clusters  # (an untrained learner on noisy clusters: neither 0 % nor 100 % in a domain)
    algorithm = build_algorithm("protonet", build_backbone("mlp", (32,), hidden=8, norm="batch"))
    analysis = per_class_analysis(algorithm, source, episodes=40)
    assert len(analysis["domain_ci95"]) == source.num_domains
    assert all(0 <= ci < 0.5 for ci in analysis["domain_ci95"]) and max(analysis["domain_ci95"]) > 0
    import matplotlib.pyplot as plt

    shown = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        shown.update({ax.get_title(): (ax.get_ylim(), [line.get_ydata() for line in ax.get_lines()]) for ax in fig.axes})
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = capture
    try:
        plot_learning_curves({"run": [{"step": 10, "acc": 0.9488, "val_acc": 0.9490, "loss": 0.2}]}, tmp_path / "c.png")
    finally:
        plt.Figure.savefig = real_savefig
    limits, lines = shown["validation accuracy (%)"]
    assert limits == (0.0, 100.0) and abs(float(lines[0][0]) - 94.90) < 1e-6
