import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metalab.data import omniglot_canonical_split, split_by_class, with_rotations
from metalab.data.catalog import load_source, load_splits
from metalab.data.folders import image_array, load_image_folder, load_npz
from metalab.data.omniglot import load_omniglot
from metalab.errors import DataError


def test_omniglot_counts_each_character_once(omniglot):
    assert omniglot.num_classes == 242  # 136 + 106 after de-duplicating Greek and Latin
    assert omniglot.num_domains == 8
    assert omniglot.x.shape == (4840, 1, 28, 28) and omniglot.x.dtype == torch.uint8
    assert (omniglot.class_counts() == 20).all()
    # ink is high: most pixels are background (0)
    assert omniglot.x.float().mean() < 60


def test_second_omniglot_load_is_cached_and_fast(omniglot):
    start = time.perf_counter()
    again = load_omniglot(28)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(again.x, omniglot.x)


def test_canonical_split_is_disjoint_and_documented(omniglot):
    s = omniglot_canonical_split(omniglot, val_fraction=0.1, seed=0)
    assert set(s.test.domain_names) == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    assert set(s.train.domain_names) == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
    names = [set(x.class_names) for x in (s.train, s.val, s.test)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert s.train.num_classes + s.val.num_classes == 136 and s.test.num_classes == 106
    assert "katakana" in s.description
    # the carve-out is fixed by its seed
    assert omniglot_canonical_split(omniglot, 0.1, 0).val.class_names == s.val.class_names
    assert omniglot_canonical_split(omniglot, 0.1, 1).val.class_names != s.val.class_names


def test_rotations_only_touch_meta_train():
    s = load_splits("omniglot", rotations=True)
    assert s.train.num_classes == 4 * 122 and s.test.num_classes == 106
    assert not any("@rot" in n for n in s.test.class_names + s.val.class_names)
    r = with_rotations(s.test.subset([0]))
    assert torch.equal(r.x[r.y == 1][0], torch.rot90(r.x[r.y == 0][0], 1, dims=(1, 2)))


def test_random_class_split_is_disjoint(clusters):
    s = split_by_class(clusters, 0.1, 0.2, seed=0)
    assert not set(s.train.class_names) & set(s.test.class_names)
    assert s.train.num_classes + s.val.num_classes + s.test.num_classes == clusters.num_classes


def _write_png(path, value):
    Image.fromarray(np.full((12, 12), value, dtype=np.uint8)).save(path)


def test_image_folder_source(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            _write_png(tmp_path / c / f"{i}.png", 200 if c == "cat" else 20)
    src = load_image_folder(tmp_path, image_size=16)
    assert src.class_names == ["cat", "dog"] and src.x.shape == (6, 1, 16, 16)


def test_image_folder_is_decoded_once_and_again_when_it_changes(tmp_path, monkeypatch):
    import os

    import metalab.data.folders as folders

    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "pets"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            _write_png(root / c / f"{i}.png", 40 + 60 * i if c == "cat" else 20)
    first = load_image_folder(root, image_size=16)
    decoded = []
    monkeypatch.setattr(folders, "image_array", lambda *a: decoded.append(1) or image_array(*a))
    again = load_image_folder(root, image_size=16)
    assert decoded == [] and torch.equal(again.x, first.x) and again.class_names == first.class_names  # one file read
    _write_png(root / "dog" / "0.png", 90)
    os.utime(root / "dog" / "0.png", ns=(1, 1))  # whatever the clock's resolution: a new modification time
    changed = load_image_folder(root, image_size=16)
    assert len(decoded) == 6 and not torch.equal(changed.x, first.x)
    (root / "dog" / "3.png").write_bytes((root / "dog" / "1.png").read_bytes())  # an image more
    assert load_image_folder(root, image_size=16).x.shape[0] == 7 and len(decoded) == 13
    for entry in (tmp_path / "cache" / "folders").glob("*.safetensors"):
        entry.write_bytes(b"damaged")  # a damaged entry is decoded again, never trusted
    assert load_image_folder(root, image_size=16).x.shape[0] == 7 and len(decoded) == 20


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"'.*nope' is neither a bundled dataset .* nor an existing path"):
        load_source(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match=r"empty_class' has no images"):
        load_image_folder(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    _write_png(tmp_path / "empty_class" / "a.png", 0)
    with pytest.raises(DataError, match=r"broken.png' cannot be read"):
        load_image_folder(tmp_path)


def test_npz_source_and_errors(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.rand(10, 3).astype(np.float32), y=np.array(list("aabbccddee")))
    src = load_npz(tmp_path / "d.npz")
    assert src.class_names == list("abcde") and src.x.shape == (10, 3)
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((3, 2)))
    with pytest.raises(DataError, match="no array 'y'"):
        load_npz(tmp_path / "nolabels.npz")


def test_colour_image_folders_keep_their_colour(tmp_path):
    """Red and a green of the same luminance are one gray: a colour folder is read as RGB (decided from
    its images), a run trained on it adapts and predicts in colour, and gray scans stay one channel."""
    from metalab.engine import MetaTrainer, RunConfig
    from metalab.engine.adapter import adapt_from_file
    from metalab.engine.eval_run import evaluate_run

    rng = np.random.default_rng(0)
    colours = {"red": (255, 0, 0), "green": (0, 130, 0), "blue": (0, 0, 255), "grey": (120, 120, 120), "teal": (0, 128, 128),
               "olive": (128, 128, 0), "pink": (255, 120, 200), "navy": (0, 0, 110), "orange": (255, 140, 0), "white": (240, 240, 240)}

    def write(root, name, rgb, count):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(np.array(rgb)[None, None] + rng.integers(-8, 9, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")

    for name, rgb in colours.items():
        write(tmp_path / "colours", name, rgb, 6)
    src = load_image_folder(tmp_path / "colours", image_size=16)
    assert src.x.shape == (60, 3, 16, 16)
    gray = load_image_folder(tmp_path / "colours", image_size=16, channels=1)
    red, green = (gray.x[gray.y == gray.class_names.index(c)].float().mean() for c in ("red", "green"))
    assert gray.x.shape[1] == 1 and abs(red - green) < 3  # the same gray: only colour tells them apart
    write(tmp_path / "scans", "a", (200, 200, 200), 2)  # gray content saved as RGB stays one channel
    write(tmp_path / "scans", "b", (30, 30, 30), 2)
    assert load_image_folder(tmp_path / "scans").x.shape[1] == 1
    with pytest.raises(DataError, match="channels=2 is invalid"):
        load_image_folder(tmp_path / "scans", channels=2)

    cfg = RunConfig.from_dict({"data": {"source": str(tmp_path / "colours"), "image_size": 16},
                               "train": {"algo": "protonet", "ways": 2, "shots": 1, "queries": 2, "steps": 2,
                                         "val_every": 100, "val_episodes": 2, "device": "cpu"},
                               "eval": {"queries": 2}})
    MetaTrainer(cfg, tmp_path / "run", show_progress=False, log=lambda m: None).train()
    record = evaluate_run(tmp_path / "run", [[2, 1]], episodes=4, show_progress=False)
    assert len(record["results"]) == 1 and record["left_out"] == []
    with pytest.raises(DataError, match=r"^3-way 1-shot needs 3 classes but the test split has 2; lower ways"):
        evaluate_run(tmp_path / "run", [[3, 1]], episodes=4, show_progress=False)  # asked for by name: an error
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    # eval.settings was left to its default, which the run scaled to its 2 test classes and recorded
    assert config["eval"]["settings"] == [[2, 1], [2, 5]]
    config["eval"]["settings"] = [[5, 1], [20, 1]]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DataError, match=r"No evaluation setting fits the test split \(5-way 1-shot needs 5 classes"):
        evaluate_run(tmp_path / "run", episodes=4, show_progress=False)  # the run's own eval.settings, none fits
    config["eval"]["settings"] = [[2, 1], [5, 1]]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    record = evaluate_run(tmp_path / "run", episodes=4, show_progress=False)  # those that fit, the others named
    assert [(r["ways"], r["shots"]) for r in record["results"]] == [(2, 1)]
    assert record["left_out"] == [{"ways": 5, "shots": 1, "reason": "needs 5 classes but the test split has 2"}]
    write(tmp_path / "support", "red", colours["red"], 2)
    write(tmp_path / "support", "green", colours["green"], 2)
    adapter = adapt_from_file(tmp_path / "run", tmp_path / "support", head="prototypes")
    assert adapter.support_x.shape[1:] == (3, 16, 16)
    write(tmp_path / "queries", "q", colours["green"], 1)
    write(tmp_path / "queries", "r", colours["red"], 1)
    labels = [p.label for p in adapter.predict([tmp_path / "queries" / "q" / "0.png", tmp_path / "queries" / "r" / "0.png"])]
    assert labels == ["green", "red"]


def test_transparent_and_16_bit_images_keep_their_content(tmp_path):
    """A stroke on a transparent page (common for sketches) is laid on white, so it is kept (ink
    high, like Omniglot); a 16-bit scan is scaled to 8 bits, not clipped to white."""
    from PIL import ImageDraw

    for label, box in (("slash", [4, 4, 36, 36]), ("bar", [4, 20, 36, 20])):
        (tmp_path / "sketches" / label).mkdir(parents=True)
        for i in range(2):
            page = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
            ImageDraw.Draw(page).line(box, fill=(0, 0, 0, 255), width=3 + i)
            page.save(tmp_path / "sketches" / label / f"{i}.png")
    src = load_image_folder(tmp_path / "sketches", image_size=20, use_cache=False)
    assert src.x.shape[1] == 1 and 5 < src.x.float().mean() < 80 and src.x.max() > 200  # strokes high on a dark page
    assert not torch.equal(src.x[src.y == 0][0], src.x[src.y == 1][0])  # was all zeros for both
    deep = Image.fromarray(np.linspace(0, 65535, 400).reshape(20, 20).astype(np.uint16))
    assert deep.mode == "I;16"
    arr = image_array(deep, 20, 1)
    assert arr.min() < 5 and 250 < arr.max() and 100 < arr.mean() < 155  # the full range, not 186..255


def test_photos_are_read_upright(tmp_path):
    """A phone's portrait photo is stored sideways with an EXIF orientation tag: it is read upright."""
    upright = np.zeros((30, 20), dtype=np.uint8)
    upright[:10] = 255  # bright top third
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(np.rot90(upright, 1).copy()).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    arr = image_array(Image.open(tmp_path / "photo.jpg"), 30, 1)[0]
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # the bright third on top, as the camera saw it


def test_images_read_for_an_adapter_follow_its_folder_s_ink_decision(tmp_path):
    """A folder of light pages is inverted as a whole; a bold glyph in it (a dark image on its own)
    must be inverted at prediction too, or the adapter sees a negative of what it was given."""
    from metalab.data.folders import read_image_file
    from metalab.engine import MetaTrainer, RunConfig
    from metalab.engine.adapter import Adapter, adapt_from_file

    def page(path, box):  # white page, black rectangle (top, bottom, left, right)
        pixels = np.full((16, 16), 255, np.uint8)
        pixels[box[0]:box[1], box[2]:box[3]] = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)

    for c in range(7):  # thin strokes: light pages
        for i in range(3):
            page(tmp_path / "data" / f"line{c}" / f"{i}.png", (1 + 2 * c + i % 2, 2 + 2 * c + i % 2, 1, 15))
    cfg = RunConfig.from_dict({"data": {"source": str(tmp_path / "data"), "image_size": 16, "test_fraction": 0.3,
                                        "val_fraction": 0.15},
                               "train": {"algo": "protonet", "ways": 2, "shots": 1, "queries": 1, "steps": 2,
                                         "val_every": 100, "val_episodes": 2, "device": "cpu"}, "eval": {"queries": 1}})
    MetaTrainer(cfg, tmp_path / "run", show_progress=False, log=lambda m: None).train()

    page(tmp_path / "support" / "thin" / "0.png", (7, 8, 1, 15))
    page(tmp_path / "support" / "thin" / "1.png", (8, 9, 1, 15))
    page(tmp_path / "support" / "bold" / "0.png", (0, 14, 0, 14))  # 77 % ink: dark on its own (mean 59)
    page(tmp_path / "support" / "bold" / "1.png", (2, 16, 2, 16))
    for round_ in ("decoded", "cached"):
        source = load_image_folder(tmp_path / "support", image_size=16)
        assert source.meta["ink_inverted"] is True, round_  # the folder's mean page is light
    adapter = adapt_from_file(tmp_path / "run", tmp_path / "support", head="prototypes")
    saved = Adapter.load(adapter.save(tmp_path / "a.safetensors"))
    bold = tmp_path / "support" / "bold" / "0.png"
    as_supported = source.x[source.y == source.class_names.index("bold")][0]
    assert read_image_file(bold, 16, 1).mean() < 128  # judged alone it would not be inverted
    for a in (adapter, saved):
        assert torch.equal(a.read_images([bold])[0], as_supported)
        assert [p.label for p in a.predict([bold, tmp_path / "support" / "thin" / "0.png"])] == ["bold", "thin"]
