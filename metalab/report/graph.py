"""A knowledge graph of classes and domains from a trained run.

Nodes are classes and domains; ``similar`` edges join each class to its ``k`` nearest classes by
cosine similarity of their prototypes (mean embedding under the run's backbone), ``member`` edges
join a class to its domain. Exported as node-link JSON and GraphML (networkx), drawn as a PNG,
and scored: how often a class's nearest neighbours share its domain (alphabet, intent domain)
against the rate two random classes would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from metalab.algorithms.base import Algorithm
from metalab.data.source import LabelledSource


@torch.no_grad()
def class_prototypes(algorithm: Algorithm, source: LabelledSource, per_class: int = 20, batch: int = 512,
                     seed: int = 0) -> torch.Tensor:
    """Unit-norm mean embedding of up to ``per_class`` examples of each class ``[C, D]``."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(source.num_classes):
        idx = (source.y == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    index = torch.cat(picks)
    params = algorithm.params()
    algorithm.eval()
    feats = []
    for start in range(0, len(index), batch):
        x = source.x[index[start:start + batch]]
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        feats.append(algorithm.encode(params, x).flatten(1).float())
    z = torch.cat(feats)
    labels = source.y[index]
    protos = torch.zeros(source.num_classes, z.shape[1]).index_add_(0, labels, z)
    protos /= torch.bincount(labels, minlength=source.num_classes).clamp_min(1).unsqueeze(1)
    return torch.nn.functional.normalize(protos, dim=1)


def nearest_classes(prototypes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [C, k], cosine similarities [C, k])`` of each class's ``k`` nearest other classes."""
    sim = prototypes @ prototypes.T
    sim.fill_diagonal_(-2.0)
    values, indices = sim.topk(min(k, len(prototypes) - 1), dim=1)
    return indices, values


@dataclass
class GraphScore:
    same_domain_rate: float  #: share of k-NN edges that join two classes of the same domain
    chance_rate: float  #: the same share for two classes drawn at random
    edges: int

    @property
    def lift(self) -> float:
        return self.same_domain_rate / self.chance_rate if self.chance_rate else float("nan")


def score_neighbours(indices: torch.Tensor, class_domains: torch.Tensor) -> GraphScore:
    same = (class_domains[indices] == class_domains.unsqueeze(1)).float()
    counts = torch.bincount(class_domains).float()
    c = float(len(class_domains))
    chance = float((counts * (counts - 1)).sum() / (c * (c - 1))) if c > 1 else 0.0
    return GraphScore(float(same.mean()), chance, int(indices.numel()))


def build_graph(source: LabelledSource, prototypes: torch.Tensor, k: int = 5):
    """networkx graph: class and domain nodes, ``similar`` (k-NN, weight = cosine) and ``member`` edges."""
    import networkx as nx

    graph = nx.Graph(name=source.name)
    for d, name in enumerate(source.domain_names):
        graph.add_node(f"domain:{name}", kind="domain", label=name)
    for c, name in enumerate(source.class_names):
        domain = source.domain_names[int(source.class_domains[c])]
        graph.add_node(f"class:{name}", kind="class", label=name, domain=domain)
        graph.add_edge(f"class:{name}", f"domain:{domain}", kind="member", weight=1.0)
    indices, values = nearest_classes(prototypes, k)
    for c, (row, sims) in enumerate(zip(indices.tolist(), values.tolist())):
        for j, s in zip(row, sims):
            a, b = f"class:{source.class_names[c]}", f"class:{source.class_names[j]}"
            if not graph.has_edge(a, b):
                graph.add_edge(a, b, kind="similar", weight=round(float(s), 5))
    return graph


def export_graph(graph, folder: Path) -> tuple[Path, Path]:
    """``graph.json`` (node-link) and ``graph.graphml`` in ``folder``."""
    import networkx as nx

    folder.mkdir(parents=True, exist_ok=True)
    json_path, graphml_path = folder / "graph.json", folder / "graph.graphml"
    json_path.write_text(json.dumps(nx.node_link_data(graph, edges="edges"), indent=1))
    nx.write_graphml(graph, graphml_path)
    return json_path, graphml_path


def draw_graph(graph, path: Path, max_classes: int = 300, seed: int = 0) -> Path:
    """The class graph (k-NN edges) coloured by domain, force-directed layout; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    classes = [n for n, d in graph.nodes(data=True) if d["kind"] == "class"][:max_classes]
    sub = graph.subgraph(classes)
    domains = sorted({graph.nodes[n]["domain"] for n in classes})
    # up to 10 domains: tab10's distinct hues (tab20 pairs each hue with its pale twin: neighbours look alike)
    cmap = plt.get_cmap("tab10" if len(domains) <= 10 else "tab20")
    colours = [cmap(domains.index(graph.nodes[n]["domain"]) % 20) for n in classes]
    # spread the nodes (k: a larger optimal distance than networkx's 1/sqrt(n)) so labels have room
    pos = nx.spring_layout(sub, seed=seed, weight="weight", k=2.0 / max(len(classes), 1) ** 0.5, iterations=100)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    nx.draw_networkx_edges(sub, pos, ax=ax, alpha=0.25, width=0.6)
    nx.draw_networkx_nodes(sub, pos, ax=ax, node_color=colours, node_size=28)
    if len(classes) <= 60:  # each label just above its node, on a pale box so crossing edges do not hide it
        above = {n: (x, y + 0.035) for n, (x, y) in pos.items()}
        nx.draw_networkx_labels(sub, above, {n: graph.nodes[n]["label"] for n in classes}, font_size=6, ax=ax,
                                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(i % 20), label=d) for i, d in enumerate(domains[:20])]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1, 1), title="domain")
    ax.set_title(f"{graph.graph.get('name', '')}: classes joined to their nearest neighbours")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
