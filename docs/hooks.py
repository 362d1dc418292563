"""MkDocs hooks: pages generated at build time from the code, so they cannot drift from it.

* ``algorithms.md``: one section per registered algorithm (paper, idea, options and defaults),
  from :data:`metalab.algorithms.ALGORITHMS`;
* ``cli.md``: every command's ``--help``, from the typer app;
* ``results/``: every file of ``benchmarks/results/`` and an index of them;
* ``changelog.md``: ``CHANGELOG.md``.
"""

from __future__ import annotations

from pathlib import Path

import click
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def _algorithms_page() -> str:
    from metalab.algorithms import ALGORITHMS, option_defaults

    lines = ["# Algorithms", "",
             "Generated from the algorithm registry (`metalab.algorithms.ALGORITHMS`); `metalab algorithms` prints the "
             "same. Every algorithm is one module in `metalab/algorithms/` behind one interface: "
             "`meta_loss(params, batch)` for training and `adapt(params, support_x, support_y, ways) -> Predictor`.", "",
             "| name | tasks | what |", "|---|---|---|"]
    for name, spec in ALGORITHMS.items():
        lines.append(f"| [`{name}`](#{name.replace('+', '')}) | {', '.join(spec.tasks)} | {spec.summary} |")
    for name, spec in ALGORITHMS.items():
        doc = (spec.cls.__doc__ or "").strip() if spec.cls is not None else ""
        lines += ["", f"## {name}", "", f"*{spec.summary}*; module `{spec.cls.__module__}`; "
                  f"backbone normalisation `{spec.norm}`.", ""]
        if doc:
            lines += [doc, ""]
        defaults = option_defaults(name, spec.tasks[0])
        if spec.options:
            lines += ["| option (`train.algo_options.*`) | default |", "|---|---|"]
            lines += [f"| `{key}` | `{defaults.get(key, '—')}` |" for key in spec.options]
        else:
            lines.append("No options.")
    return "\n".join(lines) + "\n"


def _cli_page() -> str:
    import typer

    from metalab.cli import app

    root = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated from the `metalab` typer app: each command's `--help`.", ""]

    def walk(command: click.Command, path: list[str]) -> None:
        with click.Context(command, info_name=" ".join(path)) as ctx:
            text = command.get_help(ctx)
        lines.extend([f"## `{' '.join(path)}`", "", "```text", text, "```", ""])
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), [*path, name])

    walk(root, ["metalab"])
    return "\n".join(lines)


def _results_index(files: list[Path]) -> str:
    lines = ["# Results", "", "Every figure the README and the guides quote, as the benchmark that made it wrote it "
             "(`benchmarks/results/`; each file names its command and machine).", "", "| file | what |", "|---|---|"]
    for path in files:
        what = ""
        if path.suffix == ".md":
            what = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.strip()), "")
        lines.append(f"| [{path.name}]({path.name}) | {what.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _results_page(path: Path) -> str:
    """A results file as a docs page; links into the repository (``../../README.md``, other
    ``benchmarks/…`` paths) become plain text, as they point outside the site."""
    import re

    text = path.read_text()
    return re.sub(r"\[([^\]]+)\]\((?!https?:|#)([^)]*?)\)",
                  lambda m: m.group(0) if (path.parent / m.group(2).split("#")[0]).resolve().parent == path.parent.resolve()
                  else f"`{m.group(1)}`", text)


def on_files(files, config):
    add = lambda uri, content: files.append(File.generated(config, uri, content=content))  # noqa: E731
    add("algorithms.md", _algorithms_page())
    add("cli.md", _cli_page())
    add("changelog.md", (ROOT / "CHANGELOG.md").read_text())
    results = sorted(p for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_file())
    add("results/index.md", _results_index(results))
    for path in results:
        if path.suffix == ".md":
            add(f"results/{path.name}", _results_page(path))
        elif path.suffix == ".txt":
            add(f"results/{path.name}", path.read_text())
        else:
            add(f"results/{path.name}", path.read_bytes())
    return files
