"""Adapters: a trained run adapted to a user's few labelled examples, saved, and used to predict.

An adapter file (safetensors) stores the support examples as the run sees them (sentence
embeddings for text, images for image runs), their labels and names, which head to fit and the
out-of-scope threshold. Loading it re-runs ``adapt`` on the stored support (milliseconds), so an
adapter works for every algorithm — prototypes, fitted heads, MAML's adapted weights — and two
loads give identical predictions.

Text adapters may also keep the support *texts* and add a lexical classifier's log-probabilities
(TF-IDF n-grams fitted on those texts, :mod:`metalab.models.text_lexical`) with a small weight;
the out-of-scope test stays on the head's own top logit.

A text adapter may carry its own encoder: the run's encoder fine-tuned on the support
(:func:`metalab.models.text_finetune.finetune_encoder`, the heavier transfer route). Its weights
are stored in the adapter file (``encoder.*`` tensors, about 90 MB for MiniLM) and it embeds
both the support and every input; its embeddings skip the shared disk cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from metalab.algorithms.frozen_heads import HEADS, fit_head
from metalab.data.cache import load_tensors, save_tensors_atomic
from metalab.data.catalog import is_array_spec, text_options
from metalab.data.text import is_text_spec, label_name_texts, load_text_table
from metalab.engine.text_eval import confidence
from metalab.engine.trainer import load_trained, refuse_regression_run, refuse_rl_run
from metalab.errors import CheckpointError, ConfigError, DataError

HEAD_CHOICES = ("algorithm", *HEADS)


@dataclass
class Prediction:
    label: str
    scores: dict[str, float]  #: softmax probability per label
    out_of_scope: bool | None  #: top logit under the threshold; None when the adapter has no threshold


class Adapter:
    """A run + support set → predictions for new inputs (texts or image tensors)."""

    def __init__(self, run_dir: str | Path, support_x: torch.Tensor, support_y: torch.Tensor, labels: list[str],
                 head: str = "algorithm", threshold: float | None = None, device: str = "cpu",
                 loaded: tuple | None = None, support_texts: Sequence[str] | None = None,
                 lexical_weight: float = 0.0, tuned_encoder=None, tuned_state: dict | None = None,
                 tuned_id: str | None = None, ink_inverted: bool | None = None) -> None:
        """``loaded``: the run's ``(config, algorithm)`` already in memory (a server holding many adapters).
        ``lexical_weight`` > 0 (text runs, with ``support_texts``, one per support example) adds
        that weight times a lexical classifier's log-probabilities to the head's.
        ``tuned_encoder``: the run's encoder fine-tuned on this support, which embedded
        ``support_x`` and embeds the inputs (or ``tuned_state``, its weights, and ``tuned_id``,
        its model id, as an adapter file stores them). ``ink_inverted``: whether the grayscale support
        folder's light pages were inverted; image files read for prediction follow the same decision
        (``None``: each image judged by its own page)."""
        if head not in HEAD_CHOICES:
            raise ConfigError(f"Unknown head '{head}'; choose one of: {', '.join(HEAD_CHOICES)}.")
        if not lexical_weight >= 0:
            raise ConfigError(f"The lexical weight must be 0 or more; got {lexical_weight}.")
        self.run_dir, self.head, self.threshold, self.labels = Path(run_dir), head, threshold, list(labels)
        self.support_x, self.support_y, self.ink_inverted = support_x, support_y, ink_inverted
        if loaded is None:
            self.config, self.algorithm, info = load_trained(run_dir, device)
        else:  # (the callers that pass a loaded run check their inputs themselves)
            (self.config, self.algorithm), info = loaded, None
        refuse_regression_run(self.run_dir, self.config)
        self.algorithm.eval()
        self.device = torch.device(device)
        self.text = is_text_spec(self.config.data.source)
        self.arrays = is_array_spec(self.config.data.source)
        if self.arrays and info is not None:
            check_array_dtype("The support", support_x.dtype, run_example_dtype(self.config, info), f"run '{run_dir}'")
        self._encoder = None
        self._scorer = self._fit()
        self.support_texts = list(support_texts) if support_texts is not None else None
        self.lexical_weight, self._lexical = float(lexical_weight), None
        if self.lexical_weight > 0:
            if not self.text:
                raise ConfigError("A lexical weight applies to text runs only; leave it at 0 for image runs.")
            if self.support_texts is None or len(self.support_texts) != len(support_y):
                raise ConfigError("A lexical weight needs the support texts, one per support example; "
                                  "create the adapter from a text file with `metalab adapt`.")
            from metalab.models.text_lexical import LexicalClassifier

            self._lexical = LexicalClassifier().fit(self.support_texts, support_y, len(self.labels))
        if (tuned_encoder is not None or tuned_state is not None) and not self.text:
            raise ConfigError("A fine-tuned encoder applies to text runs only; this run is an image run.")
        if tuned_state is not None:
            tuned_encoder = self._restore_encoder(tuned_state, tuned_id)
        self.tuned_encoder = tuned_encoder
        if tuned_encoder is not None:
            self._encoder = tuned_encoder

    def _restore_encoder(self, state: dict, model_id: str | None):
        """The run's encoder with the fine-tuned weights an adapter file stores."""
        encoder = run_encoder(self.config)
        try:
            encoder.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"The adapter's fine-tuned encoder does not fit run '{self.run_dir}''s encoder "
                                  f"({str(exc).splitlines()[0]}); adapt again with `metalab adapt`.") from None
        encoder.model.eval()
        encoder.model_id = model_id or f"{encoder.model_id}-finetuned"
        return encoder

    def _fit(self):
        params = self.algorithm.params()
        sx, sy = self.support_x.to(self.device), self.support_y.to(self.device)
        if self.head == "algorithm":
            return self.algorithm.adapt(params, self._prepare(sx), sy, len(self.labels)).logits
        with torch.no_grad():
            fitted = fit_head(self.head, self.algorithm.encode(params, self._prepare(sx)).cpu(), sy.cpu(), len(self.labels))
        return lambda x: fitted.scores(self.algorithm.encode(params, x).cpu())

    @staticmethod
    def _prepare(x: torch.Tensor) -> torch.Tensor:
        return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()

    def encoder(self):
        if self._encoder is None:
            self._encoder = run_encoder(self.config)
        return self._encoder

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → the run's input features (cached sentence embeddings)."""
        if self.tuned_encoder is not None:  # its own weights: nothing to share through the disk cache
            return self.tuned_encoder.encode(list(texts))
        from metalab.models.text_encoder import encode_texts

        return encode_texts(self.encoder(), list(texts), progress=False)

    @torch.no_grad()
    def predict_inputs(self, x: torch.Tensor, texts: Sequence[str] | None = None) -> list[Prediction]:
        """Already-encoded inputs ``[B, ...]`` (embeddings, or images) → one prediction each.
        ``texts`` (the ``B`` texts behind ``x``) are required by an adapter with a lexical weight."""
        if self._lexical is not None and (texts is None or len(texts) != len(x)):
            raise ConfigError("This adapter has a lexical weight: pass the texts behind the embeddings, "
                              "predict_inputs(x, texts), or call predict(texts).")
        logits = self._scorer(self._prepare(x.to(self.device))).cpu()
        if self._lexical is not None:
            from metalab.models.text_lexical import combine_log_probs

            probs = combine_log_probs(logits.log_softmax(-1), self._lexical.log_probs(texts), self.lexical_weight).softmax(-1)
        else:
            probs = logits.softmax(-1)
        out = []
        for row, top in zip(probs, confidence(logits)):
            best = int(row.argmax())
            oos = None if self.threshold is None else bool(top < self.threshold)
            out.append(Prediction(self.labels[best], {l: round(float(p), 6) for l, p in zip(self.labels, row)}, oos))
        return out

    def predict(self, inputs: Sequence[str] | Sequence[Path] | torch.Tensor) -> list[Prediction]:
        """Texts (text runs); image files or an image tensor ``[B, C, H, W]`` (image runs); ``.npz``
        files of rows ``x`` or a tensor ``[B, ...]`` (array runs) → predictions. A single string or
        path is one input."""
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        if len(inputs) == 0:
            return []
        if self.text:
            if isinstance(inputs, torch.Tensor):
                raise DataError("This adapter belongs to a text run; pass strings.")
            blank = next((i for i, t in enumerate(inputs) if not str(t).strip()), None)
            if blank is not None:
                raise DataError(f"Text {blank + 1} of {len(inputs)} is blank; pass texts with words to label.")
            return self.predict_inputs(self.embed(inputs), list(inputs))
        if not isinstance(inputs, torch.Tensor):
            inputs = self.read_arrays(inputs)[0] if self.arrays else self.read_images(inputs)
        return self.predict_inputs(torch.as_tensor(inputs))

    def read_arrays(self, paths: Sequence[str | Path]) -> tuple[torch.Tensor, list[str]]:
        """``.npz`` files with an array ``x [B, ...]`` each (an array run) → their rows stacked, and a
        name per row (``file.npz[i]``)."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        shape, rows, names = list(self.support_x.shape[1:]), [], []
        for path in map(Path, paths):
            if not (is_array_spec(path) and path.is_file()):
                raise DataError(f"Input '{path}' must be an existing .npz file with an array x for this array adapter.")
            try:
                with np.load(path, allow_pickle=False) as data:
                    x = data["x"] if "x" in data else None
            except (OSError, ValueError) as exc:
                raise DataError(f"'{path}' cannot be read as an .npz archive ({exc.__class__.__name__}); save it with numpy.savez.") from None
            if x is None:
                raise DataError(f"'{path}' has no array 'x'; save the examples to label as x=[B, {', '.join(map(str, shape))}].")
            if list(x.shape[1:]) != shape:
                raise DataError(f"'{path}' has examples of shape {list(x.shape[1:])}; this adapter's are {shape}.")
            check_array_dtype(f"'{path}'", x.dtype, str(self.support_x.dtype).removeprefix("torch."), "this adapter's support")
            rows.append(torch.as_tensor(x))
            names += [f"{path.name}[{i}]" for i in range(len(x))]
        return (torch.cat(rows) if rows else self.support_x[:0]), names

    def read_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Image files → ``uint8 [B, C, H, W]`` at the support images' size and channels, prepared as
        `metalab adapt` prepared the support folder (grayscale ink-high)."""
        from metalab.data.folders import read_image_file

        if isinstance(paths, (str, Path)):
            paths = [paths]
        channels, size = int(self.support_x.shape[1]), int(self.support_x.shape[-1])
        if len(paths) == 0:
            return torch.zeros(0, channels, size, size, dtype=torch.uint8)
        return torch.from_numpy(np.stack([read_image_file(p, size, channels, self.ink_inverted) for p in paths]))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {"format": "metalab-adapter/1", "run": str(self.run_dir.resolve()), "labels": self.labels,
                "head": self.head, "threshold": self.threshold, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "modality": "text" if self.text else "array" if self.arrays else "image"}
        if self._lexical is not None:
            meta.update(support_texts=self.support_texts, lexical_weight=self.lexical_weight)
        if self.ink_inverted is not None:
            meta["ink_inverted"] = self.ink_inverted
        tensors = {"support_x": self.support_x.contiguous(), "support_y": self.support_y}
        if self.tuned_encoder is not None:
            meta["encoder"] = {"model_id": self.tuned_encoder.model_id, "finetuned": True}
            tensors.update({f"encoder.{k}": v.detach().cpu().clone() for k, v in self.tuned_encoder.model.state_dict().items()})
        save_tensors_atomic(path, tensors, meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Adapter":
        path = Path(path)
        if not path.exists():
            raise DataError(f"Adapter file '{path}' does not exist; create one with `metalab adapt`.")
        if path.is_dir():
            raise DataError(f"'{path}' is a folder, not an adapter file; pass the .safetensors file that "
                            "`metalab adapt --out` wrote.")
        loaded = load_tensors(path)
        if loaded is None:
            raise CheckpointError(f"Adapter file '{path}' is damaged or not an adapter; create it again with `metalab adapt`.")
        tensors, meta = loaded
        if meta.get("format") != "metalab-adapter/1":
            raise CheckpointError(f"File '{path}' is not a metalab adapter (format {meta.get('format')!r}).")
        tuned = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
        return cls(meta["run"], tensors["support_x"], tensors["support_y"], meta["labels"], meta["head"],
                   meta["threshold"], device, support_texts=meta.get("support_texts"),
                   lexical_weight=meta.get("lexical_weight", 0.0), tuned_state=tuned or None,
                   tuned_id=meta.get("encoder", {}).get("model_id"), ink_inverted=meta.get("ink_inverted"))


def resolve_text_route(run_dir, support, head: str, names_as_examples: bool | None, text_column: str = "text",
                       label_column: str = "label") -> tuple[str, bool]:
    """``(head, names_as_examples)`` for ``head='auto'`` / ``names_as_examples=None``: for a text
    run, logistic regression with the label names as examples when every label has a letter (the
    best cheap route measured on HWU64 and CLINC150: benchmarks/results/text_transfer.md), else the
    run's own adaptation without names."""
    from metalab.engine.run import RunFolder

    text = is_text_spec(RunFolder.open(run_dir).config().data.source)
    if head == "auto":
        head = "logistic" if text else "algorithm"
    if names_as_examples is None:
        names_as_examples = False
        if text and head != "algorithm" and Path(support).is_file():
            labels = load_text_table(support, text_column, label_column, domain_column=None, min_per_class=1).class_names
            names_as_examples = all(any(ch.isalpha() for ch in label) for label in labels)
    return head, names_as_examples


def read_text_inputs(source: str) -> list[str]:
    """Texts to classify, one per non-blank line of file ``source`` (``'-'``: standard input)."""
    import sys

    if source == "-":
        raw = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"Input file '{path}' does not exist; pass a text file with one text per line, or '-' for stdin.")
        try:
            raw = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"Input file '{path}' is not UTF-8 (byte {exc.start}); save it as UTF-8.") from None
    return [line.strip() for line in raw.split("\n") if line.strip()]


def score_labelled(adapter: "Adapter", path: str | Path, text_column: str = "text", label_column: str = "label") -> dict:
    """Accuracy and macro precision / recall / F1 of ``adapter`` on a labelled text file; a label
    the adapter does not know is an error naming it."""
    from metalab.engine.text_eval import classification_metrics

    corpus = load_text_table(path, text_column, label_column, domain_column=None, min_per_class=1)
    unknown = sorted(set(corpus.class_names) - set(adapter.labels))
    if unknown:
        raise DataError(f"Labelled file '{path}' has label(s) {unknown[:5]} the adapter was not adapted to "
                        f"(it knows {len(adapter.labels)}: {adapter.labels[:5]}…); score it on the labels it knows.")
    truth = np.array([adapter.labels.index(corpus.class_names[int(c)]) for c in corpus.y])
    predicted = np.array([adapter.labels.index(p.label) for p in adapter.predict(list(corpus.texts))])
    present = sorted(set(truth.tolist()) | set(predicted.tolist()))  # macro averages over the labels in play
    index = {label: i for i, label in enumerate(present)}
    record = classification_metrics(np.array([index[t] for t in truth]), np.array([index[p] for p in predicted]),
                                    [adapter.labels[i] for i in present])
    record["per_class"] = sorted(record["per_class"], key=lambda r: r["f1"])
    return {"examples": len(truth), **record}


def run_encoder(config):
    """The sentence encoder a text run embeds with (from its config; a tuned-encoder run's config,
    as :func:`~metalab.engine.trainer.load_trained` gives it, also carries the tuned layers)."""
    from metalab.models.text_encoder import load_encoder

    opts = text_options(config.data)
    if config.train.tune_encoder is not None and opts["tuned"] is None:
        raise ConfigError("This config is of a tuned-encoder run but carries no tuned layers; load the run with "
                          "metalab.engine.trainer.load_trained (or Run.load), which attaches them.")
    return load_encoder(opts["encoder"], layers=opts["layers"], tuned=opts["tuned"])


def default_threshold(run_dir: str | Path, head: str = "algorithm", labels: int | None = None) -> float | None:
    """The out-of-scope threshold fitted during the run's evaluation (``eval.json``), if any.

    It is a threshold on the *run's own* logits, so it applies only to ``head="algorithm"``;
    other heads score on another scale and get none unless one is given explicitly. It was fitted
    on tasks of all the test classes at once (``ways`` of them): an adapter of ``labels`` labels
    inherits it only when it has at least half as many (a 2-label adapter's top logit is on
    another scale than a 45-way task's, and would flag its own examples), else it gets none."""
    import json

    if head != "algorithm":
        return None
    path = Path(run_dir) / "eval.json"
    if not path.exists():
        return None
    for task in reversed(json.loads(path.read_text()).get("full_task", [])):  # most shots first
        if "out_of_scope" in task:
            if labels is not None and labels < task.get("ways", 0) / 2:
                return None
            return float(task["out_of_scope"]["threshold"])
    return None


def adapt_from_file(run_dir: str | Path, support: str | Path, head: str = "algorithm", threshold: float | None = None,
                    device: str = "cpu", text_column: str = "text", label_column: str = "label",
                    names_as_examples: bool = False, lexical_weight: float = 0.0, finetune_epochs: int = 0,
                    finetune_lr: float = 1e-4, seed: int = 0, progress: bool = False) -> Adapter:
    """An adapter from a support file: a text ``.csv`` / ``.jsonl`` of ``text,label`` for text runs,
    an image folder ``root/<label>/*.png`` for image runs, an ``.npz`` of ``x`` and ``y`` for runs
    trained on an ``.npz``.

    Text runs only: ``names_as_examples`` adds each label, underscores read as spaces, as one more
    example of itself (worth +1.3 points on CLINC150 at 5 shots, when labels are words);
    ``lexical_weight`` > 0 keeps the support texts and adds a lexical classifier (+0.4 there at 0.1);
    ``finetune_epochs`` > 0 first fine-tunes the run's encoder on the support (and the names, if added) for
    that many epochs at ``finetune_lr``, seeded by ``seed`` (4 epochs at 1e-4 on CLINC150: 90.46 %
    against 89.38 % frozen, logistic head with names; about 70 s for 900 texts on 2 CPU cores)."""
    if finetune_epochs < 0 or not finetune_lr > 0:
        raise ConfigError(f"Fine-tuning needs epochs ≥ 0 and a positive learning rate; got {finetune_epochs} and {finetune_lr}.")
    config, algorithm, info = load_trained(run_dir, device)  # (a tuned-encoder run's config then carries its layers)
    refuse_regression_run(Path(run_dir), config)
    support = Path(support)
    if is_text_spec(config.data.source):
        from metalab.models.text_encoder import encode_texts

        corpus = load_text_table(support, text_column, label_column, domain_column=None, min_per_class=1)
        _check_two_labels(support, corpus.class_names)
        texts, y = list(corpus.texts), corpus.y
        if names_as_examples:
            texts += label_name_texts(corpus.class_names)
            y = torch.cat([y, torch.arange(len(corpus.class_names))])
        encoder = run_encoder(config)
        tuned = None
        if finetune_epochs:
            from metalab.models.text_finetune import finetune_encoder

            tuned = finetune_encoder(encoder, texts, y, corpus.num_classes, epochs=finetune_epochs, lr=finetune_lr,
                                     seed=seed, progress=progress)
            x = tuned.encode(texts)
        else:
            x = encode_texts(encoder, texts, progress=False)
        adapter = Adapter(run_dir, x, y, corpus.class_names, head, threshold, device, loaded=(config, algorithm),
                          support_texts=texts, lexical_weight=lexical_weight, tuned_encoder=tuned)
        if tuned is None:
            adapter._encoder = encoder  # the model already loaded here: predict() need not load it again
        return adapter
    arrays = is_array_spec(config.data.source)
    if names_as_examples or lexical_weight or finetune_epochs:
        raise ConfigError("--names-as-examples, --lexical-weight and --finetune-epochs apply to text runs only; "
                          f"this run is an {'array' if arrays else 'image'} run.")
    if arrays:
        return _adapt_from_arrays(run_dir, support, head, threshold, device)
    if not support.is_dir():
        raise DataError(f"Support '{support}' must be an image folder root/<label>/*.png for this image run.")
    from metalab.data.folders import load_image_folder

    channels, size = info["example_shape"][0], info["example_shape"][-1]  # as the run's images were read
    source = load_image_folder(support, size, channels)
    _check_two_labels(support, source.class_names)
    return Adapter(run_dir, source.x, source.y, source.class_names, head, threshold, device, loaded=(config, algorithm),
                   ink_inverted=source.meta.get("ink_inverted"))


def _adapt_from_arrays(run_dir, support: Path, head: str, threshold: float | None, device: str) -> Adapter:
    """An array run's adapter: the support is an ``.npz`` with ``x [M, ...]`` shaped like the run's
    examples and labels ``y [M]`` (strings or integers; ``class_names`` optional), as for training."""
    from metalab.data.folders import load_npz

    if not (is_array_spec(support) and support.is_file()):
        raise DataError(f"Support '{support}' must be an existing .npz file with arrays x and y for this array run.")
    config, algorithm, info = load_trained(run_dir, device)
    source = load_npz(support)
    shape = list(info["example_shape"])
    if list(source.x.shape[1:]) != shape:
        raise DataError(f"Support '{support}' has examples of shape {list(source.x.shape[1:])}, but run '{run_dir}' was "
                        f"trained on {shape}; give x as [M, {', '.join(map(str, shape))}].")
    check_array_dtype(f"Support '{support}'", source.x.dtype, run_example_dtype(config, info), f"run '{run_dir}'")
    _check_two_labels(support, source.class_names)
    return Adapter(run_dir, source.x, source.y, source.class_names, head, threshold, device, loaded=(config, algorithm))


def run_example_dtype(config, info: dict) -> str | None:
    """The dtype of the examples a run was trained on (``uint8``, ``float32``, …), from its checkpoint
    info, or for an older array run from its ``.npz`` if that is still there; ``None`` if unknown."""
    if "example_dtype" in info:
        return info["example_dtype"]
    path = Path(config.data.source)
    if not (is_array_spec(config.data.source) and path.is_file()):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return str(data["x"].dtype)
    except (OSError, ValueError, KeyError):
        return None


def check_array_dtype(what: str, given, trained: str | None, whose: str) -> None:
    """Arrays go into a model as training's did: ``uint8`` scaled from 0-255 to 0-1, any other type as
    it is. Refuses ``given`` (a numpy or torch dtype) when it would be scaled differently from
    ``trained`` (``None``: unknown, no check)."""
    given = str(given).removeprefix("torch.")
    if trained is None or (given == "uint8") == (trained == "uint8"):
        return
    scaled = "uint8 values are scaled from 0-255 to 0-1, other types go in as they are"
    raise DataError(f"{what} holds {given} arrays but {whose} had {trained} ones ({scaled}); "
                    f"save x as {'uint8' if trained == 'uint8' else trained} like the training data.")


def _check_two_labels(support: Path, labels: Sequence[str]) -> None:
    """An adapter chooses between labels: one label alone would label everything with it."""
    if len(labels) < 2:
        raise DataError(f"Support '{support}' has examples of one label only ('{labels[0]}'); an adapter chooses "
                        "between labels, so add examples of at least one more.")
