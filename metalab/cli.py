"""``metalab`` command line: parses arguments, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from metalab.errors import ConfigError, MetalabError
from metalab.serve.limits import Limits

_LIMITS = Limits()  #: the service's default limits, shown by `metalab serve --help`

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
                  help="metalab: meta-learning from many small tasks.")
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from metalab import __version__

        print(f"metalab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """metalab: meta-learning from many small tasks (`metalab demo` for a first run)."""


def _steps(steps: int | None) -> str:
    return "default steps" if steps is None else f"{steps} step{'s' if steps != 1 else ''}"


def _results_table(record: dict, title: str) -> Table:
    regression = any(r.get("metric") == "mse" for r in record["results"])
    table = Table(title=title)
    for col in ("setting", "MSE" if regression else "accuracy (%)", "95 % CI (±)", "episodes", "queries"):
        table.add_column(col, justify="right")
    for r in record["results"]:
        if r.get("metric") == "mse":
            table.add_row(f"{r['shots']}-shot, {_steps(r['steps'])}", f"{r['mean']:.4f}", f"{r['ci95']:.4f}",
                          str(r["episodes"]), str(r["queries"]))
        else:
            table.add_row(f"{r['ways']}-way {r['shots']}-shot", f"{100 * r['mean']:.2f}", f"{100 * r['ci95']:.2f}",
                          str(r["episodes"]), f"{r['queries']}/class")
    return table


def _parse_settings(settings: list[str] | None) -> list[list[int]] | None:
    if not settings:
        return None
    out = []
    for s in settings:
        m = re.fullmatch(r"(\d+)w(\d+)s", s.strip())
        if not m:
            raise ConfigError(f"--setting '{s}' is not of the form <ways>w<shots>s (e.g. 5w1s).")
        if int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ConfigError(f"--setting '{s}' needs at least 1 way and 1 shot (e.g. 5w1s).")
        out.append([int(m.group(1)), int(m.group(2))])
    return out


def _parse_value(text: str, key: str = "value"):
    """A ``--set`` value as YAML reads it (``5`` an int, ``[5, 1]`` a list, ``abc`` a string)."""
    from metalab.engine.config import read_yaml_text

    try:
        return read_yaml_text(text)
    except ConfigError as exc:  # an alias
        raise ConfigError(f"--set {key}={text!r} {exc}.") from None
    except yaml.YAMLError as exc:
        problem = (getattr(exc, "problem", None) or str(exc).splitlines()[0]).rstrip(".")
        raise ConfigError(f"--set {key}={text!r}: the value is not valid YAML ({problem}); write it as YAML, e.g. "
                          f"quote a string: --set '{key}=\"...\"'.") from None


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (sections data/train/eval)."),
    algo: Optional[str] = typer.Option(None, help="Algorithm (see 'metalab algorithms')."),
    data: Optional[str] = typer.Option(None, help="'omniglot', 'clinc150', 'hwu64', 'sinusoid', an image folder root/<class>/*.png, an .npz file, or a text .csv/.jsonl (text,label[,domain])."),
    backbone: Optional[str] = typer.Option(None, help="auto (default), conv4, conv4-strided (the MAML paper's, 3.7x fewer multiply-adds), conv4-spatial (no last max-pool), mlp; for embeddings: diagonal (learned per-dimension weighting), linear (projection), identity."),
    task: Optional[str] = typer.Option(None, help="Meta-RL task family: nav2d or bandit (with --algo maml-rl, fomaml-rl, reptile-rl or pretrained-rl; e.g. --meta-batch 20)."),
    planner: Optional[str] = typer.Option(None, help="Task planner: uniform (default), domain-balanced, curriculum, hard (hard-task mining)."),
    ways: Optional[int] = typer.Option(None, help="Classes per training task."),
    shots: Optional[int] = typer.Option(None, help="Support examples per class."),
    queries: Optional[int] = typer.Option(None, help="Query examples per class."),
    meta_batch: Optional[int] = typer.Option(None, help="Tasks per meta-batch."),
    steps: Optional[int] = typer.Option(None, help="Meta-training steps."),
    lr: Optional[float] = typer.Option(None, help="Outer (meta) learning rate."),
    time_budget: Optional[float] = typer.Option(None, help="Stop after this many seconds (a checkpoint is kept); the learning-rate schedule still follows --steps (train.anneal_by=time: whichever runs out first)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
    precision: Optional[str] = typer.Option(None, help="fp32 (default) or bf16: bfloat16 mixed-precision training steps (faster on CPUs with AVX-512-BF16/AMX and recent GPUs)."),
    seed: Optional[int] = typer.Option(None, help="Seed of initialisation and episode sampling."),
    init_from: Optional[str] = typer.Option(None, help="Start the backbone from this run folder's weights (e.g. a ProtoNet run under --algo maml); same backbone and hidden width."),
    tune_encoder: Optional[str] = typer.Option(None, help="Text: meta-train the sentence encoder's top N transformer layers ('all': every one) under the algorithm's head (protonet, r2d2, matchingnet), e.g. --tune-encoder 2."),
    set_: list[str] = typer.Option([], "--set", help="Override any field: --set train.algo_options.inner_lr=0.1"),
    out: Optional[Path] = typer.Option(None, help="Run folder to create (default runs/<name>-<time>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue this run folder from its last good checkpoint, with its own config.yaml (only --device may be given too)."),
    evaluate_after: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate on meta-test when training ends."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Meta-train an algorithm; the run folder holds config, metrics and checkpoints."""
    from metalab.data.catalog import is_task_family
    from metalab.engine import MetaTrainer, RunConfig, RunFolder
    from metalab.engine.eval_run import evaluate_run
    from metalab.engine.config import read_config_file
    from metalab.engine.run import default_run_dir

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and out is None and resume is None:
        raise ConfigError("Under torchrun pass --out RUN_FOLDER, so every process writes to the same run folder.")
    if not main_rank:
        console.quiet = True
        progress = False
    flags = {"train.algo": algo, "data.source": data, "train.ways": ways, "train.shots": shots,
             "train.queries": queries, "train.backbone": backbone, "train.meta_batch": meta_batch, "train.steps": steps, "train.lr": lr,
             "train.time_budget": time_budget, "train.device": device, "train.precision": precision, "train.seed": seed, "rl.task": task,
             "train.planner": planner, "train.init_from": init_from,
             "train.tune_encoder": tune_encoder}  # ('2' becomes 2 in the config's check)
    if resume is not None:
        given = [{"data.source": "--data"}.get(key, f"--{key.split('.')[1].replace('_', '-')}")
                 for key, value in flags.items() if value is not None and key != "train.device"]
        given += ["--config"] * (config is not None) + ["--set"] * bool(set_) + ["--out"] * (out is not None)
        if given:  # they would be silently ignored: the run goes on with its own config.yaml
            raise ConfigError(f"--resume continues a run with its own config.yaml; drop {', '.join(given)} "
                              "(to train with other settings, start a new run with --out; only --device may change).")
    if resume is None and out is not None and (out / "config.yaml").exists() \
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = out  # torchrun --max-restarts restarted us (same command line): continue from the last good checkpoint
    if resume is not None:
        cfg = RunFolder.open(resume).config()
        run_dir = resume
        if device is not None and device != cfg.train.device:  # e.g. a GPU run continued on a CPU machine
            console.print(f"resuming on --device {escape(device)} (config.yaml says {escape(cfg.train.device)}, and keeps "
                          "saying so): the steps from here on may differ in the last bits from an uninterrupted run")
            cfg.train.device = device
        elif cfg.train.device.startswith("cuda") and not _has_cuda():
            raise ConfigError(f"Run '{resume}' was trained with train.device='{cfg.train.device}' and this machine has no "
                              "CUDA GPU; continue it here with --device cpu.")
    else:
        raw = {}
        if config:  # validate the file (clear errors), then start from what it says, so that
            RunConfig.load(config)  # defaults that follow the data (regression) still apply to the rest
            raw = read_config_file(config)
        overrides = {k: v for k, v in flags.items() if v is not None}
        for item in set_:
            if "=" not in item:
                raise ConfigError(f"--set '{item}' is not of the form section.field=value.")
            key, value = item.split("=", 1)
            overrides[key.strip()] = _parse_value(value, key.strip())
        for key, value in overrides.items():
            _assign(raw, key, value)
        raw.setdefault("name", (raw.get("train") or {}).get("algo", "protonet"))  # ('train:' may be empty)
        cfg = RunConfig.from_dict(raw, origin=str(config) if config else "command line")
        if ways is not None and is_task_family(cfg.data.source):
            raise ConfigError(f"--ways means nothing for '{cfg.data.source}' tasks (one function to fit, not classes); drop it.")
        run_dir = out or default_run_dir(cfg.name)
    if cfg.rl.task is not None:
        _train_rl(cfg, run_dir, resume is not None, progress, evaluate_after)
        return
    trainer = MetaTrainer(cfg, run_dir, resume=resume is not None, show_progress=progress, log=console.print,
                          check_eval=evaluate_after)
    if trainer.splits is not None:
        console.print(f"[bold]split:[/] {escape(trainer.splits.description)}")
    _index_run(run_dir)
    result = trainer.train()
    _index_run(result.run_dir)
    _exit_if_interrupted(result, cfg)
    validating = f", {result.validation_seconds:.0f} s of it validating" if result.validation_seconds >= 1 else ""
    console.print(f"trained {result.steps} steps in {result.seconds:.0f} s{validating} (stopped by {result.stopped_by}); "
                  f"run folder: {result.run_dir}")
    if evaluate_after:
        record = evaluate_run(result.run_dir, device=str(trainer.device), show_progress=progress)
        _index_run(result.run_dir)
        console.print(_results_table(record, f"{cfg.train.algo} on meta-test ({record['split']})"))
        _print_left_out(record)
        if record.get("full_task"):
            console.print(_full_task_table(record["full_task"]))


def _has_cuda() -> bool:
    import torch  # (loaded only when needed: the CLI starts fast)

    return torch.cuda.is_available()


def _print_left_out(record: dict) -> None:
    if "diverged" in record:
        console.print(f"[bold red]note:[/] {escape(record['diverged'])}")
    for item in record.get("left_out", []):
        console.print(f"left out {item['ways']}-way {item['shots']}-shot: it {escape(item['reason'])}.")
    for item in record.get("full_task_left_out", []):
        console.print(f"left out all classes at {item['shots']} shots: it {escape(item['reason'])}.")


def _exit_if_interrupted(result, cfg) -> None:
    """After Ctrl-C (the trainer stopped between steps and checkpointed): say how to go on, exit 130."""
    if result.stopped_by == "interrupted":
        where = escape(str(result.run_dir))
        console.print(f"interrupted at step {result.steps} of {cfg.train.steps}; its checkpoint is in {where}; "
                      f"continue with `metalab train --resume {where}`")
        sys.exit(130)  # the shell's code for Ctrl-C; no evaluation of a half-trained model


def _train_rl(cfg, run_dir: Path, resume: bool, progress: bool, evaluate_after: bool) -> None:
    from metalab.rl.trainer import RLTrainer, evaluate_rl_run

    trainer = RLTrainer(cfg, run_dir, resume=resume, show_progress=progress, log=console.print)
    _index_run(run_dir)
    result = trainer.train()
    _index_run(result.run_dir)
    _exit_if_interrupted(result, cfg)
    console.print(f"trained {result.steps} steps in {result.seconds:.0f} s (stopped by {result.stopped_by}); run folder: {result.run_dir}")
    if evaluate_after:
        record = evaluate_rl_run(result.run_dir)
        _index_run(result.run_dir)
        console.print(_returns_table(record))


def _returns_table(record: dict) -> Table:
    curves = record["rl"]
    steps = [r["adaptation_steps"] for r in next(iter(curves.values()))]
    table = Table(title=f"{record['task']}: mean return ± 95 % CI over {next(iter(curves.values()))[0]['tasks']} test tasks")
    table.add_column("policy")
    for s in steps:
        table.add_column("before adaptation" if s == 0 else f"after {s} step{'s' if s > 1 else ''}", justify="right")
    for name, rows in curves.items():
        table.add_row(name, *[f"{r['return']:.2f} ± {r['ci95']:.2f}" for r in rows])
    table.caption = record["protocol"] + f"; plot: {record['figures'][0]}"
    return table


def _assign(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    if parts[0] not in ("data", "train", "eval", "rl", "name"):
        raise ConfigError(f"'{dotted}' does not start with a config section; use data., train., eval. or rl.")
    if len(parts) == 1 and parts[0] != "name":
        example = {"data": "image_size=28", "train": "steps=100", "eval": "episodes=600", "rl": "episodes=20"}[dotted]
        raise ConfigError(f"--set {dotted}=… names a whole section; set one of its fields, e.g. --set {dotted}.{example} "
                          "(`metalab train --help` and the docs list them).")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:  # absent, or an empty section in the YAML file
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"'{dotted}' goes through a field that is not a section.")
    node[parts[-1]] = value


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="Run folder."),
    setting: list[str] = typer.Option([], "--setting", help="e.g. 5w1s; repeat for several (default: the run's eval.settings)."),
    episodes: Optional[int] = typer.Option(None, min=1, help="Test episodes per setting (default: the run's eval.episodes, 600)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N."),
    split: str = typer.Option("test", help="test or val."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Evaluate a run: mean accuracy ± 95 % CI over test episodes (meta-RL: return vs adaptation steps); writes eval.json."""
    from metalab.engine.eval_run import evaluate_run
    from metalab.engine.run import RunFolder

    settings = _parse_settings(setting)  # arguments first, then the files they name
    if RunFolder.open(run).config().rl.task is not None:
        from metalab.rl.trainer import evaluate_rl_run

        given = ["--setting"] * bool(settings) + ["--episodes"] * (episodes is not None) + ["--split"] * (split != "test")
        if given:  # they would be silently ignored
            raise ConfigError(f"{', '.join(given)} apply to few-shot runs; a meta-RL run is scored on rl.test_tasks "
                              "fresh tasks after 0..rl.eval_steps adaptation steps (set in its config.yaml).")
        record = evaluate_rl_run(run)
        _index_run(run)
        console.print(_returns_table(record))
        return

    record = evaluate_run(run, settings, episodes, device, show_progress=progress, split=split)
    if split == "test":  # (eval.json holds the test split's figures)
        _index_run(run)
    console.print(f"split: {escape(record['split_description'])}")
    console.print(_results_table(record, f"{record['algo']} at step {record['step']} ({split})"))
    _print_left_out(record)
    if record.get("full_task"):
        console.print(_full_task_table(record["full_task"]))


@app.command()
def algorithms() -> None:
    """List the algorithms, what they do and the options they accept."""
    from metalab.algorithms import ALGORITHMS, option_defaults

    from rich import box

    table = Table(title="algorithms (--algo NAME; options: --set train.algo_options.KEY=VALUE)", box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    table.add_column("tasks", no_wrap=True)
    table.add_column("what, and options = default")
    for name, spec in ALGORITHMS.items():
        defaults = option_defaults(name, spec.tasks[0])
        regression = option_defaults(name, "regression") if len(spec.tasks) > 1 else defaults
        shown = [f"{key}={_yaml_word(value)}" + (f" (regression {_yaml_word(regression[key])})"
                                                  if regression.get(key) != value else "")
                 for key, value in defaults.items()]
        tasks = " + ".join({"classification": "class.", "regression": "regr."}[t] for t in spec.tasks)
        table.add_row(name, tasks, escape(spec.summary) + (f"\n[dim]{escape(', '.join(shown))}[/dim]" if shown else ""))
    rl = {"maml-rl": "MAML with a policy-gradient inner loop (second order through the inner step)",
          "fomaml-rl": "first-order MAML on policies",
          "reptile-rl": "Reptile on policies (rl.inner_steps PG steps, then move towards them)",
          "pretrained-rl": "baseline: one policy trained on all tasks at once (no meta-learning)"}
    for name, what in rl.items():
        table.add_row(name, "meta-RL", f"{what} (--task nav2d | bandit)\n[dim]rl.* (inner_lr, inner_steps, episodes, …)[/dim]")
    console.print(table)


def _yaml_word(value) -> str:
    """A default as it is written in a config or ``--set`` (true / false, not True / False)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@app.command()
def datasets() -> None:
    """List the bundled data sources with class and domain counts."""
    from metalab.data.catalog import BUNDLED, load_source
    from metalab.data.text import is_text_spec

    table = Table(title="bundled data")
    for col in ("name", "examples", "classes", "domains", "per class", "example", "out-of-scope"):
        table.add_column(col, no_wrap=True)
    for name in BUNDLED:
        d = _describe_text(name) if is_text_spec(name) else load_source(name).describe()
        table.add_row(name, str(d["examples"]), str(d["classes"]), str(d["domains"]),
                      f"{d['min_per_class']}-{d['max_per_class']}", "×".join(map(str, d["example_shape"])),
                      str(d.get("out_of_scope", "-")))
    console.print(table)
    for name, about in BUNDLED.items():  # below the table, so a narrow terminal wraps prose, not columns
        console.print(f"[bold]{name}[/bold]: {escape(about)}")


def _describe_text(name: str) -> dict:
    from metalab.data.text import load_text

    corpus = load_text(name)
    counts = corpus.y.bincount(minlength=corpus.num_classes)
    oos = sum(len(v) for v in corpus.out_of_scope.values())
    return {"examples": len(corpus.texts), "classes": corpus.num_classes, "domains": len(corpus.domain_names),
            "min_per_class": int(counts.min()), "max_per_class": int(counts.max()),
            "example_shape": ["text"], "out_of_scope": oos}


def _full_task_table(tasks: list[dict]) -> Table:
    table = Table(title="all meta-test classes at once (support: train part; queries: test part; "
                        "precision, recall, F1: macro averages)")
    for col in ("task", "acc (%)", "± CI", "prec.", "recall", "F1", "in-scope acc", "OOS recall"):
        table.add_column(col, justify="right", no_wrap=col == "task")  # "45w5s ×10" on one line at 80 columns
    for t in tasks:
        oos = t.get("out_of_scope")
        table.add_row(f"{t['ways']}w{t['shots']}s ×{t['draws']}", f"{100 * t['accuracy']:.2f}",
                      f"{100 * t['accuracy_ci95']:.2f}", f"{t['macro_precision']:.3f}", f"{t['macro_recall']:.3f}",
                      f"{t['macro_f1']:.3f}", f"{100 * oos['in_scope_accuracy']:.2f}" if oos else "-",
                      f"{100 * oos['oos_recall']:.2f}" if oos else "-")
    weakest = tasks[-1]["per_class"][:5]
    table.caption = (f"weakest classes at {tasks[-1]['shots']} shots (F1): "
                     + ", ".join(f"{r['class']} {r['f1']:.2f}" for r in weakest) + "; per-class report in eval.json")
    return table


@app.command()
def adapt(
    run: Path = typer.Option(..., "--run", help="Trained run folder."),
    support: Path = typer.Option(..., "--support", help="Labelled examples: text .csv/.jsonl (text,label), an image folder root/<label>/*.png, or an .npz of x and y (array runs)."),
    out: Path = typer.Option(Path("adapter.safetensors"), "--out", help="Adapter file to write."),
    head: str = typer.Option("auto", help="auto: logistic for text runs (with the label names as examples: the best cheap route measured, benchmarks/results/text_transfer.md), the run's own adapt otherwise; or 'algorithm' (the run's own adapt), prototypes, logistic, ridge."),
    oos_threshold: Optional[float] = typer.Option(None, help="Reject as out-of-scope when the top logit is below this (default: the threshold fitted in the run's evaluation, for --head algorithm only)."),
    text_column: str = typer.Option("text"),
    label_column: str = typer.Option("label"),
    names_as_examples: Optional[bool] = typer.Option(None, "--names-as-examples/--no-names-as-examples", help="Text: add each label (underscores as spaces) as one more example of itself; helps when labels are words (default: on for --head auto when every label has a letter)."),
    lexical_weight: float = typer.Option(0.0, min=0.0, help="Text: add this weight times a TF-IDF n-gram classifier's log-probabilities, fitted on the support texts (0.1 is a good start; 0 = off)."),
    finetune_epochs: int = typer.Option(0, min=0, help="Text: first fine-tune the run's encoder on the support for this many epochs (4 epochs: +1.1 points on CLINC150's 45 held-out intents, 30 s on 2 CPU cores; no gain on 15 easy ones: check on held-out examples; the adapter then carries the encoder's weights, ~90 MB; 0 = off)."),
    finetune_lr: float = typer.Option(1e-4, min=0.0, help="Text: the encoder's learning rate when fine-tuning."),
    seed: int = typer.Option(0, help="Seed of the fine-tuning (batch order and dropout)."),
) -> None:
    """Adapt a trained run to a few labelled examples; writes an adapter file for `metalab predict`."""
    import time as _time

    from metalab.engine.adapter import adapt_from_file, default_threshold, resolve_text_route

    start = _time.perf_counter()
    head, names_as_examples = resolve_text_route(run, support, head, names_as_examples, text_column, label_column)
    adapter = adapt_from_file(run, support, head, oos_threshold, text_column=text_column, label_column=label_column,
                              names_as_examples=names_as_examples, lexical_weight=lexical_weight,
                              finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, seed=seed, progress=True)
    threshold = oos_threshold
    if threshold is None:  # the run's own, when it was fitted on tasks like this adapter's
        threshold = adapter.threshold = default_threshold(run, head, len(adapter.labels))
        if threshold is None and default_threshold(run, head) is not None:
            console.print(f"note: out-of-scope detection is off: the run's threshold was fitted on tasks of many more "
                          f"labels than this adapter's {len(adapter.labels)}; set one with --oos-threshold.")
    path = adapter.save(out)
    examples = len(adapter.support_y) - (len(adapter.labels) if names_as_examples else 0)
    console.print(f"adapted to {len(adapter.labels)} labels from {examples} examples in "
                  f"{_time.perf_counter() - start:.2f} s (head: {head}{' + label names' if names_as_examples else ''}; out-of-scope threshold: "
                  f"{'none' if threshold is None else f'{threshold:.3f}'}"
                  f"{f'; lexical weight {lexical_weight}' if lexical_weight else ''}"
                  f"{f'; encoder fine-tuned for {finetune_epochs} epochs' if finetune_epochs else ''}); adapter: {path}")


@app.command()
def predict(
    inputs: Optional[list[str]] = typer.Argument(None, help="Texts to classify (text adapters), image files (image adapters) or .npz files of rows x (array adapters)."),
    adapter: Path = typer.Option(..., "--adapter", help="Adapter file from `metalab adapt`."),
    input_file: Optional[str] = typer.Option(None, "--input", help="Text adapters: a file of texts to classify, one per line ('-': read them from stdin)."),
    labelled: Optional[Path] = typer.Option(None, "--labelled", help="Text adapters: a labelled .csv/.jsonl (text,label) to predict and score: accuracy and macro precision / recall / F1."),
    text_column: str = typer.Option("text", help="--labelled: the text column."),
    label_column: str = typer.Option("label", help="--labelled: the label column."),
    top: int = typer.Option(3, min=1, help="Scores shown per input."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
) -> None:
    """Label texts or images with an adapter: best label, top scores and the out-of-scope flag;
    with --labelled, the accuracy and macro F1 on a labelled file."""
    import json

    from metalab.engine.adapter import Adapter, read_text_inputs, score_labelled

    fitted = Adapter.load(adapter)
    inputs = list(inputs or [])
    if (input_file is not None or labelled is not None) and not fitted.text:
        raise ConfigError("--input and --labelled read texts, and this adapter is not a text adapter; pass its inputs as arguments.")
    if input_file is not None:
        inputs += read_text_inputs(input_file)
    if labelled is not None:
        record = score_labelled(fitted, labelled, text_column, label_column)
        if as_json:
            print(json.dumps({k: v for k, v in record.items()}))
        else:
            console.print(f"{record['examples']} labelled texts in {escape(str(labelled))}: accuracy "
                          f"{100 * record['accuracy']:.2f} %, macro precision {record['macro_precision']:.3f}, recall "
                          f"{record['macro_recall']:.3f}, F1 {record['macro_f1']:.3f}; weakest (F1): "
                          + ", ".join(f"{escape(r['class'])} {r['f1']:.2f}" for r in record["per_class"][:3]))
        if not inputs:
            return
    if not inputs:
        raise ConfigError("Nothing to predict; pass inputs as arguments, a file with --input (one text per line, '-' for "
                          "stdin), or a labelled file with --labelled.")
    if fitted.arrays:  # each .npz holds rows to label
        rows, inputs = fitted.read_arrays(inputs)
        predictions = fitted.predict(rows)
    else:
        predictions = fitted.predict(inputs)
    kind = "text" if fitted.text else "row" if fitted.arrays else "image"
    if as_json:
        for item, p in zip(inputs, predictions):
            print(json.dumps({kind: item, "label": p.label, "scores": p.scores, "out_of_scope": p.out_of_scope}))
        return
    table = Table(title=f"predictions ({adapter})")
    for col in (kind, "label", "top scores", "out of scope"):
        table.add_column(col)
    for text, p in zip(inputs, predictions):
        best = sorted(p.scores.items(), key=lambda kv: -kv[1])[:top]
        table.add_row(escape(text), escape(p.label), escape(", ".join(f"{k} {v:.3f}" for k, v in best)),
                      "-" if p.out_of_scope is None else ("yes" if p.out_of_scope else "no"))
    console.print(table)


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run folder."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default RUN/report)."),
    episodes: int = typer.Option(300, min=1, help="Test episodes per point (accuracy vs shots, per-class analysis)."),
    k: int = typer.Option(5, min=1, help="Nearest classes per class in the knowledge graph."),
) -> None:
    """Write an HTML report (curves, accuracy vs shots, domains, weakest classes, knowledge graph, config)."""
    from metalab.report.html import build_report

    path = build_report(run, out, episodes, k)
    console.print(f"report: {path}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Two or more run folders."),
    out: Path = typer.Option(Path("compare"), help="Report folder."),
) -> None:
    """Put several runs side by side: results table and overlaid learning curves (HTML)."""
    from metalab.report.html import build_comparison

    if len(runs) < 2:
        raise ConfigError("Give at least two run folders to compare.")
    console.print(f"comparison: {build_comparison(runs, out)}")


@app.command()
def graph(
    run: Path = typer.Argument(..., help="Trained classification run folder."),
    split: str = typer.Option("test", help="Classes of this split: test, val or train."),
    k: int = typer.Option(5, help="Nearest classes per class."),
    out: Optional[Path] = typer.Option(None, help="Folder for graph.json / graph.graphml / graph.png (default RUN/graph)."),
) -> None:
    """Knowledge graph of classes and domains: nearest classes by prototype similarity, exported and scored."""
    from metalab.engine.eval_run import run_splits
    from metalab.engine.trainer import load_trained, refuse_regression_run
    from metalab.report.graph import build_graph, class_prototypes, draw_graph, export_graph, nearest_classes, score_neighbours

    config, algorithm, info = load_trained(run)
    refuse_regression_run(run, config)
    splits = run_splits(config, show_progress=True, example_shape=info["example_shape"])
    if split not in ("test", "val", "train"):
        raise ConfigError(f"--split '{split}' is unknown; use test, val or train.")
    source = splits.train if split == "train" else splits.require(split)
    protos = class_prototypes(algorithm, source)
    score = score_neighbours(nearest_classes(protos, k)[0], source.class_domains)
    folder = out or Path(run) / "graph"
    g = build_graph(source, protos, k)
    paths = [*export_graph(g, folder), draw_graph(g, folder / "graph.png")]
    console.print(f"{source.num_classes} classes, {source.num_domains} domains: {100 * score.same_domain_rate:.1f} % of "
                  f"nearest-class edges stay within a domain vs {100 * score.chance_rate:.1f} % by chance "
                  f"({score.lift:.1f}×); wrote {', '.join(str(p) for p in paths)}")


@app.command()
def serve(
    run: Path = typer.Option(..., "--run", help="Trained run folder (text, image or .npz arrays) to serve."),
    db: Optional[Path] = typer.Option(None, help="Registry file (default $METALAB_HOME/registry.sqlite, ~/.metalab/…)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free port, printed at start)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N."),
    rate_limit: float = typer.Option(_LIMITS.rate_limit, help="Requests/s per tenant (bursts of twice that); 0 turns the limit off."),
    max_body: int = typer.Option(_LIMITS.max_body, help="Largest request body in bytes (413 above, before it is read)."),
    auth_failures: float = typer.Option(_LIMITS.auth_failures, help=f"Failed authentications/s allowed per client address, after a burst of {_LIMITS.auth_burst} (429 above); 0 = off."),
    max_request_chars: int = typer.Option(_LIMITS.max_request_chars, help="Text characters one request may have encoded (413 above)."),
    max_request_pixels: int = typer.Option(_LIMITS.max_request_pixels, help="Image pixels one request may have decoded (413 above)."),
    max_labels: int = typer.Option(_LIMITS.max_labels, help="Labels per adapter, declared or carried by its examples (422 above)."),
    header_timeout: float = typer.Option(_LIMITS.header_timeout, help="Seconds a client has to send a request's headers (then disconnected)."),
    body_timeout: float = typer.Option(_LIMITS.body_timeout, help="Seconds a client has to send a request's body (then disconnected)."),
    max_connections: int = typer.Option(_LIMITS.max_connections, help="Open connections; one more is answered 503 and closed."),
) -> None:
    """Serve per-tenant few-shot adapters over HTTP (API + web page at /); keys: `metalab keys create`."""
    from metalab.serve import default_registry_path
    from metalab.serve.server import serve as run_server

    limits = _LIMITS.with_(max_body=max_body, rate_limit=rate_limit, auth_failures=auth_failures,
                    max_request_chars=max_request_chars, max_request_pixels=max_request_pixels, max_labels=max_labels,
                    header_timeout=header_timeout, body_timeout=body_timeout, max_connections=max_connections)
    run_server(run, db or default_registry_path(), host, port, device, limits,
               announce=lambda line: print(line, flush=True))


def _index_run(path) -> None:
    """Add the run to the registry's index of runs, or refresh it (rank 0 only). The run folder is
    the record: an index that cannot be written costs a note, never the run."""
    from metalab.store.runs import index_run_here

    why = index_run_here(path)
    if why is not None and not getattr(_index_run, "warned", False):  # once per command
        _index_run.warned = True
        err_console.print(f"note: the run was not added to the registry's index ({escape(why)}); the run folder is "
                          f"complete. To list it with `metalab runs`, set METALAB_HOME to a writable folder and run "
                          f"`metalab runs --scan {escape(str(Path(path).parent))}`.", highlight=False)


@app.command("runs")
def runs_(
    algo: Optional[str] = typer.Option(None, help="Only runs whose algorithm contains this text (e.g. maml)."),
    data: Optional[str] = typer.Option(None, help="Only runs whose data (or meta-RL task) contains this text."),
    scan: Optional[Path] = typer.Option(None, help="First add the run folders found under this folder (4 levels down at most)."),
    forget_missing: bool = typer.Option(False, "--forget-missing", help="Drop the runs whose folders are gone from the index (it never touches a folder)."),
    last: int = typer.Option(0, min=0, help="Only the N most recently written runs (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per run instead of the table."),
    db: Optional[Path] = typer.Option(None, help="Registry file (default $METALAB_HOME/registry.sqlite, ~/.metalab/…)."),
) -> None:
    """List the runs in the registry: algorithm, data, steps, status and test figures (newest first)."""
    import json

    from metalab.store import Registry, default_registry_path
    from metalab.store.runs import find_run_folders, forget_missing as forget, index_run, list_runs

    path = db or default_registry_path()
    if scan is not None:
        if not scan.is_dir():
            raise ConfigError(f"--scan '{scan}' is not a folder; pass the folder that holds your run folders (e.g. runs).")
        registry = Registry(path)
        found = find_run_folders(scan)
        for folder in found:
            index_run(registry, folder)
        err_console.print(f"indexed {len(found)} run folder{'s' * (len(found) != 1)} under {escape(str(scan))}", highlight=False)
    elif not Path(path).exists():
        err_console.print(f"no runs indexed yet in '{escape(str(path))}': `metalab train` adds each run it makes; "
                          "add older ones with `metalab runs --scan runs`.", highlight=False)
        return
    else:
        registry = Registry(path)
    if forget_missing:
        gone = forget(registry)
        err_console.print(f"dropped {len(gone)} run{'s' * (len(gone) != 1)} whose folders are gone", highlight=False)
    rows = list_runs(registry, algo, data)[:last or None]
    if as_json:
        for row in rows:
            print(json.dumps(row.as_dict()))
        return
    if not rows:
        console.print("no runs match" if algo or data else "no runs indexed")
        return
    from rich import box

    table = Table(title=f"runs in {path}", box=box.SIMPLE_HEAD)  # (fits 80 columns: figures stay on one line)
    for col in ("run", "algo", "data", "steps", "status", "test results"):
        table.add_column(col, overflow="fold", no_wrap=col == "test results")
    for row in rows:
        try:
            shown = str(Path(row.path).relative_to(Path.cwd()))
        except ValueError:
            shown = row.path
        results = "\n".join(row.results) or "-"
        if row.results and row.evaluated_step is not None and row.evaluated_step != row.steps:
            results += f" (at step {row.evaluated_step})"
        data = Path(row.data).name if os.sep in row.data else row.data  # a file or folder: its name (--json: the path)
        table.add_row(escape(shown), escape(row.algo), escape(data), f"{row.steps}/{row.steps_total}", escape(row.status),
                      escape(results))
    console.print(table)


keys_app = typer.Typer(no_args_is_help=True, help="API keys of the service's tenants (stored hashed in the registry).")
app.add_typer(keys_app, name="keys")


def _registry(db: Optional[Path], create: bool = False):
    """The registry at ``db`` (default: ``$METALAB_HOME/registry.sqlite``); only ``keys create`` makes a new one."""
    from metalab.serve import Registry, default_registry_path

    path = db or default_registry_path()
    if not create and not Path(path).exists():
        raise ConfigError(f"Registry '{path}' does not exist; create a key first with `metalab keys create TENANT"
                          f"{'' if db is None else f' --db {db}'}`, or pass the --db that `keys create` used.")
    return Registry(path)


@keys_app.command("create")
def keys_create(tenant: str = typer.Argument(..., help="Tenant name (created if new)."),
                db: Optional[Path] = typer.Option(None, help="Registry file (default $METALAB_HOME/registry.sqlite).")) -> None:
    """Create an API key for TENANT; it is printed once and only its hash is kept."""
    key = _registry(db, create=True).create_key(tenant)
    err_console.print(f"API key for tenant '{tenant}' (shown once; send it as 'Authorization: Bearer <key>'):")
    print(key)


@keys_app.command("list")
def keys_list(db: Optional[Path] = typer.Option(None, help="Registry file.")) -> None:
    """Tenants and their keys (first characters only)."""
    table = Table(title="API keys")
    for col in ("tenant", "key starts", "created", "revoked"):
        table.add_column(col)
    for k in _registry(db).list_keys():
        table.add_row(escape(k["tenant"]), k["prefix"] + "…", k["created"], k["revoked"] or "-")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(prefix: str = typer.Argument(..., help="The key, or its first 12 characters as `keys list` shows."),
                db: Optional[Path] = typer.Option(None, help="Registry file.")) -> None:
    """Revoke a key: requests with it get 401 from then on."""
    count = _registry(db).revoke_key(prefix)
    if not count:
        raise ConfigError(f"No live key starts with '{prefix[:12]}'; see `metalab keys list`.")
    console.print(f"revoked {count} key(s) starting with {prefix[:12]}")


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/demo-<time>)."),
    time_budget: float = typer.Option(420.0, help="Seconds of meta-training (the whole demo stays under 10 min on 2 CPU cores)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Meta-train a Prototypical Network on Omniglot's canonical split, then evaluate on unseen alphabets."""
    from metalab.demo import run_demo

    record = run_demo(out, time_budget, show_progress=progress, log=console.print)
    _index_run(record["run"])
    console.print(_results_table(record, "Prototypical Network, Omniglot meta-test alphabets (never trained on)"))
    console.print(f"run folder: {record['run']}")


def main() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer ≥ 0.2x returns Ctrl-C (130) and typer.Exit codes here
            if code == 130:
                err_console.print("aborted")
            sys.exit(code)
        distributed = sys.modules.get("metalab.engine.distributed")
        if distributed is None:  # the command never touched torch.distributed (--help, keys, …): nothing to close,
            return  # and importing it here would load torch for nothing (~3 s)
        distributed.shutdown()
        if distributed.launched_by_torchrun():
            # gloo's threads can abort the interpreter's teardown ("terminate called without an
            # active exception", 1 run in ~10 here); everything is written and the group is closed
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except MetalabError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)  # "[min, max]" is text, not markup
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # usage errors: click's classes (older typer) or typer's own copy of them (typer ≥ 0.2x)
        import click

        usage_errors = (click.exceptions.ClickException, *([typer.TyperException] if hasattr(typer, "TyperException") else []))
        if isinstance(exc, usage_errors) and hasattr(exc, "show"):
            exc.show()  # "Error: Missing parameter: adapter", not a traceback
            sys.exit(getattr(exc, "exit_code", 2))
        if isinstance(exc, (click.exceptions.Exit, typer.Exit)):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
