"""Run configuration: one YAML file per run, validated at the edge with errors that name the field."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from metalab.errors import ConfigError


@dataclass
class DataConfig:
    source: str = "omniglot"  #: 'omniglot', 'clinc150', 'sinusoid', an image folder 'root/<class>/*.png', an '.npz' with x, y, or a text .csv/.jsonl
    image_size: int = 28
    val_fraction: float = 0.1  #: share of meta-train classes carved out for validation
    test_fraction: float = 0.2  #: share of classes held out for meta-test (sources without a canonical split)
    split_seed: int = 0
    rotations: bool | None = None  #: add 90/180/270° rotations of meta-train classes as new classes; None: on for Omniglot only
    augment: bool = False  #: small random affine jitter of meta-train images
    # text sources ('clinc150', a .csv / .tsv / .jsonl file of text,label[,domain])
    encoder: str = "minilm"  #: 'minilm' (bundled all-MiniLM-L6-v2, offline) or a sentence-transformers folder
    encoder_layers: list | None = field(default_factory=lambda: [4, 5, 6])  #: mean-pooled layers, concatenated; None: the model's own pooling
    text_column: str = "text"
    label_column: str = "label"
    domain_column: str = "domain"
    test_domains: list | None = None  #: text: hold out these domains for meta-test (None: clinc150's default, else a class split)


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
    val_every: int = 250
    val_episodes: int = 200
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  #: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...


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
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, raw: dict, origin: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin} must be a mapping with sections data/train/eval; got {type(raw).__name__}.")
        sections = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
        unknown = sorted(set(raw) - set(sections) - {"name"})
        if unknown:
            raise ConfigError(f"{origin}: unknown section(s) {unknown}; allowed: name, data, train, eval.")
        built = {name: _build(klass, raw.get(name) or {}, f"{origin}: {name}") for name, klass in sections.items()}
        cfg = cls(name=str(raw.get("name", "run")), **built)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"Config file '{path}' does not exist; pass the path of a YAML config.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file '{path}' is not valid YAML ({exc.__class__.__name__}); fix its syntax.") from None
        return cls.from_dict(raw, origin=str(path))

    def validate(self) -> None:
        t, e = self.train, self.eval
        positive = {
            "train.steps": t.steps, "train.queries": t.queries, "train.meta_batch": t.meta_batch,
            "train.val_every": t.val_every, "train.checkpoint_every": t.checkpoint_every,
            "train.log_every": t.log_every, "train.keep_checkpoints": t.keep_checkpoints,
            "eval.episodes": e.episodes, "eval.queries": e.queries, "eval.tasks_per_batch": e.tasks_per_batch,
            "data.image_size": self.data.image_size, "train.hidden": t.hidden,
        }
        for key, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}={value!r} is invalid; it must be a positive integer.")
        if not t.lr > 0:
            raise ConfigError(f"train.lr={t.lr!r} is invalid; it must be a positive number.")
        if t.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule='{t.schedule}' is unknown; use 'cosine' or 'constant'.")
        if t.budget_clock not in ("wall", "cpu"):
            raise ConfigError(f"train.budget_clock='{t.budget_clock}' is unknown; use 'wall' or 'cpu'.")
        if t.time_budget is not None and not t.time_budget > 0:
            raise ConfigError(f"train.time_budget={t.time_budget!r} is invalid; give seconds > 0 or leave it empty.")
        for pair in e.settings:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair)):
                raise ConfigError(f"eval.settings entry {pair!r} is invalid; give [ways, shots] pairs of positive integers.")


def _build(klass, raw: dict, origin: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin} must be a mapping; got {type(raw).__name__}.")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{origin}: unknown field(s) {unknown}; allowed: {sorted(names)}.")
    return klass(**raw)
