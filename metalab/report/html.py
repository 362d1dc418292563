"""``metalab report RUN`` and ``metalab compare RUN…``: self-contained HTML (no CDN, no script)
with PNG figures beside it.

A classification run's report: learning curves; accuracy vs shots (1, 5, 10, 20 where the test
classes have enough examples) with 95 % CI bands; accuracy per domain; the weakest classes with
what they are confused with (thumbnails for images, example texts for text); the knowledge graph
of the test classes (drawn, plus JSON / GraphML and its same-domain score); the run's config.
Meta-RL and regression runs get their curves and their evaluation figure.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metalab.data.catalog import is_task_family
from metalab.engine.checkpoint import list_checkpoints
from metalab.engine.run import RunFolder

CSS = """body{font:15px/1.45 system-ui,sans-serif;color:#1d2330;max-width:1050px;margin:0 auto;padding:0 20px 40px;background:#fafbfc}
h1{font-size:22px;margin:22px 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #dde1e8;padding-bottom:4px}
table{border-collapse:collapse;font-size:13.5px;margin:6px 0}td,th{padding:4px 8px;border-bottom:1px solid #e3e6ec;text-align:left;vertical-align:middle}
th{background:#f0f2f6}img.fig{max-width:100%;border:1px solid #e3e6ec;background:#fff}img.thumb{width:34px;height:34px;image-rendering:pixelated;border:1px solid #ccd;margin:1px;background:#fff}
.muted{color:#5b6475;font-size:13px}pre{background:#f0f2f6;padding:10px;font-size:12.5px;overflow:auto}.card{display:inline-block;padding:8px 14px;margin:4px 8px 4px 0;background:#fff;border:1px solid #e3e6ec;border-radius:6px}
.card b{font-size:18px;display:block}"""


@dataclass
class Section:
    title: str
    body: str


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section] = field(default_factory=list)

    def add(self, title: str, body: str) -> None:
        self.sections.append(Section(title, body))

    def html(self) -> str:
        parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(self.title)}</title>",
                 f"<style>{CSS}</style></head><body><h1>{esc(self.title)}</h1><p class='muted'>{esc(self.subtitle)}</p>"]
        parts += [f"<h2>{esc(s.title)}</h2>{s.body}" for s in self.sections]
        parts.append("</body></html>")
        return "\n".join(parts)


def esc(text) -> str:
    return html.escape(str(text))


def figure(path: Path, alt: str) -> str:
    return f"<img class='fig' src='figures/{esc(path.name)}' alt='{esc(alt)}'>"


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- figures ---------------------------------------------------------------------------------------

def plot_learning_curves(runs: dict[str, list[dict]], path: Path) -> Path | None:
    """Training loss and accuracy (and validation accuracy) against steps; several runs overlaid."""
    keys = [("loss", "training loss"), ("acc", "training accuracy"), ("val_acc", "validation accuracy"),
            ("return_after", "return after adaptation"), ("val_mse", "validation MSE")]
    present = [(k, label) for k, label in keys if any(k in r for rows in runs.values() for r in rows)]
    if not present:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}  # one colour per run in every panel, present or not
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.3), squeeze=False)
    for ax, (key, label) in zip(axes[0], present):
        for name, rows in runs.items():
            percent = key in ("acc", "val_acc")  # accuracy in % everywhere in the report
            pts = [(r["step"], 100 * r[key] if percent else r[key]) for r in rows if key in r]
            if pts:
                # validation comes every val_every steps (often one point in a short run): mark the points
                ax.plot(*zip(*pts), label=name, color=colours[name],
                        marker="o" if len(pts) == 1 else "." if key.startswith("val_") else None)
        ax.set_xlabel("step")
        if key in ("acc", "val_acc"):
            ax.set_ylim(0, 100)  # from 0: a ±0.01-point wobble must not look like a trend
            ax.set_ylabel("%")
        ax.set_title(label + (" (%)" if key in ("acc", "val_acc") else ""), fontsize=10)
    if len(runs) > 1:  # every run, also one missing from the first panel
        axes[0][0].legend(handles=[Line2D([], [], color=c, label=n) for n, c in colours.items()], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_shots(results: list[dict], ways: int, path: Path) -> Path:
    plt = _plt()
    shots = [r["shots"] for r in results]
    mean = torch.tensor([100 * r["mean"] for r in results])
    ci = torch.tensor([100 * r["ci95"] for r in results])
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(shots, mean, marker="o")
    ax.fill_between(shots, mean - ci, mean + ci, alpha=0.25, label="95 % CI")
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.xaxis.set_minor_locator(plt.NullLocator())  # no "2 x 10^0" minor labels on the log axis
    ax.set_xlabel("shots (examples per class)")
    ax.set_ylabel(f"{ways}-way accuracy (%)")
    ax.set_title("accuracy vs shots, meta-test classes", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_domains(names: list[str], accuracy: list[float], path: Path, ci95: list[float] | None = None) -> Path:
    plt = _plt()
    order = sorted(range(len(names)), key=lambda i: accuracy[i])
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1.2))
    errors = [100 * ci95[i] for i in order] if ci95 is not None else None
    ax.barh([names[i] for i in order], [100 * accuracy[i] for i in order], xerr=errors, color="#2f6fde",
            error_kw={"ecolor": "#333", "capsize": 2, "lw": 0.8})
    ax.set_xlim(0, 100)
    ax.set_xlabel("query accuracy (%)" + (", ± 95 % CI" if ci95 is not None else ""))
    ax.set_title("accuracy per domain (5-way 1-shot episodes)", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_thumbnail(image: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    arr = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).byte()
    arr = arr.squeeze(0) if arr.shape[0] == 1 else arr.permute(1, 2, 0)
    Image.fromarray(255 - arr.numpy() if arr.dim() == 2 else arr.numpy()).save(path)  # ink dark on white
    return path


# ---- analysis ----------------------------------------------------------------------------------------

@torch.no_grad()
def per_class_analysis(algorithm, source, episodes: int, seed: int = 2024, ways: int = 5) -> dict:
    """Per-class accuracy and confusions over ``episodes`` ``ways``-way 1-shot test episodes."""
    from metalab.data.sampler import EpisodeSampler

    ways = min(ways, source.num_classes)
    queries = max(1, min(15, int(source.class_counts().min()) - 1))
    tasks = min(50, episodes)
    sampler = EpisodeSampler(source, ways, 1, queries, tasks=tasks, seed=seed)
    c = source.num_classes
    correct, total = torch.zeros(c), torch.zeros(c)
    confusion = torch.zeros(c, c)
    algorithm.eval()
    for i in range((episodes + tasks - 1) // tasks):
        batch = sampler.sample(i)
        with torch.enable_grad():  # gradient-based learners adapt inside
            logits = algorithm.task_logits(algorithm.params(), batch).detach()
        true = torch.gather(batch.classes, 1, batch.query_y).flatten()
        pred = torch.gather(batch.classes, 1, logits.argmax(-1)).flatten()
        total += torch.bincount(true, minlength=c).float()
        correct += torch.bincount(true, weights=(true == pred).float(), minlength=c)
        confusion.index_put_((true, pred), torch.ones_like(true, dtype=torch.float), accumulate=True)
    acc = correct / total.clamp_min(1)
    dom = source.class_domains
    dom_acc = [float(correct[dom == d].sum() / total[dom == d].sum().clamp_min(1)) for d in range(source.num_domains)]
    # binomial 95 % interval over the domain's queries (queries of one episode are not independent,
    # so read it as a guide to which gaps are noise)
    dom_n = [float(total[dom == d].sum()) for d in range(source.num_domains)]
    dom_ci = [1.96 * (p * (1 - p) / max(n, 1.0)) ** 0.5 for p, n in zip(dom_acc, dom_n)]
    return {"accuracy": acc, "seen": total > 0, "confusion": confusion, "domain_accuracy": dom_acc,
            "domain_ci95": dom_ci}


# ---- reports ----------------------------------------------------------------------------------------

def build_report(run_dir: str | Path, out: str | Path | None = None, episodes: int = 300, graph_k: int = 5,
                 show_progress: bool = False) -> Path:
    """Write ``<out>/index.html`` (default ``RUN/report``) and its figures; returns the HTML path."""
    run = RunFolder.open(run_dir)
    config = run.config()
    out = Path(out) if out else run.path / "report"
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    metrics = run.metrics()
    eval_record = json.loads(run.eval_path.read_text()) if run.eval_path.exists() else None
    report = Report(f"metalab report — {run.path.name}",
                    f"algorithm {config.train.algo}, data {config.rl.task or config.data.source}; written "
                    f"{time.strftime('%Y-%m-%d %H:%M')}; {len(metrics)} metrics records")
    curves = plot_learning_curves({run.path.name: metrics}, figures / "learning_curves.png")
    report.add("Learning curves", figure(curves, "learning curves") if curves else "<p class='muted'>No metrics recorded.</p>")
    if config.rl.task is not None or is_task_family(config.data.source):
        _evaluation_figures(report, run.path, eval_record, figures)
    else:
        _classification_sections(report, run.path, config, eval_record, figures, episodes, graph_k, out, show_progress)
    report.add("Configuration", f"<pre>{esc(run.config_path.read_text())}</pre>")
    path = out / "index.html"
    path.write_text(report.html(), encoding="utf-8")
    return path


def _evaluation_figures(report: Report, run_path: Path, record: dict | None, figures: Path) -> None:
    import shutil

    if record is None:
        report.add("Evaluation", "<p class='muted'>Not evaluated yet: run <code>metalab eval RUN</code>.</p>")
        return
    body = []
    regression = [r for r in record.get("results", []) if r.get("metric") == "mse"]
    if regression:
        rows = [[f"{r['shots']}-shot", "default" if r["steps"] is None else str(r["steps"]),
                 f"{r['mean']:.4f} ± {r['ci95']:.4f}", str(r["episodes"])] for r in regression]
        note = f"<p class='muted'>{esc(record.get('split_description', ''))}</p>"
        if "diverged" in record:
            note += f"<p><b>Note:</b> {esc(record['diverged'])}</p>"
        body.append(table(["support points", "adaptation steps", "query MSE ± 95 % CI", "tasks"], rows) + note)
    if "rl" in record:
        steps = [r["adaptation_steps"] for r in next(iter(record["rl"].values()))]
        rows = [[esc(name)] + [f"{r['return']:.2f} ± {r['ci95']:.2f}" for r in curve] for name, curve in record["rl"].items()]
        body.append(table(["policy"] + [f"{s} steps" for s in steps], rows) + f"<p class='muted'>{esc(record['split'])}; {esc(record['protocol'])}</p>")
    for name in record.get("figures", []):
        src = run_path / name
        if src.exists():
            shutil.copy(src, figures / src.name)
            body.append(figure(figures / src.name, name))
    report.add("Evaluation", "".join(body))


def _classification_sections(report: Report, run_path: Path, config, record: dict | None, figures: Path,
                             episodes: int, graph_k: int, out: Path, show_progress: bool) -> None:
    from metalab.engine.eval_run import run_splits
    from metalab.engine.evaluate import evaluate
    from metalab.engine.trainer import load_trained
    from metalab.report.graph import build_graph, class_prototypes, draw_graph, export_graph, nearest_classes, score_neighbours

    _, algorithm, info = load_trained(run_path)
    splits = run_splits(config, show_progress, info["example_shape"])
    test = splits.require("test")
    cards = [f"<div class='card'><b>{info['step']}</b>meta-training steps</div>",
             f"<div class='card'><b>{test.num_classes}</b>meta-test classes ({test.num_domains} domains)</div>"]
    if record:
        for r in record.get("results", [])[:4]:
            over = f", {r['episodes']} episodes" if isinstance(r.get("episodes"), int) else ""
            cards.append(f"<div class='card'><b>{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f} %</b>{r['ways']}-way {r['shots']}-shot{over}</div>")
    report.add("Summary", "".join(cards) + f"<p class='muted'>{esc(splits.description)}</p>")

    ways = min(5, test.num_classes)
    fewest = int(test.class_counts().min())
    results = []
    for shots in (1, 5, 10, 20):
        queries = min(15, fewest - shots)
        if queries < 1:
            continue
        res = evaluate(algorithm, test, ways, shots, queries, episodes, show_progress=False)
        results.append({"shots": shots, "queries": queries, "mean": res.mean, "ci95": res.ci95})
    skipped = [s for s in (1, 5, 10, 20) if s not in [r["shots"] for r in results]]
    note = f" {', '.join(map(str, skipped))}-shot left out: test classes have only {fewest} examples." if skipped else ""
    rows = [[f"{r['shots']}", f"{r['queries']}", f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}"] for r in results]
    report.add("Accuracy vs shots", figure(plot_shots(results, ways, figures / "accuracy_vs_shots.png"), "accuracy vs shots")
               + table(["shots", "queries / class", f"{ways}-way accuracy (%)"], rows)
               + f"<p class='muted'>{episodes} episodes per point, 95 % CI.{esc(note)}</p>")

    analysis = per_class_analysis(algorithm, test, episodes)
    report.add("Per domain", figure(plot_domains(test.domain_names, analysis["domain_accuracy"], figures / "domains.png",
                                                    analysis["domain_ci95"]),
                                    "accuracy per domain"))
    acc, seen, confusion = analysis["accuracy"], analysis["seen"], analysis["confusion"].clone()
    confusion.fill_diagonal_(0)
    order = [int(i) for i in torch.argsort(torch.where(seen, acc, torch.tensor(2.0)))[:10] if seen[i]]
    texts = test.meta.get("per_example", {}).get("text")
    rows = []
    for c in order:
        top = [int(j) for j in torch.argsort(confusion[c], descending=True)[:3] if confusion[c, j] > 0]
        rows.append([_show_class(test, c, figures, texts), f"{100 * float(acc[c]):.1f}",
                     " ".join(_show_class(test, j, figures, texts) + f" <span class='muted'>×{int(confusion[c, j])}</span>" for j in top) or "-"])
    report.add("Weakest classes", table(["class", "accuracy (%)", "most often taken for"], rows)
               + "<p class='muted'>5-way 1-shot test episodes; counts are query predictions.</p>")

    protos = class_prototypes(algorithm, test)
    indices, _ = nearest_classes(protos, graph_k)
    score = score_neighbours(indices, test.class_domains)
    graph = build_graph(test, protos, graph_k)
    json_path, graphml_path = export_graph(graph, out)
    drawn = draw_graph(graph, figures / "knowledge_graph.png")
    report.add("Knowledge graph", figure(drawn, "knowledge graph")
               + f"<p>{100 * score.same_domain_rate:.1f} % of each class's {graph_k} nearest classes share its domain, "
                 f"against {100 * score.chance_rate:.1f} % for random pairs ({score.lift:.1f}×). "
                 f"Files: <a href='{json_path.name}'>{json_path.name}</a>, <a href='{graphml_path.name}'>{graphml_path.name}</a>.</p>")


def _show_class(source, c: int, figures: Path, texts) -> str:
    name = esc(source.class_names[c])
    if source.x.dim() == 4:  # images: a thumbnail of its first example
        first = int((source.y == c).nonzero()[0])
        thumb = save_thumbnail(source.x[first], figures / f"class_{c}.png")
        return f"<img class='thumb' src='figures/{thumb.name}' alt='{name}'> {name}"
    if texts is not None:
        first = int((source.y == c).nonzero()[0])
        return f"{name} <span class='muted'>“{esc(texts[first][:60])}”</span>"
    return name


#: config fields that decide what a run's figures measure: the data, its class split, the test episodes
COMPARED_FIELDS = ("rl.task", "data.source", "data.image_size", "data.split_seed", "data.val_fraction", "data.test_fraction",
                   "data.test_domains", "data.encoder", "data.encoder_layers", "eval.seed")


class _Unused:
    """A field a run does not read (a meta-RL run's ``data.*``: its tasks come from ``rl.task``)."""

    def __repr__(self) -> str:
        return "unused"


def config_differences(configs: dict) -> list[str]:
    """``"field: run value, run value"`` for each of :data:`COMPARED_FIELDS` on which the runs that
    read it differ (a run that does not read it is listed as ``unused``)."""
    out = []
    for dotted in COMPARED_FIELDS:
        section, key = dotted.split(".")
        values = {name: _Unused() if section == "data" and config.rl.task is not None else getattr(getattr(config, section), key)
                  for name, config in configs.items()}
        if len({repr(v) for v in values.values() if not isinstance(v, _Unused)}) > 1:
            out.append(f"{dotted}: " + ", ".join(f"{name} {value!r}" for name, value in values.items()))
    return out


def _steps_word(steps: int) -> str:
    return f"{steps} step{'s' if steps != 1 else ''}"


def _trained_steps(run: RunFolder, record: dict | None) -> str:
    """The step a run was evaluated at, or its newest checkpoint's when it has no eval.json yet."""
    if record is not None:
        return str(record.get("step", "-"))
    found = list_checkpoints(run.path)
    return f"{found[-1][0]} (not evaluated)" if found else "-"


def build_comparison(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Several runs side by side: final evaluation table and overlaid learning curves."""
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    runs = [RunFolder.open(r) for r in run_dirs]
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.path) for r in runs]
    report = Report("metalab compare", f"{len(runs)} runs; written {time.strftime('%Y-%m-%d %H:%M')}")
    records = {n: json.loads(r.eval_path.read_text()) if r.eval_path.exists() else None for n, r in zip(names, runs)}
    settings: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for n, rec in records.items():
        for r in (rec or {}).get("results", []):
            key = (f"{r['ways']}-way {r['shots']}-shot" if r.get("metric", "accuracy") == "accuracy" else
                   f"{r['shots']}-shot MSE, {'default steps' if r.get('steps') is None else _steps_word(r['steps'])}")
            key += f", {r['episodes']} episodes" if isinstance(r.get("episodes"), int) else ""
            settings += [key] if key not in settings else []
            value = f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}" if r.get("metric", "accuracy") == "accuracy" else f"{r['mean']:.4f} ± {r['ci95']:.4f}"
            cells[(n, key)] = value
        for name, curve in (rec or {}).get("rl", {}).items():
            for r in curve:
                key = f"{name}: return after {r['adaptation_steps']} steps"
                settings += [key] if key not in settings else []
                cells[(n, key)] = f"{r['return']:.2f} ± {r['ci95']:.2f}"
    configs = {n: r.config() for n, r in zip(names, runs)}
    rows = [["algorithm"] + [esc(configs[n].train.algo) for n in names],
            ["data"] + [esc(configs[n].rl.task or configs[n].data.source) for n in names],
            ["steps"] + [_trained_steps(r, records[n]) for n, r in zip(names, runs)]]
    rows += [[esc(s)] + [cells.get((n, s), "-") for n in names] for s in settings]
    notes = "<p class='muted'>Mean ± 95 % CI from each run's eval.json.</p>"
    if differences := config_differences(configs):
        notes += ("<p><b>Not like for like:</b> these runs differ in their data, class split or test episodes, so "
                  "their figures do not measure the same thing:</p><ul>" + "".join(f"<li>{esc(d)}</li>" for d in differences) + "</ul>")
    report.add("Results", table(["", *map(esc, names)], rows) + notes)
    curves = plot_learning_curves({n: r.metrics() for n, r in zip(names, runs)}, figures / "learning_curves.png")
    if curves:
        report.add("Learning curves", figure(curves, "learning curves"))
    path = out / "index.html"
    path.write_text(report.html(), encoding="utf-8")
    return path
