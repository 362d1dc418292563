"""Omniglot (Lake et al., 2015) read straight from the bundled "minimal" background zips.

Classes are characters, domains are alphabets. Greek and Latin appear, with identical drawings,
in both zips: each character is counted once.

Canonical split (by class, fixed):

* **meta-train**: the 5 alphabets of ``images_background_small1`` (Balinese, Early Aramaic,
  Greek, Korean, Latin: 136 characters), minus a validation carve-out of characters chosen by seed;
* **meta-test**: the alphabets found only in ``images_background_small2`` (Japanese (katakana),
  Sanskrit, Tagalog: 106 characters). No meta-test character is ever trained on.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metalab.data.cache import cache_dir, load_tensors, save_tensors_atomic
from metalab.data.source import LabelledSource
from metalab.errors import DataError

ZIP_NAMES = ("images_background_small1.zip", "images_background_small2.zip")
TRAIN_ZIP = ZIP_NAMES[0]
_CACHE_VERSION = 1


def bundled_dir() -> Path:
    return Path(str(resources.files("metalab.data") / "bundled" / "omniglot"))


def decode_image(data: bytes, size: int) -> np.ndarray:
    """PNG bytes → ``uint8 [size, size]`` with ink = 255 (Omniglot draws black ink on white)."""
    img = Image.open(io.BytesIO(data)).convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(img, dtype=np.uint8)


def _scan(zip_paths: list[Path]) -> list[tuple[str, str, Path, str]]:
    """(alphabet, character, zip path, member) for every drawing, first zip wins on duplicates."""
    seen: set[tuple[str, str]] = set()
    items = []
    for zp in zip_paths:
        if not zp.exists():
            raise DataError(f"Omniglot zip '{zp}' is missing; reinstall metalab or pass the folder that holds {ZIP_NAMES}.")
        with zipfile.ZipFile(zp) as zf:
            chars: dict[tuple[str, str], list[str]] = {}
            for member in zf.namelist():
                parts = member.split("/")
                if len(parts) == 4 and parts[3].lower().endswith(".png"):
                    chars.setdefault((parts[1], parts[2]), []).append(member)
        for key in sorted(chars):
            if key in seen:
                continue
            seen.add(key)
            items += [(key[0], key[1], zp, m) for m in sorted(chars[key])]
    return items


def load_omniglot(image_size: int = 28, root: str | Path | None = None, use_cache: bool = True) -> LabelledSource:
    """All Omniglot characters of the bundled zips as one source ``x: uint8 [M, 1, S, S]``.

    The decoded tensor is cached in :func:`~metalab.data.cache.cache_dir`, keyed by the zips'
    sizes and the image size, so the second load reads one file (well under a second).
    ``meta['train_alphabets']`` lists the alphabets of the first zip (the canonical meta-train).
    """
    if image_size < 8:
        raise DataError(f"image_size={image_size} is too small; use 8 or more (28 is standard).")
    folder = Path(root) if root is not None else bundled_dir()
    zip_paths = [folder / n for n in ZIP_NAMES]
    for zp in zip_paths:
        if not zp.exists():
            raise DataError(f"Omniglot zip '{zp}' is missing; pass a folder that holds {', '.join(ZIP_NAMES)}.")
    key = hashlib.sha1(
        repr([(p.name, p.stat().st_size) for p in zip_paths] + [image_size, _CACHE_VERSION]).encode()
    ).hexdigest()[:16]
    cache_path = cache_dir() / f"omniglot-{image_size}-{key}.safetensors"
    if use_cache and (hit := load_tensors(cache_path)) is not None:
        tensors, meta = hit
        return _to_source(tensors, meta)

    items = _scan(zip_paths)
    with zipfile.ZipFile(zip_paths[0]) as zf:
        train_alphabets = sorted({m.split("/")[1] for m in zf.namelist() if m.count("/") >= 2 and m.split("/")[1]})
    class_keys = sorted({(a, c) for a, c, _, _ in items})
    class_index = {k: i for i, k in enumerate(class_keys)}
    domain_names = sorted({a for a, _ in class_keys})
    images = np.empty((len(items), 1, image_size, image_size), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    open_zips = {zp: zipfile.ZipFile(zp) for zp in zip_paths}
    try:
        for i, (a, c, zp, member) in enumerate(items):
            images[i, 0] = decode_image(open_zips[zp].read(member), image_size)
            labels[i] = class_index[(a, c)]
    finally:
        for zf in open_zips.values():
            zf.close()
    tensors = {
        "x": torch.from_numpy(images),
        "y": torch.from_numpy(labels),
        "class_domains": torch.tensor([domain_names.index(a) for a, _ in class_keys]),
    }
    meta = {
        "class_names": [f"{a}/{c}" for a, c in class_keys],
        "domain_names": domain_names,
        "train_alphabets": train_alphabets,
        "image_size": image_size,
    }
    if use_cache:
        save_tensors_atomic(cache_path, tensors, meta)
    return _to_source(tensors, meta)


def _to_source(tensors: dict, meta: dict) -> LabelledSource:
    return LabelledSource(
        x=tensors["x"],
        y=tensors["y"],
        class_names=meta["class_names"],
        class_domains=tensors["class_domains"],
        domain_names=meta["domain_names"],
        name="omniglot",
        meta={"train_alphabets": meta["train_alphabets"], "image_size": meta["image_size"]},
    )
