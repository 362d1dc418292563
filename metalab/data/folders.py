"""Image-folder and in-memory array sources."""

from __future__ import annotations

import hashlib
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from metalab.data.cache import cache_dir, load_tensors, save_tensors_atomic
from metalab.data.source import LabelledSource
from metalab.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image_folder(root: str | Path, image_size: int = 28, channels: int | None = None, use_cache: bool = True,
                      progress: bool = False) -> LabelledSource:
    """``root/<class>/*.png|jpg`` → ``uint8 [M, channels, image_size, image_size]``.

    A two-level layout ``root/<domain>/<class>/*`` is read too, with the first level as domain.
    ``channels``: 1 (grayscale) or 3 (RGB); ``None`` reads a sample of the images and takes 3 when
    they are in colour, else 1. Grayscale images are stored ink-high (inverted) when the folder's
    mean pixel is bright, so dark-on-white scans and white-on-dark images both work.

    The decoded tensor is cached in :func:`~metalab.data.cache.cache_dir`, keyed by every image's
    path, size and modification time and by ``image_size`` and ``channels``: a second load reads
    one file, and changing, adding or removing an image decodes the folder again. ``progress``
    shows a bar while decoding.
    """
    if channels not in (None, 1, 3):
        raise DataError(f"channels={channels!r} is invalid; use 1 (grayscale), 3 (RGB) or None (decide from the images).")
    if image_size < 1:
        raise DataError(f"image_size={image_size} is invalid; give a positive number of pixels.")
    root = Path(root)
    if not root.exists():
        raise DataError(f"Data folder '{root}' does not exist; pass a folder laid out as root/<class>/<image>.png.")
    if not root.is_dir():
        raise DataError(f"Data path '{root}' is not a folder; pass a folder laid out as root/<class>/<image>.png.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"Data folder '{root}' has no class sub-folders; lay it out as root/<class>/<image>.png.")
    nested = all(not _images(d) and any(c.is_dir() for c in d.iterdir()) for d in class_dirs)
    entries: list[tuple[str, str, Path]] = []  # (domain, class, directory)
    if nested:
        for dom in class_dirs:
            entries += [(dom.name, f"{dom.name}/{c.name}", c) for c in sorted(dom.iterdir()) if c.is_dir()]
    else:
        entries = [("default", d.name, d) for d in class_dirs]
    files = [_images(directory) for _, _, directory in entries]
    for (_, _, directory), found in zip(entries, files):
        if not found:
            raise DataError(f"Class folder '{directory}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder.")
    if channels is None:
        channels = 3 if any(_in_colour(found[0]) for found in files[:COLOUR_SAMPLE]) else 1
    domain_names = sorted({d for d, _, _ in entries})
    names = [cls for _, cls, _ in entries]
    domains = torch.tensor([domain_names.index(d) for d, _, _ in entries])
    cache_path = cache_dir() / "folders" / f"{root.name}-{image_size}-{channels}-{_listing_key(root, files)}.safetensors"
    if use_cache and (hit := load_tensors(cache_path)) is not None and hit[1].get("class_names") == names:
        tensors, meta = hit
        return LabelledSource(tensors["x"], tensors["y"], names, domains, domain_names, name=root.name,
                              meta=_ink_meta(channels, meta.get("ink_inverted", False)))
    from metalab.engine.progress import progress_bar  # here: metalab.engine imports this module

    images, labels = [], []
    with progress_bar(f"decoding {sum(map(len, files))} images of '{root.name}'", sum(map(len, files)), enabled=progress) as bar:
        for label, found in enumerate(files):
            for f in found:
                images.append(_decode_file(f, image_size, channels, "replace or remove the file"))
                labels.append(label)
            bar.advance(len(found))
    x = torch.from_numpy(np.stack(images))
    inverted = channels == 1 and bool(x.float().mean() > 127)
    if inverted:
        x = 255 - x  # dark strokes on a light page: store ink as high values
    y = torch.tensor(labels)
    if use_cache:
        save_tensors_atomic(cache_path, {"x": x, "y": y},
                            {"class_names": names, "version": _CACHE_VERSION, "ink_inverted": inverted})
    return LabelledSource(x, y, names, domains, domain_names, name=root.name, meta=_ink_meta(channels, inverted))


def _ink_meta(channels: int, inverted: bool) -> dict:
    """``meta["ink_inverted"]`` of a grayscale folder: whether its pages were light and so inverted, a
    decision made once for the folder, which images read later for it must follow
    (:func:`read_image_file`'s ``ink_inverted``)."""
    return {"ink_inverted": inverted} if channels == 1 else {}


_CACHE_VERSION = 4  #: bump when decoding changes, so old cache entries are not used


def _listing_key(root: Path, files: list[list[Path]]) -> str:
    """A hash of every image's path (relative to ``root``), size and modification time."""
    digest = hashlib.sha1(str(_CACHE_VERSION).encode())
    for found in files:
        for f in found:
            st = f.stat()
            digest.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def image_array(img: Image.Image, image_size: int = 28, channels: int = 1) -> np.ndarray:
    """A PIL image → ``uint8 [channels, image_size, image_size]`` (grayscale or RGB, Lanczos-resized).
    Transparent pixels are laid on white (a drawing on a transparent page keeps its strokes) and
    16-bit images are scaled to 8 bits, not clipped; a photo's EXIF orientation is applied (a phone
    stores portrait shots sideways with a tag saying so)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I") or (img.mode == "F"):
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(wide / 257.0 if wide.max() > 255 else wide, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


COLOUR_SAMPLE = 32  #: classes whose first image decides whether a folder is in colour


def _in_colour(path: Path) -> bool:
    """Whether an image has visible colour: its channels differ by more than 16 levels on 1 % of
    its pixels (gray images saved as RGB, and JPEG noise, stay gray)."""
    try:
        with Image.open(path) as img:
            if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
                return False
            rgb = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.int16)
    except (UnidentifiedImageError, OSError):
        return False  # reported by the loader, with the file's name
    return float(((rgb.max(-1) - rgb.min(-1)) > 16).mean()) > 0.01


def ink_high(arr: np.ndarray) -> np.ndarray:
    """A grayscale ``uint8`` image with ink as high values, as the training images store it: a light
    page (mean pixel over 127) is inverted, so dark-on-white scans and white-on-dark images both work."""
    return 255 - arr if arr.mean() > 127 else arr


def read_image_file(path: str | Path, image_size: int = 28, channels: int = 1,
                    ink_inverted: bool | None = None) -> np.ndarray:
    """One image file → ``uint8 [channels, image_size, image_size]``, prepared as
    :func:`load_image_folder` prepares its images. A grayscale image is inverted when
    ``ink_inverted`` says so (the decision recorded for the folder it is compared with), or, when
    that is ``None``, when its own page is light (:func:`ink_high`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Image '{path}' does not exist or is not a file; pass the path of a .png or .jpg file.")
    arr = _decode_file(path, image_size, channels, "pass a PNG or JPEG file")
    if channels != 1:
        return arr
    if ink_inverted is None:
        return ink_high(arr)
    return 255 - arr if ink_inverted else arr


def _decode_file(path: Path, image_size: int, channels: int, fix: str) -> np.ndarray:
    """:func:`image_array` of one file (closed after), or an error naming the file and ``fix``."""
    try:
        with Image.open(path) as img:
            return image_array(img, image_size, channels)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise DataError(f"Image '{path}' cannot be read ({exc.__class__.__name__}); {fix}.") from None


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def from_arrays(
    x, y, class_names: list[str] | None = None, class_domains=None, domain_names: list[str] | None = None, name: str = "arrays"
) -> LabelledSource:
    """An in-memory source from array-likes: ``x [M, ...]`` of numbers (finite; ``uint8`` kept as
    images, any other type read as ``float32``) and integer or string labels ``y [M]``; anything
    else is a :class:`DataError` naming the source and the fix."""
    x_arr = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if x_arr.dtype.kind not in "biuf":
        raise DataError(f"Examples of source '{name}' hold {x_arr.dtype} values; x must hold real numbers "
                        "(uint8 images or floats), e.g. x.astype('float32').")
    if x_arr.ndim < 2:
        raise DataError(f"Examples of source '{name}' have shape {list(x_arr.shape)}; x must be [M, ...] with one row per "
                        "example (a single feature: x[:, None]).")
    if x_arr.size == 0 and len(x_arr):
        raise DataError(f"Examples of source '{name}' have shape {list(x_arr.shape)}: no values per example; give each row of x "
                        "at least one number.")
    if x_arr.dtype.kind == "f" and not np.isfinite(x_arr).all():
        bad = np.flatnonzero(~np.isfinite(x_arr.reshape(len(x_arr), -1)).all(1))
        raise DataError(f"Examples of source '{name}' hold NaN or infinite values ({len(bad)} examples, the first at row "
                        f"{bad[0]}); drop or fix those rows.")
    if x_arr.dtype != np.uint8 and x_arr.dtype != np.float32:  # uint8 stays images (scaled by the model); the rest float32
        x_arr = x_arr.astype(np.float32)
    x = torch.as_tensor(x_arr)
    y_arr = y.detach().cpu().numpy() if torch.is_tensor(y) else np.asarray(y)
    if y_arr.ndim != 1:
        raise DataError(f"Labels for source '{name}' must be one-dimensional [M]; got shape {list(y_arr.shape)}.")
    if y_arr.dtype.kind not in "biuUS":
        raise DataError(f"Labels of source '{name}' hold {y_arr.dtype} values; y must hold class ids (integers) or class "
                        "names (strings).")
    if len(y_arr) != len(x_arr):
        raise DataError(f"Source '{name}' has {len(x_arr)} examples but {len(y_arr)} labels; give one label per row of x.")
    if y_arr.dtype.kind in "iu" and class_names is not None:
        labels = torch.as_tensor(y_arr, dtype=torch.long)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"Labels of source '{name}' must lie in 0..{len(class_names) - 1} to match class_names.")
    else:
        uniques, inverse = np.unique(y_arr.astype(str) if y_arr.dtype.kind not in "iu" else y_arr, return_inverse=True)
        labels = torch.as_tensor(inverse, dtype=torch.long)
        class_names = [str(u) for u in uniques]
    if class_domains is None:
        class_domains, domain_names = torch.zeros(len(class_names), dtype=torch.long), ["default"]
    return LabelledSource(x, labels, list(class_names), torch.as_tensor(class_domains, dtype=torch.long), list(domain_names), name=name)


def load_npz(path: str | Path) -> LabelledSource:
    """An ``.npz`` file with arrays ``x`` and ``y`` (and optionally ``class_names``)."""
    path = Path(path)
    unreadable = f"'{path}' cannot be read as an .npz archive ({{}}); it is cut short or not an .npz: save it with numpy.savez."
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise DataError(f"'{path}' holds a single .npy array, not an .npz archive; save x and y with numpy.savez(path, x=x, y=y).")
        with data:  # (members are read on access: errors come from here too)
            for key in ("x", "y"):
                if key not in data:
                    raise DataError(f"'{path}' has no array '{key}'; save the examples as x=[M, ...] and the labels as y=[M].")
            x, y = data["x"], data["y"]
            names = [str(n) for n in data["class_names"].tolist()] if "class_names" in data else None
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"'{path}' holds Python objects (pickled arrays), which metalab never loads; save numbers and "
                            "strings only, e.g. numpy.savez(path, x=x.astype('float32'), y=y.astype(str)).") from None
        raise DataError(unreadable.format(f"ValueError: {exc}")) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, struct.error) as exc:
        raise DataError(unreadable.format(type(exc).__name__)) from None  # (a damaged zip header can claim any method)
    if names is not None and len(set(names)) != len(names):
        raise DataError(f"'{path}': array 'class_names' lists a name twice; list each class once.")
    return from_arrays(x, y, names, name=path.stem)
