"""The short way in: ``metalab.train(config) -> Run``, ``Run.load(path)``, ``run.evaluate(...)``,
``run.adapt(examples, labels) -> Adapter`` with string labels in and out.

Everything here calls the same library pieces the CLI calls (:class:`~metalab.engine.MetaTrainer`,
:func:`~metalab.engine.evaluate`, :class:`~metalab.engine.adapter.Adapter`), so a run trained from a
notebook is the same run folder ``metalab train`` would write, and it is added to the index of runs
that ``metalab runs`` lists.

>>> import torch, metalab
>>> x, y = torch.rand(300, 16), torch.arange(30).repeat_interleave(10)      # your own tensors
>>> run = metalab.train({"train": {"algo": "protonet", "steps": 20, "ways": 5, "queries": 5}},
...                     data=metalab.from_arrays(x, y), out="runs/mine", progress=False)
>>> run.evaluate(ways=5, shots=1, episodes=100)                              # doctest: +SKIP
5-way 1-shot: ... ± ... % (100 episodes)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from metalab.data.source import LabelledSource
from metalab.data.splits import Splits, split_by_class
from metalab.engine.adapter import Adapter, default_threshold, run_encoder
from metalab.engine.config import RunConfig
from metalab.engine.evaluate import EvalResult, evaluate
from metalab.errors import ConfigError, DataError
from metalab.store.runs import index_run_here


class Run:
    """A trained run folder: its config, its algorithm with trained weights, and its class splits
    when they are known (trained in this process, or re-read from its data source on demand)."""

    def __init__(self, path: str | Path, config: RunConfig, algorithm, splits: Splits | None = None,
                 device: str = "cpu") -> None:
        self.path, self.config, self.algorithm, self.device = Path(path), config, algorithm, device
        self._splits = splits

    def __repr__(self) -> str:
        return f"Run('{self.path}', algo={self.config.train.algo!r}, data={self.config.data.source!r})"

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Run":
        """A run folder written by ``metalab train`` or :func:`train` (its newest good checkpoint)."""
        from metalab.engine.trainer import load_trained

        config, algorithm, info = load_trained(path, device)
        algorithm.eval()
        run = cls(path, config, algorithm, device=device)
        run._example_shape = info.get("example_shape")
        return run

    @property
    def splits(self) -> Splits:
        """The run's class-disjoint train / val / test splits (loaded from ``data.source`` on first use)."""
        if self._splits is None:
            if self.config.data.source.startswith("memory:"):
                raise DataError(f"Run '{self.path}' was trained on in-memory data; pass `source=` (a LabelledSource, "
                                "e.g. metalab.from_arrays(x, y)) to evaluate it.")
            from metalab.engine.eval_run import run_splits

            self._splits = run_splits(self.config, show_progress=False,
                                      example_shape=getattr(self, "_example_shape", None))
        return self._splits

    def evaluate(self, ways: int = 5, shots: int = 1, episodes: int = 600, queries: int | None = None,
                 source: LabelledSource | None = None, seed: int | None = None) -> EvalResult:
        """Mean accuracy ± 95 % CI over ``episodes`` ``ways``-way ``shots``-shot tasks of the test split
        (or of ``source``); ``queries`` per class default to the run's ``eval.queries`` or what the
        classes can fill."""
        source = source if source is not None else self.splits.require("test")
        if queries is None:
            queries = max(1, min(self.config.eval.queries, int(source.class_counts().min()) - shots))
        self.algorithm.eval()
        return evaluate(self.algorithm, source, ways, shots, queries, episodes,
                        seed=self.config.eval.seed if seed is None else seed, device=self.device, show_progress=False)

    def adapt(self, examples, labels: Sequence, head: str = "algorithm", threshold: float | None = None) -> Adapter:
        """An :class:`Adapter` for a new task from a few labelled examples: texts (text runs), an image
        tensor ``[M, C, H, W]`` (image runs) or an array ``[M, ...]`` (array runs), and one label per
        example (strings or integers; predictions name them)."""
        names, y = _label_ids(labels)
        if len(names) < 2:
            raise DataError("adapt() got examples of one label only; an adapter chooses between labels, so give at least two.")
        if threshold is None:
            threshold = default_threshold(self.path, head, len(names))
        if isinstance(examples, (list, tuple)) and examples and isinstance(examples[0], str):
            from metalab.models.text_encoder import encode_texts

            if len(examples) != len(y):
                raise DataError(f"adapt() got {len(examples)} texts but {len(y)} labels; give one label per text.")
            encoder = run_encoder(self.config)
            x = encode_texts(encoder, list(examples), progress=False)
            adapter = Adapter(self.path, x, y, names, head, threshold, self.device, loaded=(self.config, self.algorithm),
                              support_texts=list(examples))
            adapter._encoder = encoder
            return adapter
        x = torch.as_tensor(np.asarray(examples)) if not isinstance(examples, torch.Tensor) else examples
        if len(x) != len(y):
            raise DataError(f"adapt() got {len(x)} examples but {len(y)} labels; give one label per example.")
        return Adapter(self.path, x, y, names, head, threshold, self.device, loaded=(self.config, self.algorithm))


def _label_ids(labels: Sequence) -> tuple[list[str], torch.Tensor]:
    """Labels in order of first appearance → ``(names, ids [M])``."""
    names: dict[str, int] = {}
    ids = [names.setdefault(str(label), len(names)) for label in labels]
    return list(names), torch.tensor(ids, dtype=torch.long)


def _as_config(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, RunConfig):
        return config.to_dict()
    if isinstance(config, (str, Path)):
        from metalab.engine.config import read_config_file

        raw = read_config_file(Path(config))
        RunConfig.from_dict(raw, origin=str(config))  # errors name the file, before any default is added
        return raw
    if isinstance(config, dict):
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    raise ConfigError(f"train() takes a dict, a RunConfig or a YAML path as config; got {type(config).__name__}.")


def train(config=None, *, data: LabelledSource | None = None, out: str | Path | None = None,
          progress: bool = True, resume: bool = False) -> Run:
    """Meta-train ``config`` (a dict of ``data`` / ``train`` / ``eval`` sections, a :class:`RunConfig`
    or a YAML path) into the run folder ``out`` (default ``runs/<name>-<time>``) and return the
    :class:`Run`. ``data``: an in-memory source (:func:`metalab.from_arrays`) split by class at random
    with ``data.split_seed``, instead of ``data.source``. The run is added to the index of runs."""
    from metalab.engine.run import default_run_dir
    from metalab.engine.trainer import MetaTrainer

    if resume:
        if out is None:
            raise ConfigError("train(resume=True) needs out=, the run folder to continue.")
        from metalab.engine.run import RunFolder

        cfg = RunFolder.open(out).config()
    else:
        raw = _as_config(config)
        if data is not None:
            raw["data"] = {**(raw.get("data") or {}), "source": f"memory:{data.name}"}
        raw.setdefault("name", (raw.get("train") or {}).get("algo", "protonet"))
        cfg = RunConfig.from_dict(raw, origin="train()")
    splits = None
    if data is not None:
        if not isinstance(data, LabelledSource):
            raise ConfigError("train(data=...) takes a LabelledSource; build one with metalab.from_arrays(x, y).")
        d = cfg.data
        splits = split_by_class(data, d.val_fraction, d.test_fraction, d.split_seed)
    run_dir = Path(out) if out is not None else default_run_dir(cfg.name)
    trainer = MetaTrainer(cfg, run_dir, splits=splits, resume=resume, show_progress=progress,
                          log=(lambda line: print(line, file=sys.stderr)) if progress else (lambda *_: None))
    result = trainer.train()
    index_run_here(result.run_dir)  # (an index that cannot be written is no error: the folder is the record)
    trainer.algorithm.eval()
    return Run(result.run_dir, cfg, trainer.algorithm, trainer.splits, str(trainer.device))


