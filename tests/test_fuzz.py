"""The fuzz layer: generated configs, ``--set`` values and input files (CSV, JSONL, NPZ, image
folders, adapter supports) through the real CLI entry point (``metalab.cli.main``, in this process).

Every case must end one of two ways: the command succeeds, or it prints exactly one ``error:`` line
naming the problem, exits 2, and writes nothing (no run folder, no adapter file). A traceback, any
other exit code, or a file left behind by a refused command fails the case. Hypothesis runs a fixed
(derandomised) set of cases, so the suite gives the same verdict on every machine; ``FUZZ_SCALE=10``
runs ten times as many, and ``FUZZ_SHOW=1`` prints each refusal (``-s``).
"""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from metalab import cli
from metalab.engine.config import DataConfig, EvalConfig, RLConfig, RunConfig, TrainConfig
from metalab.errors import MetalabError

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
CASES: dict[str, int] = {}  #: cases run per property (printed by the last test)
SUCCEEDED: dict[str, int] = {}  #: of which the command succeeded


def fuzz(n: int):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def run_cli(*args: str) -> tuple[int, str, str]:
    """``metalab ARGS`` in this process: (exit code, stdout, stderr). A traceback propagates."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, width = sys.argv, cli.err_console.width
    sys.argv = ["metalab", *args]
    cli.err_console.width = 100_000  # one message, one line (rich would wrap it at 80 columns)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, cli.err_console.width = old_argv, width
    return code, out.getvalue(), err.getvalue()


def check_outcome(name: str, code: int, err: str, written) -> None:
    """Success, or one ``error:`` line, exit 2 and ``written`` (a path) absent."""
    CASES[name] = CASES.get(name, 0) + 1
    if code == 0:
        SUCCEEDED[name] = SUCCEEDED.get(name, 0) + 1
        return
    lines = [line for line in err.splitlines() if line.strip()]
    if os.environ.get("FUZZ_SHOW"):
        print(f"[{name}] {lines[-1][:160] if lines else code}", file=sys.__stdout__)
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert len(lines[0]) < 600, lines[0]
    assert not os.path.exists(written), f"refused ({lines[0]}) but wrote {written}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def tiny_npz(workdir):
    rng = np.random.default_rng(0)
    path = workdir / "tiny.npz"
    np.savez(path, x=rng.normal(size=(120, 6)).astype(np.float32), y=np.repeat(np.arange(12), 10))
    return path


def fresh(workdir, stem: str):
    return workdir / f"{stem}-{uuid.uuid4().hex[:8]}"


TRAIN_FAST = ["--steps", "1", "--no-eval", "--no-progress"]

# ---- config dicts ------------------------------------------------------------------------------------

SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "rl": RLConfig}
FIELDS = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 60), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["omniglot", "conv4", "protonet", "maml", "cpu", "auto", "fp32", "5w1s"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def config_dicts(draw):
    raw: dict = {}
    for _ in range(draw(st.integers(1, 5))):
        key = draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10).map(lambda t: f"train.{t}"), st.sampled_from(["name", "data", "train", "bogus"])))
        value = draw(values)
        if "." in key:
            section, field = key.split(".", 1)
            if not isinstance(raw.get(section), dict):
                raw[section] = {}
            raw[section][field] = value
        else:
            raw[key] = value
    return raw


@fuzz(300)
@given(raw=config_dicts())
def test_config_dicts_are_accepted_or_refused_in_one_sentence(raw):
    CASES["config dicts"] = CASES.get("config dicts", 0) + 1
    try:
        RunConfig.from_dict(raw)
    except MetalabError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 600, message


# ---- --set values through the CLI ---------------------------------------------------------------------

LONG = {"train.steps", "train.time_budget", "eval.episodes", "train.val_episodes", "rl.iterations"}  # a valid value could run for hours
SET_KEYS = [k for k in FIELDS if k not in LONG] + ["train.algo_options.inner_lr", "train.algo_options.inner_steps",
                                                   "train.algo_options.first_order", "train", "data", "nosuch.field"]
set_values = st.one_of(st.integers(-3, 40).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=16),
                       st.sampled_from(["[1, 2]", "{a: 1}", "null", "true", "[[5, 1]]", "-1e309", "~", "'", "[", "{", "&a x",
                                        "*a", "!!python/object:os.system", "0x10", "1_000", ".inf", "[[2, 1], [3, 0]]"]))


@fuzz(80)
@given(key=st.sampled_from(SET_KEYS), value=set_values)
def test_set_values_train_or_are_refused_in_one_line(workdir, tiny_npz, key, value):
    out = fresh(workdir, "set")
    code, _, err = run_cli("train", "--data", str(tiny_npz), "--algo", "protonet", *TRAIN_FAST, "--out", str(out),
                           "--set", f"{key}={value}")
    check_outcome("--set values", code, err, out)


# ---- input files ----------------------------------------------------------------------------------------

cells = st.one_of(st.text(max_size=20), st.sampled_from(["", " ", '"', "a,b", "line\nbreak", "é", "\x00", "label", "text"]))


@st.composite
def csv_bytes(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind <= 3:  # a valid file (labels with a few texts each), perhaps with one flaw
        rows = ["text,label"]
        for c in range(draw(st.integers(3, 12))):
            rows += [f"text {c} {i} {draw(st.text(alphabet='abcdefgh ', max_size=12))},label{c}" for i in range(draw(st.integers(3, 6)))]
        flaw = draw(st.sampled_from(["none", "none", "blank label", "blank text", "extra field", "lone label"]))
        at = draw(st.integers(1, len(rows) - 1))
        rows[at] = {"none": rows[at], "blank label": rows[at].rsplit(",", 1)[0] + ",", "blank text": "," + rows[at].rsplit(",", 1)[1],
                    "extra field": rows[at] + ",x", "lone label": "only once,lonely"}[flaw]
        return ("\n".join(rows) + "\n").encode()
    header = draw(st.sampled_from(["text,label", "text,label,domain", "label,text", "a,b", "text", "", "text,label,label"]))
    rows = []
    labels = draw(st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=4))
    for _ in range(draw(st.integers(0, 30))):
        n = draw(st.integers(1, 4))
        fields = [draw(st.one_of(cells, st.sampled_from(labels))) for _ in range(n)]
        rows.append(",".join(f'"{f}"' if draw(st.booleans()) else f for f in fields))
    text = "\n".join([header, *rows]) + draw(st.sampled_from(["", "\n", "\r\n"]))
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"])), errors="replace")


@st.composite
def jsonl_bytes(draw):
    if draw(st.integers(0, 3)) == 0:  # a valid file, perhaps with one flaw
        lines = [json.dumps({"text": f"text {c} {i} {draw(st.text(alphabet='abcdefgh ', max_size=12))}", "label": f"label{c}"})
                 for c in range(draw(st.integers(3, 12))) for i in range(draw(st.integers(3, 6)))]
        flaw = draw(st.sampled_from(["none", "none", "no label", "number text", "not json"]))
        at = draw(st.integers(0, len(lines) - 1))
        lines[at] = {"none": lines[at], "no label": json.dumps({"text": "x"}), "number text": json.dumps({"text": 5, "label": "label0"}),
                     "not json": lines[at][:-1]}[flaw]
        return ("\n".join(lines) + "\n").encode()
    lines = []
    labels = draw(st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=4))
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            lines.append(draw(st.text(max_size=30)))  # not JSON
        elif kind == 1:
            lines.append(json.dumps(draw(values)))  # JSON, not an object
        else:
            obj = {"text": draw(st.one_of(st.text(max_size=20), values)), "label": draw(st.one_of(st.sampled_from(labels), values))}
            if draw(st.booleans()):
                obj["domain"] = draw(st.one_of(st.text(max_size=5), values))
            if draw(st.integers(0, 4)) == 0:
                obj.pop(draw(st.sampled_from(["text", "label"])))
            lines.append(json.dumps(obj))
    return ("\n".join(lines) + "\n").encode("utf-8", errors="surrogatepass") if lines else b""


DTYPES = ["float32", "float64", "float16", "uint8", "int64", "bool", "complex64", "U3", "object"]


@st.composite
def npz_bytes(draw):
    kind = draw(st.integers(0, 11))
    buf = io.BytesIO()
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind >= 8:  # a valid file (classes with a few rows each), perhaps with one flaw
        classes, per = draw(st.integers(2, 14)), draw(st.integers(2, 8))
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
        shape = draw(st.sampled_from([(6,), (4,), (1, 6, 6)]))
        x = rng.normal(size=(classes * per, *shape)).astype(np.float32)
        if draw(st.booleans()):
            x = (np.abs(x) * 60).clip(0, 255).astype(np.uint8)
        y = np.repeat(np.arange(classes), per)
        if draw(st.booleans()):
            y = np.array([f"class{c}" for c in y])
        flaw = draw(st.sampled_from(["none", "none", "none", "nan", "short y", "lone class"]))
        if flaw == "nan" and x.dtype == np.float32:
            x[draw(st.integers(0, len(x) - 1))].flat[0] = np.nan
        elif flaw == "short y":
            y = y[:-1]
        elif flaw == "lone class":
            y = y.copy()
            y[0] = y[-1] = y[0]
        np.savez(buf, x=x, y=y)
        return buf.getvalue()
    m = draw(st.integers(0, 60))
    x_shape = draw(st.sampled_from([(m,), (m, 4), (m, 1, 3, 3), (m, 0), (max(m - 1, 0), 4)]))
    x_dtype, y_dtype = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))
    classes = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    x = (rng.normal(size=x_shape) * 50).astype(x_dtype if x_dtype != "object" else "float32").astype(x_dtype)
    if x_dtype.startswith("float") and draw(st.integers(0, 4)) == 0 and x.size:
        x.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    y = rng.integers(0, classes, size=draw(st.sampled_from([m, max(m - 1, 0), m + 1]))).astype(y_dtype if y_dtype != "object" else "int64")
    y = y.astype(y_dtype) if y_dtype not in ("complex64",) else y
    arrays = {"x": x, "y": y}
    if draw(st.integers(0, 3)) == 0:
        arrays["class_names"] = np.array(draw(st.lists(st.text(max_size=3), max_size=12)), dtype=object if draw(st.booleans()) else str)
    for key in draw(st.sets(st.sampled_from(["x", "y"]), max_size=1)):
        arrays.pop(key)
    np.savez(buf, **arrays) if draw(st.booleans()) else np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    if kind == 1:
        data = data[: draw(st.integers(0, len(data) - 1))]  # cut short
    elif kind == 2:
        flip = draw(st.integers(0, len(data) - 1))
        data = data[:flip] + bytes([data[flip] ^ 0xFF]) + data[flip + 1:]
    return data


@st.composite
def image_bytes(draw):
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=100))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "1", "P", "I;16"]))
    img = Image.new(mode, size, color=draw(st.integers(0, 255)) if mode not in ("RGB", "RGBA") else None)
    buf = io.BytesIO()
    img.save(buf, format=draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP"])) if mode in ("L", "RGB") else "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == 1 else data


@st.composite
def image_folders(draw):
    """{class name: [(file name, bytes)]}"""
    if draw(st.booleans()):  # a valid folder (classes of a few small PNGs), perhaps with one flaw
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
        folder = {}
        for c in range(draw(st.integers(4, 12))):
            files = []
            for i in range(draw(st.integers(3, 5))):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, size=(12, 12), dtype=np.uint8)).save(buf, format="PNG")
                files.append((f"{i}.png", buf.getvalue()))
            folder[f"class{c}"] = files
        if draw(st.booleans()):
            folder["class0"][0] = ("0.png", draw(image_bytes()))
        return folder
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", ".hidden", "x y", "ü"]), max_size=6, unique=True))
    return {n: [(f"{i}{draw(st.sampled_from(['.png', '.jpg', '.gif', '.txt', '.PNG']))}", draw(image_bytes()))
                for i in range(draw(st.integers(0, 4)))] for n in names}


@pytest.fixture(scope="module")
def encoder_set(tiny_encoder_dir):
    return ["--set", f"data.encoder={tiny_encoder_dir}", "--set", "data.encoder_layers=null"]


def train_on_file(workdir, suffix: str, content: bytes, *extra: str) -> None:
    """``metalab train --data FILE`` on ``content`` saved as a ``suffix`` file: trains or is refused in one line."""
    path = fresh(workdir, "data").with_suffix(suffix)
    path.write_bytes(content)
    out = fresh(workdir, suffix[1:] + "-run")
    code, _, err = run_cli("train", "--data", str(path), *TRAIN_FAST, *extra, "--out", str(out))
    check_outcome(f"{suffix[1:].upper()} files", code, err, out)


@fuzz(40)
@given(content=csv_bytes())
def test_csv_files_train_or_are_refused_in_one_line(workdir, encoder_set, content):
    train_on_file(workdir, ".csv", content, *encoder_set)


@fuzz(40)
@given(content=jsonl_bytes())
def test_jsonl_files_train_or_are_refused_in_one_line(workdir, encoder_set, content):
    train_on_file(workdir, ".jsonl", content, *encoder_set)


@fuzz(60)
@given(content=npz_bytes())
def test_npz_files_train_or_are_refused_in_one_line(workdir, content):
    train_on_file(workdir, ".npz", content)


@fuzz(30)
@given(folder=image_folders())
def test_image_folders_train_or_are_refused_in_one_line(workdir, folder):
    root = fresh(workdir, "images")
    root.mkdir()
    for name, files in folder.items():
        (root / name).mkdir()
        for file_name, data in files:
            (root / name / file_name).write_bytes(data)
    out = fresh(workdir, "image-run")
    code, _, err = run_cli("train", "--data", str(root), *TRAIN_FAST, "--set", "data.image_size=16", "--out", str(out))
    check_outcome("image folders", code, err, out)
    shutil.rmtree(root)


# ---- adapting and predicting with generated inputs -------------------------------------------------------

@pytest.fixture(scope="module")
def array_run(workdir, tiny_npz):
    out = workdir / "array-run"
    code, _, err = run_cli("train", "--data", str(tiny_npz), "--algo", "protonet", "--steps", "2", "--no-eval", "--no-progress", "--out", str(out))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def text_run(workdir, encoder_set):
    from test_text import intent_rows, write_csv

    data = write_csv(workdir / "intents.csv", intent_rows())
    out = workdir / "text-run"
    code, _, err = run_cli("train", "--data", str(data), "--algo", "protonet", "--steps", "2", "--no-eval", "--no-progress",
                           *encoder_set, "--set", "data.test_domains=[fun]", "--set", "data.val_fraction=0.25", "--out", str(out))
    assert code == 0, err
    return out


@fuzz(40)
@given(content=npz_bytes(), head=st.sampled_from(["algorithm", "prototypes", "logistic", "ridge", "nearest", ""]))
def test_array_supports_adapt_or_are_refused_in_one_line(workdir, array_run, content, head):
    support = fresh(workdir, "support").with_suffix(".npz")
    support.write_bytes(content)
    adapter = fresh(workdir, "adapter").with_suffix(".safetensors")
    code, _, err = run_cli("adapt", "--run", str(array_run), "--support", str(support), "--head", head, "--out", str(adapter))
    check_outcome("adapt: array supports", code, err, adapter)
    if code == 0:  # and the adapter predicts generated inputs, or refuses them in one line
        query = fresh(workdir, "query").with_suffix(".npz")
        query.write_bytes(content)
        code, _, err = run_cli("predict", "--adapter", str(adapter), str(query), "--json")
        check_outcome("predict: array inputs", code, err, fresh(workdir, "never"))


@fuzz(30)
@given(content=csv_bytes(), texts=st.lists(st.text(max_size=30), min_size=1, max_size=4))
def test_text_supports_adapt_or_are_refused_in_one_line(workdir, text_run, content, texts):
    support = fresh(workdir, "support").with_suffix(".csv")
    support.write_bytes(content)
    adapter = fresh(workdir, "adapter").with_suffix(".safetensors")
    code, _, err = run_cli("adapt", "--run", str(text_run), "--support", str(support), "--out", str(adapter))
    check_outcome("adapt: text supports", code, err, adapter)
    if code == 0:
        code, _, err = run_cli("predict", "--adapter", str(adapter), "--", *texts)
        check_outcome("predict: texts", code, err, fresh(workdir, "never"))


@fuzz(30)
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                         npz_bytes().map(lambda b: b[:64])))
def test_damaged_adapter_files_are_refused_in_one_line(workdir, content):
    adapter = fresh(workdir, "adapter").with_suffix(".safetensors")
    adapter.write_bytes(content)
    code, _, err = run_cli("predict", "--adapter", str(adapter), "hello")
    assert code == 2
    check_outcome("damaged adapters", code, err, fresh(workdir, "never"))


def test_the_fuzz_layer_ran_its_cases():
    """(Last in the file.) How many cases each property ran: at least the planned numbers."""
    print("\nfuzz cases (of which succeeded): " + ", ".join(f"{k} {v} ({SUCCEEDED.get(k, 0)})" for k, v in CASES.items())
          + f"; {sum(CASES.values())} in all")
    planned = {"config dicts": 300, "--set values": 80, "CSV files": 40, "JSONL files": 40, "NPZ files": 60, "image folders": 30,
               "adapt: array supports": 40, "adapt: text supports": 30, "damaged adapters": 30}
    if planned.keys() <= CASES.keys():  # the whole file ran (not one test picked with -k)
        assert all(CASES[k] >= n * SCALE for k, n in planned.items()), CASES

