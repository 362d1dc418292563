"""The served run: one meta-trained model in memory, turning examples into adapters and inputs into
the run's features.

Features are what the run sees: sentence embeddings (text runs, from the run's own encoder),
``uint8 [C, H, W]`` images (image runs, decoded and resized as the training images were) or the
numbers sent (array runs: uint8 or float32, as the run's ``.npz`` held them). They are
stored with each example in the registry, so an adapter is re-fitted after a restart from exactly
the same tensors and predicts identically. Fitted adapters are kept in a small LRU keyed by
``(id, version)``; a changed adapter (new examples) gets a new version and is re-fitted.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metalab.data.catalog import is_array_spec
from metalab.data.folders import image_array, ink_high
from metalab.data.text import is_text_spec, label_name_texts
from metalab.engine.adapter import Adapter, default_threshold, run_encoder, run_example_dtype
from metalab.engine.trainer import load_trained, refuse_regression_run
from metalab.errors import InputError
from metalab.store.registry import AdapterRecord, Example

MAX_IMAGE_PIXELS = 4096 * 4096  #: larger uploads are refused before decoding (decompression bombs)


class CombiningBatcher:
    """Serialises calls to ``fn(texts) -> [len(texts), D]`` across request threads, and combines
    the texts of requests that arrived while another call ran into one batch.

    A batch of 8 short texts costs little more than one on CPU (reading the encoder's weights
    dominates), so under concurrent load requests share encoder passes instead of queueing for them.
    No extra thread and no added latency: the caller that gets the lock runs everything pending.
    """

    def __init__(self, fn, max_texts: int = 256) -> None:
        self.fn, self.max_texts = fn, max_texts
        self._pending: list[tuple[list[str], Future]] = []
        self._pending_lock = threading.Lock()
        self._run_lock = threading.Lock()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        mine: Future = Future()
        with self._pending_lock:
            self._pending.append((texts, mine))
        while not mine.done():
            with self._run_lock:
                with self._pending_lock:
                    batch, size = [], 0
                    while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_texts):
                        batch.append(self._pending.pop(0))
                        size += len(batch[-1][0])
                if not batch:
                    continue
                try:
                    out = self.fn([t for texts_i, _ in batch for t in texts_i])
                except BaseException as exc:  # every waiter gets the error, not a hang
                    for _, future in batch:
                        future.set_exception(exc)
                    continue
                start = 0
                for texts_i, future in batch:
                    future.set_result(out[start:start + len(texts_i)])
                    start += len(texts_i)
        return mine.result()

    def alone(self, texts: list[str]) -> torch.Tensor:
        """``fn(texts)`` in a batch of its own (after the call in progress), so the same texts
        always give the same rows: padding to other requests' lengths can move the last bits."""
        with self._run_lock:
            return self.fn(list(texts))


class ServedRun:
    """A run folder loaded once for serving."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", cache_size: int = 256) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.config, self.algorithm, info = load_trained(self.run_dir, device)
        refuse_regression_run(self.run_dir, self.config)
        self.algorithm.eval()
        self.device = device
        self.example_shape = tuple(info["example_shape"])
        source = self.config.data.source
        self.modality = "text" if is_text_spec(source) else "array" if is_array_spec(source) else "image"
        # an array run takes numbers as its .npz had them: uint8 ones (scaled to 0-1 by the model) or floats
        self.array_dtype = np.uint8 if run_example_dtype(self.config, info) == "uint8" else np.float32
        self.key = str(self.run_dir)  #: adapters belong to one run: the registry scopes them by this
        self._encoder = run_encoder(self.config) if self.modality == "text" else None
        if self._encoder is not None:
            self._encoder.load()  # now, not lazily: the first request must not wait for it
        self._encode = CombiningBatcher(self._encoder.encode) if self._encoder is not None else None
        self._fitted: OrderedDict[tuple[str, int], Adapter] = OrderedDict()
        self._fitted_lock = threading.Lock()
        self._cache_size = cache_size

    def describe(self) -> dict:
        return {"run": self.run_dir.name, "modality": self.modality, "algorithm": self.config.train.algo,
                "input_shape": list(self.example_shape)}

    def default_threshold(self, head: str, labels: int | None = None) -> float | None:
        return default_threshold(self.run_dir, head, labels) if self.modality == "text" else None

    # ---- inputs → features ---------------------------------------------------------------------

    def features(self, texts: Sequence[str] | None = None, images: Sequence[bytes] | None = None,
                 arrays: Sequence[Sequence[float]] | None = None, field: str = "arrays.{}") -> torch.Tensor:
        """Texts → ``float32 [B, D]`` embeddings, image bytes → ``uint8 [B, C, H, W]``, or flat lists
        of numbers → ``[B, *example_shape]`` in the run's array type (``field`` names the i-th in errors)."""
        if self.modality == "text":
            return self._encode(list(texts))
        if self.modality == "array":
            return torch.from_numpy(np.stack([self._array(values, field.format(i)) for i, values in enumerate(arrays)]))
        images = [self._image(data, f"images.{i}") for i, data in enumerate(images)]
        return torch.from_numpy(np.stack(images))

    def _array(self, values: Sequence[float], field: str) -> np.ndarray:
        size = int(np.prod(self.example_shape))
        if len(values) != size:
            raise InputError(field, f"Field '{field}' has {len(values)} numbers; this run takes {size} (an input of shape "
                                    f"{list(self.example_shape)}, flattened row-major).")
        arr = np.asarray(values, dtype=np.float64)
        if self.array_dtype == np.uint8 and not ((arr == np.round(arr)) & (arr >= 0) & (arr <= 255)).all():
            raise InputError(field, f"Field '{field}' holds numbers other than whole ones from 0 to 255; this run was "
                                    "trained on uint8 arrays, so send them as they were stored there.")
        return arr.astype(self.array_dtype).reshape(self.example_shape)

    @staticmethod
    def _open_image(data: bytes, field: str) -> Image.Image:
        """The image's header (nothing decoded yet), checked: PNG or JPEG, within the pixel limit."""
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
            raise InputError(field, f"Field '{field}' is not a readable PNG or JPEG image; send base64 of the file's bytes.") from None
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise InputError(field, f"Field '{field}' is a {img.width}x{img.height} image, over the "
                                    f"{MAX_IMAGE_PIXELS}-pixel limit; send a smaller image.")
        if img.format not in ("PNG", "JPEG"):
            raise InputError(field, f"Field '{field}' is a {img.format} image; send PNG or JPEG.")
        return img

    def image_pixels(self, images: Sequence[bytes], field: str = "images.{}") -> int:
        """Pixels the server would decode for these images, from their headers alone."""
        total = 0
        for i, data in enumerate(images):
            img = self._open_image(data, field.format(i))
            total += img.width * img.height
        return total

    def _image(self, data: bytes, field: str) -> np.ndarray:
        channels, size = self.example_shape[0], self.example_shape[-1]
        img = self._open_image(data, field)
        try:
            arr = image_array(img, size, channels)  # decodes: a truncated file fails here
        except (OSError, Image.DecompressionBombError, SyntaxError, ValueError):
            raise InputError(field, f"Field '{field}' is not a readable PNG or JPEG image; send base64 of the file's bytes.") from None
        return ink_high(arr) if channels == 1 else arr  # dark strokes on a light page: ink high, as in training

    @staticmethod
    def decode_images(encoded: Sequence[str], field: str = "images.{}") -> list[bytes]:
        """base64 strings (or ``data:`` URLs) → bytes; ``field`` names the i-th one in errors."""
        out = []
        for i, text in enumerate(encoded):
            if text.startswith("data:") and "," in text[:100]:
                text = text.split(",", 1)[1]  # a data: URL from a browser
            try:
                out.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                name = field.format(i)
                raise InputError(name, f"Field '{name}' is not valid base64; send the image file's bytes base64-encoded.") from None
        return out

    def example_features(self, examples: list[Example]) -> list[Example]:
        """The examples with their ``features`` filled in (validates images)."""
        if self.modality == "array":  # decoded into features already
            return examples
        if self.modality == "text":
            feats = self.features(texts=[e.text for e in examples]).float()
        else:
            feats = torch.from_numpy(np.stack([self._image(e.image, f"examples.{i}.image") for i, e in enumerate(examples)]))
        return [Example(e.label, e.text, e.image, f.numpy().tobytes()) for e, f in zip(examples, feats)]

    # ---- adapters ------------------------------------------------------------------------------

    def fit(self, labels: list[str], head: str, threshold: float | None, examples: list[Example],
            names_as_examples: bool = False, lexical_weight: float = 0.0) -> Adapter:
        """An adapter on the examples' stored features. Text runs only: ``names_as_examples`` adds
        each label's name (underscores as spaces, encoded as one batch of the labels in order, so a
        re-fit after a restart gets the same features) as one more example; ``lexical_weight`` > 0
        adds the lexical classifier fitted on the examples' texts (and the names)."""
        if self.modality != "text" and (names_as_examples or lexical_weight):
            field = "names_as_examples" if names_as_examples else "lexical_weight"
            raise InputError(field, f"Field '{field}' applies to text runs only; this run is an {self.modality} run, leave it out.")
        dtype = {"text": np.float32, "image": np.uint8, "array": self.array_dtype}[self.modality]
        shape = self.example_shape
        x = torch.from_numpy(np.stack([np.frombuffer(e.features, dtype=dtype).reshape(shape) for e in examples]))
        index = {label: i for i, label in enumerate(labels)}
        y = torch.tensor([index[e.label] for e in examples])
        texts = [e.text for e in examples] if self.modality == "text" else None
        if names_as_examples:
            names = label_name_texts(labels)
            x = torch.cat([x, self._encode.alone(names).float().cpu()])
            y = torch.cat([y, torch.arange(len(labels))])
            texts = texts + names
        return Adapter(self.run_dir, x, y, labels, head, threshold, self.device, loaded=(self.config, self.algorithm),
                       support_texts=texts if lexical_weight else None, lexical_weight=lexical_weight)

    def remember(self, record: AdapterRecord, adapter: Adapter) -> None:
        with self._fitted_lock:
            self._fitted[(record.id, record.version)] = adapter
            self._fitted.move_to_end((record.id, record.version))
            while len(self._fitted) > self._cache_size:
                self._fitted.popitem(last=False)

    def adapter(self, record: AdapterRecord, load_examples) -> Adapter:
        """The fitted adapter for ``record`` (from the LRU, else re-fitted from its stored examples)."""
        key = (record.id, record.version)
        with self._fitted_lock:
            if key in self._fitted:
                self._fitted.move_to_end(key)
                return self._fitted[key]
        adapter = self.fit(record.labels, record.head, record.threshold, load_examples(record.id, record.version),
                           record.names_as_examples, record.lexical_weight)
        self.remember(record, adapter)
        return adapter

    def forget(self, adapter_id: str) -> None:
        with self._fitted_lock:
            for key in [k for k in self._fitted if k[0] == adapter_id]:
                del self._fitted[key]
