"""Run configuration: one YAML file per run, validated at the edge with errors that name the field."""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from metalab.engine.precision import check_precision
from metalab.errors import ConfigError


#: the largest config file read (a run's config.yaml is about 2 KB)
MAX_CONFIG_BYTES = 1_000_000


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: a few hundred bytes of nested aliases
    ("billion laughs") expand to gigabytes; a run config never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise ConfigError("uses a YAML alias (*name); write the values out instead")
        return super().compose_node(parent, index)


def read_yaml_text(text: str):
    """``text`` as YAML (safe types, no aliases: a :class:`ConfigError` ending "uses a YAML alias …")."""
    return yaml.load(text, Loader=_NoAliasLoader)


def read_config_file(path: Path) -> dict:
    """The mapping in a YAML config file, or a :class:`ConfigError` naming the file and the fix
    (too large, not UTF-8, not YAML, aliases)."""
    path = Path(path)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"Config file '{path}' is over {MAX_CONFIG_BYTES // 1000} KB; a run config is a few KB of YAML.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    try:
        return read_yaml_text(text) or {}
    except ConfigError as exc:
        raise ConfigError(f"Config file '{path}' {exc}.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML ({exc.__class__.__name__}); fix its syntax.") from None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class DataConfig:
    source: str = "omniglot"  #: 'omniglot', 'clinc150', 'sinusoid', an image folder 'root/<class>/*.png', an '.npz' with x, y, or a text .csv/.jsonl
    image_size: int = 28
    channels: int | None = None  #: image folders: 1 (grayscale) or 3 (RGB); None: 3 when the images are in colour, else 1
    val_fraction: float = 0.1  #: share of meta-train classes carved out for validation
    test_fraction: float = 0.2  #: share of classes held out for meta-test (sources without a canonical split)
    split_seed: int = 0
    rotations: bool | None = None  #: add 90/180/270° rotations of meta-train classes as new classes; None: on for Omniglot only
    augment: bool = False  #: small random affine jitter of meta-train images
    augment_strength: float = 1.0  #: scales the jitter: 1 is up to ±10° rotation, ±10 % scale and ±10 % shift
    # text sources ('clinc150', a .csv / .tsv / .jsonl file of text,label[,domain])
    encoder: str = "minilm"  #: 'minilm' (bundled all-MiniLM-L6-v2, offline) or a sentence-transformers folder
    encoder_layers: list | None = field(default_factory=lambda: [4, 5, 6])  #: mean-pooled layers, concatenated; None: the model's own pooling
    text_column: str = "text"
    label_column: str = "label"
    domain_column: str = "domain"
    test_domains: list | None = None  #: text: hold out these domains for meta-test (None: clinc150's default, else a class split; []: none, every class meta-trains)
    text_parts: list | None = None  #: text: keep only the examples of these parts of the file, e.g. ['train'] (None: all)


@dataclass
class TrainConfig:
    algo: str = "protonet"
    algo_options: dict = field(default_factory=dict)
    backbone: str = "auto"  #: conv4, mlp, linear, identity; auto: conv4 for images, diagonal for embeddings (text), mlp otherwise
    hidden: int = 64
    ways: int | list = 5  #: an int, or [min, max] drawn per meta-batch
    shots: int | list = 1
    queries: int = 15
    meta_batch: int = 1  #: tasks per meta-batch
    steps: int = 1000
    lr: float = 1e-3
    schedule: str = "cosine"  #: 'cosine' (to 0 over `steps`, after a 5 % warm-up) or 'constant'
    time_budget: float | None = None  #: seconds; stop early (with a checkpoint) once spent
    budget_clock: str = "wall"  #: 'wall' (elapsed time) or 'cpu' (this process's CPU time: fair budgets on a shared machine)
    anneal_by: str = "steps"  #: 'steps': the schedule follows step / steps, a time budget only stops the run; 'time': it anneals over whichever runs out first, steps or time_budget (budget-bound runs)
    val_every: int = 250
    val_episodes: int = 200
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  #: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
    precision: str = "fp32"  #: 'fp32', or 'bf16': bfloat16 mixed precision for the training step (weights, optimiser, eval stay fp32)
    task_threads: int | str = "auto"  #: per-task training loops on CPU: 'auto' (one task per core, side by side) or a number of threads (1: one task after another)
    memory_format: str = "auto"  #: conv4 layout: 'auto' (channels-last on CPU: faster), 'channels_last', or 'contiguous' (NCHW: tighter fp32 gradients on CPU)
    tune_encoder: int | str | None = None  #: text: meta-train the sentence encoder's top N transformer layers ('all': every one) under the algorithm's head; None: the encoder stays frozen
    tune_params: str = "all"  #: with tune_encoder: 'all' parameters of the tuned layers, or 'norm-bias' (LayerNorm and biases only)
    init_from: str | None = None  #: a run folder whose backbone weights start this run (its newest good checkpoint), e.g. a ProtoNet run under MAML
    planner: str = "uniform"  #: task planner: uniform, domain-balanced, curriculum (easy → hard), hard (hard-task mining)
    planner_every: int = 10  #: feed the planner the learner's errors every this many steps
    planner_refresh: int = 250  #: hard mining: recompute each class's nearest classes every this many steps
    planner_neighbours: int = 10  #: hard mining: nearest classes kept per class


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass
class EvalConfig:
    episodes: int = 600
    settings: list = field(default_factory=lambda: [[5, 1], [5, 5], [20, 1], [20, 5]])  #: [ways, shots] pairs
    queries: int = 15
    seed: int = 2024
    tasks_per_batch: int = 50
    adapt_steps: list | None = None  #: regression: evaluate after each of these numbers of adaptation steps
    full_task_shots: list = field(default_factory=lambda: [1, 5])  #: text: all meta-test classes at once, at these shots
    full_task_draws: int = 10  #: text: random support draws per full task


@dataclass
class RLConfig:
    """Meta-reinforcement learning (``task`` set): the task family and the policy-gradient inner loop."""
    task: str | None = None  #: 'nav2d' (2D navigation to a per-task goal) or 'bandit' (multi-armed bandits); None: not an RL run
    horizon: int | None = None  #: steps per episode (default: 100 for nav2d, 10 pulls for bandit)
    episodes: int = 20  #: episodes per task per adaptation step (the inner loop's batch)
    inner_lr: float | None = None  #: policy-gradient step size of adaptation (training and test); None: 0.1 nav2d, 10 bandit
    inner_steps: int = 1  #: adaptation steps in meta-training (Reptile: steps before the outer move)
    gamma: float = 0.99
    arms: int = 5  #: bandit: arms (arm 0 safe, one good arm per task)
    hidden: list | None = None  #: policy MLP widths; None: [100, 100] for nav2d, [] (a linear policy) for bandit
    test_tasks: int = 200  #: evaluation tasks (fresh, seeded by eval.seed)
    eval_steps: int = 3  #: evaluate returns after 0..eval_steps adaptation steps
    grad_clip: float = 1.0  #: outer gradient norm clip


RL_ALGOS = ("maml-rl", "fomaml-rl", "reptile-rl", "pretrained-rl")


@dataclass
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, raw: dict, origin: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin} must be a mapping with sections data/train/eval; got {type(raw).__name__}.")
        sections = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "rl": RLConfig}
        unknown = sorted(set(raw) - set(sections) - {"name"})
        if unknown:
            raise ConfigError(f"{origin}: unknown section(s) {unknown}; allowed: name, data, train, eval, rl.")
        raw = _with_regression_defaults(raw)
        built = {name: _build(klass, raw.get(name) or {}, f"{origin}: {name}") for name, klass in sections.items()}
        cfg = cls(name=str(raw.get("name", "run")), **built)
        cfg.validate()
        #: the fields the user wrote (``train.queries``, …): the others are defaults, which
        #: :func:`metalab.engine.small_data.fit_defaults` may scale down to what small data can fill
        cfg.given = {f"{name}.{key}" for name in sections if isinstance(raw.get(name), dict) for key in raw[name]}
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"Config file '{path}' does not exist; pass the path of a YAML config.")
        if path.is_dir():
            raise ConfigError(f"Config path '{path}' is a folder; pass a YAML config file (a run's own is RUN/config.yaml).")
        return cls.from_dict(read_config_file(path), origin=str(path))

    def validate(self) -> None:
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ConfigError(f"name={self.name!r} is invalid; a run name becomes a folder under runs/, so give one "
                              "without '/', '\\' or '..' (e.g. 'maml-omniglot').")
        t, e = self.train, self.eval
        positive = {
            "train.steps": t.steps, "train.queries": t.queries, "train.meta_batch": t.meta_batch,
            "train.val_every": t.val_every, "train.checkpoint_every": t.checkpoint_every,
            "train.log_every": t.log_every, "train.keep_checkpoints": t.keep_checkpoints,
            "eval.episodes": e.episodes, "eval.queries": e.queries, "eval.tasks_per_batch": e.tasks_per_batch,
            "data.image_size": self.data.image_size, "train.hidden": t.hidden, "train.planner_every": t.planner_every,
            "train.planner_refresh": t.planner_refresh, "train.planner_neighbours": t.planner_neighbours,
        }
        for key, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}={value!r} is invalid; it must be a positive integer.")
        for key, value in {"train.ways": t.ways, "train.shots": t.shots}.items():
            if not (_positive_int(value) or (isinstance(value, (list, tuple)) and len(value) == 2
                                             and all(map(_positive_int, value)) and value[0] <= value[1])):
                raise ConfigError(f"{key}={value!r} is invalid; give a positive integer or a [min, max] pair with min <= max.")
        if self.data.channels not in (None, 1, 3) or isinstance(self.data.channels, bool):
            raise ConfigError(f"data.channels={self.data.channels!r} is invalid; use 1 (grayscale), 3 (RGB) or leave it empty "
                              "(decided from the images).")
        d = self.data
        if not 0 < d.augment_strength <= 5:
            raise ConfigError(f"data.augment_strength={d.augment_strength} is invalid; give a number above 0 and at most 5 "
                              "(1: up to ±10° rotation, ±10 % scale and shift).")
        if not (0 <= d.val_fraction < 1 and 0 < d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1):
            raise ConfigError(f"data.val_fraction={d.val_fraction} and data.test_fraction={d.test_fraction} are invalid; "
                              "give shares of the classes: val in [0, 1), test in (0, 1), together under 1.")
        if not t.lr > 0:
            raise ConfigError(f"train.lr={t.lr!r} is invalid; it must be a positive number.")
        from metalab.data.planner import PLANNERS

        if t.planner not in PLANNERS:
            raise ConfigError(f"train.planner='{t.planner}' is unknown; use one of: {', '.join(PLANNERS)}.")
        from metalab.data.catalog import is_task_family

        if t.planner != "uniform" and is_task_family(d.source):
            raise ConfigError(f"train.planner='{t.planner}' chooses classes and domains, which '{d.source}' tasks do not "
                              "have (each is a fresh function); drop --planner.")
        if t.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule='{t.schedule}' is unknown; use 'cosine' or 'constant'.")
        if t.budget_clock not in ("wall", "cpu"):
            raise ConfigError(f"train.budget_clock='{t.budget_clock}' is unknown; use 'wall' or 'cpu'.")
        if t.anneal_by not in ("steps", "time"):
            raise ConfigError(f"train.anneal_by='{t.anneal_by}' is unknown; use 'steps' (the schedule follows the steps) or "
                              "'time' (it follows whichever runs out first, steps or train.time_budget).")
        if t.anneal_by == "time" and t.time_budget is None:
            raise ConfigError("train.anneal_by='time' anneals over train.time_budget, which is not set; set the budget "
                              "or use anneal_by 'steps'.")
        check_precision(t.precision)
        if not (t.task_threads == "auto" or (type(t.task_threads) is int and t.task_threads >= 1)):
            raise ConfigError(f"train.task_threads={t.task_threads!r} is invalid; use 'auto' (one task per CPU core) "
                              "or a whole number >= 1 (1: tasks one after another).")
        if t.memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"train.memory_format='{t.memory_format}' is unknown; use one of: {', '.join(MEMORY_FORMATS)}.")
        if t.init_from is not None and not (isinstance(t.init_from, str) and t.init_from.strip()):
            raise ConfigError(f"train.init_from={t.init_from!r} is invalid; give the path of a run folder or leave it empty.")
        if t.time_budget is not None and not t.time_budget > 0:
            raise ConfigError(f"train.time_budget={t.time_budget!r} is invalid; give seconds > 0 or leave it empty.")
        self._validate_rl()
        self._validate_tune_encoder()
        for pair in e.settings:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair)):
                raise ConfigError(f"eval.settings entry {pair!r} is invalid; give [ways, shots] pairs of positive integers.")
        self._validate_per_class_head()

    def _validate_per_class_head(self) -> None:
        """MAML's ``head: per-class`` has ``head_ways`` rows: every training and evaluation task must
        have that many ways (caught here, not after training)."""
        t = self.train
        options = t.algo_options or {}
        if t.algo not in ("maml", "fomaml") or options.get("head") != "per-class":
            return  # (other algorithms refuse the option when they are built)
        head_ways = options.get("head_ways", 5)
        train_ways = t.ways if isinstance(t.ways, list) else [t.ways]
        if any(w != head_ways for w in train_ways):
            raise ConfigError(f"train.ways={t.ways!r} does not fit train.algo_options.head='per-class' with "
                              f"head_ways={head_ways}; train at {head_ways} ways, set head_ways, or use head 'row'.")
        wrong = [pair for pair in self.eval.settings if pair[0] != head_ways]
        if wrong:
            raise ConfigError(f"eval.settings {wrong} have other than {head_ways} ways, which a per-class MAML head "
                              f"(train.algo_options.head_ways={head_ways}) cannot adapt to; evaluate at {head_ways} ways "
                              "(e.g. --set 'eval.settings=[[5, 1], [5, 5]]') or use head 'row'.")


    def _validate_tune_encoder(self) -> None:
        t, d = self.train, self.data
        if d.text_parts is not None and not (isinstance(d.text_parts, list) and d.text_parts
                                             and all(isinstance(p, str) for p in d.text_parts)):
            raise ConfigError(f"data.text_parts={d.text_parts!r} is invalid; give a list of parts such as ['train'], or leave it empty.")
        if t.tune_params not in ("all", "norm-bias"):
            raise ConfigError(f"train.tune_params='{t.tune_params}' is unknown; use 'all' or 'norm-bias'.")
        if t.tune_encoder is None:
            return
        tune = t.tune_encoder
        if isinstance(tune, str) and tune.isdigit():
            t.tune_encoder = tune = int(tune)
        if not (tune == "all" or (type(tune) is int and tune >= 1)):
            raise ConfigError(f"train.tune_encoder={tune!r} is invalid; give a number of top transformer layers (e.g. 2) or 'all'.")
        from metalab.algorithms import algorithm_spec
        from metalab.data.text import is_text_spec

        if not is_text_spec(d.source):
            raise ConfigError(f"train.tune_encoder meta-trains a sentence encoder, and data.source='{d.source}' is not text; "
                              "drop --tune-encoder or train on a text source.")
        if not getattr(algorithm_spec(t.algo).cls, "frozen_features", False):
            raise ConfigError(f"train.tune_encoder trains the encoder under a head on its features, which '{t.algo}' does not "
                              "have; use --algo protonet, r2d2 or matchingnet.")
        if t.backbone not in ("auto", "identity"):
            raise ConfigError(f"train.tune_encoder trains the encoder itself, so train.backbone='{t.backbone}' has no place; "
                              "leave it at 'auto'.")
        if t.init_from is not None:
            raise ConfigError("train.init_from copies a backbone, and a tuned-encoder run starts from the base encoder; drop one of them.")

    def _validate_rl(self) -> None:
        r, algo = self.rl, self.train.algo
        if r.task is None:
            if algo in RL_ALGOS:
                raise ConfigError(f"train.algo='{algo}' is a meta-RL learner; give a task family (--task nav2d or bandit).")
            return
        if r.task not in ("nav2d", "bandit"):
            raise ConfigError(f"rl.task='{r.task}' is unknown; use 'nav2d' (2D navigation) or 'bandit' (multi-armed bandits).")
        if algo not in RL_ALGOS:
            raise ConfigError(f"train.algo='{algo}' does not learn policies; with rl.task use one of: {', '.join(RL_ALGOS)}.")
        if self.train.precision != "fp32":
            raise ConfigError(f"train.precision='{self.train.precision}' applies to few-shot meta-training; "
                              "meta-RL runs in fp32, so drop --precision.")
        for key in ("episodes", "inner_steps", "test_tasks", "arms"):
            value = getattr(r, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"rl.{key}={value!r} is invalid; it must be a positive integer.")
        if r.horizon is not None and (not isinstance(r.horizon, int) or r.horizon < 1):
            raise ConfigError(f"rl.horizon={r.horizon!r} is invalid; give a positive number of steps or leave it empty.")
        if not isinstance(r.eval_steps, int) or r.eval_steps < 0:
            raise ConfigError(f"rl.eval_steps={r.eval_steps!r} is invalid; give 0 or more adaptation steps.")
        if not ((r.inner_lr is None or r.inner_lr > 0) and 0 < r.gamma <= 1 and r.grad_clip > 0):
            raise ConfigError("rl.inner_lr and rl.grad_clip must be > 0 and rl.gamma in (0, 1].")
        if r.hidden is not None and not all(isinstance(h, int) and h > 0 for h in r.hidden):
            raise ConfigError(f"rl.hidden={r.hidden!r} is invalid; give a list of positive layer widths (or [] for linear).")


#: a regression task family's defaults where the config leaves the field out (the MAML paper's
#: sinusoid set-up: K = 10 points per task in training, K = 5 and 10 at test); the classification
#: defaults (1 shot; 5- and 20-way settings, which are one output for regression) do not fit it
REGRESSION_DEFAULTS = {"train": {"shots": 10}, "eval": {"settings": [[1, 5], [1, 10]]}}


def _with_regression_defaults(raw: dict) -> dict:
    from metalab.data.catalog import is_task_family

    data = raw.get("data")
    source = data.get("source") if isinstance(data, dict) else None
    if not isinstance(source, str) or not is_task_family(source):
        return raw
    raw = dict(raw)
    for section, defaults in REGRESSION_DEFAULTS.items():
        given = raw.get(section) or {}
        if isinstance(given, dict):
            raw[section] = {**defaults, **given}
    return raw


def _build(klass, raw: dict, origin: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin} must be a mapping; got {type(raw).__name__}.")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{origin}: unknown field(s) {unknown}; allowed: {sorted(names)}.")
    hints = typing.get_type_hints(klass)
    return klass(**{name: _typed(value, hints[name], f"{origin}.{name}") for name, value in raw.items()})


_DESCRIBED = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list",
              dict: "a mapping", type(None): "null"}


def _typed(value, hint, where: str):
    """``value`` if it has a type ``hint`` allows; a number written as a string for a float field
    (YAML 1.1 reads ``1e-3`` as a string) becomes the float; otherwise an error naming the field."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):  # a numpy scalar: YAML can't save it
        value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if any(_is(value, t) for t in allowed):
        return value
    if float in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    wanted = " or ".join(_DESCRIBED.get(t, getattr(t, "__name__", str(t))) for t in allowed)
    raise ConfigError(f"{where}={value!r} is invalid; give {wanted}.")


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):  # a bool is not a number here; an int is a float
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind) if isinstance(kind, type) else True
