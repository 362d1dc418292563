"""Labelled text: CLINC150 and HWU64 (bundled) and CSV / JSONL files of ``text,label[,domain]``.

A :class:`TextCorpus` holds strings; :func:`metalab.models.text_encoder.embed_corpus` turns it into a
:class:`~metalab.data.source.LabelledSource` of cached sentence embeddings, from where the data
flow is the same as for images (sampler → episodes → algorithm).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metalab.errors import DataError

CLINC150_DIR = Path(__file__).parent / "bundled" / "clinc150"
HWU64_DIR = Path(__file__).parent / "bundled" / "hwu64"
OUT_OF_SCOPE = "oos"


@dataclass(frozen=True)
class TextCorpus:
    """Texts with a class each; classes belong to domains.

    Attributes:
        texts: one string per example ``[M]``.
        y: class index per example ``int64 [M]``.
        class_names, class_domains (``int64 [num_classes]``), domain_names: as in ``LabelledSource``.
        parts: the file's own split per example (``train`` / ``val`` / ``test``), or all ``train``.
        out_of_scope: examples that belong to no class, by part (CLINC150's ``oos_*``).
    """

    texts: list[str]
    y: torch.Tensor
    class_names: list[str]
    class_domains: torch.Tensor
    domain_names: list[str]
    parts: list[str]
    name: str = "text"
    out_of_scope: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.y) or len(self.parts) != len(self.texts):
            raise DataError(f"Text corpus '{self.name}' has {len(self.texts)} texts, {len(self.y)} labels and {len(self.parts)} parts; give one of each per example.")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def part(self, name: str) -> "TextCorpus":
        """The examples of one of the file's splits (classes and their indices unchanged)."""
        keep = [i for i, p in enumerate(self.parts) if p == name]
        if not keep:
            raise DataError(f"Text corpus '{self.name}' has no '{name}' examples; its parts are {sorted(set(self.parts))}.")
        return TextCorpus([self.texts[i] for i in keep], self.y[keep], self.class_names, self.class_domains,
                          self.domain_names, [name] * len(keep), f"{self.name}:{name}",
                          {name: self.out_of_scope.get(name, [])})


def load_clinc150(root: str | Path = CLINC150_DIR) -> TextCorpus:
    """CLINC150 (Larson et al. 2019): 150 intents in 10 domains, 100 train / 20 val / 30 test
    utterances per intent, plus out-of-scope utterances (``oos_train/val/test``)."""
    root = Path(root)
    data_file, domains_file = root / "data_full.json", root / "domains.json"
    for f in (data_file, domains_file):
        if not f.exists():
            raise DataError(f"CLINC150 file '{f}' is missing; reinstall metalab or point to a folder holding data_full.json and domains.json.")
    data, domains = _read_json(data_file), _read_json(domains_file)
    domain_names = sorted(domains)
    domain_of = {intent: domain_names.index(d) for d, intents in domains.items() for intent in intents}
    class_names = sorted(domain_of)
    index = {c: i for i, c in enumerate(class_names)}
    texts, labels, parts = [], [], []
    for part in ("train", "val", "test"):
        for text, intent in data[part]:
            if intent not in index:
                raise DataError(f"CLINC150 intent '{intent}' in '{data_file}' is not listed in '{domains_file}'; restore the original files.")
            texts.append(text)
            labels.append(index[intent])
            parts.append(part)
    oos = {part: [t for t, _ in data.get(f"oos_{part}", [])] for part in ("train", "val", "test")}
    return TextCorpus(texts, torch.tensor(labels), class_names, torch.tensor([domain_of[c] for c in class_names]),
                      domain_names, parts, "clinc150", oos)


def load_hwu64(root: str | Path = HWU64_DIR) -> TextCorpus:
    """HWU64 (Liu et al. 2019; fold 1 as in DialoGLUE): 64 home-assistant intents
    (``scenario_intent``) in 18 scenarios (the domains), 9,960 ``train`` and 1,076 ``test``
    utterances (35-175 and 3-19 per intent)."""
    root = Path(root)
    parts = {}
    for part in ("train", "test"):
        f = root / f"{part}.csv"
        if not f.exists():
            raise DataError(f"HWU64 file '{f}' is missing; reinstall metalab or point to a folder holding train.csv and test.csv.")
        parts[part] = load_text_table(f, min_per_class=1, out_of_scope_label=None)
    train, test = parts["train"], parts["test"]
    if set(test.class_names) - set(train.class_names):
        raise DataError(f"HWU64 file '{root / 'test.csv'}' has intents that '{root / 'train.csv'}' lacks; restore the original files.")
    index = {c: i for i, c in enumerate(train.class_names)}
    test_y = torch.tensor([index[test.class_names[int(c)]] for c in test.y])
    return TextCorpus(train.texts + test.texts, torch.cat([train.y, test_y]), train.class_names, train.class_domains,
                      train.domain_names, ["train"] * len(train.texts) + ["test"] * len(test.texts), "hwu64")


#: the bundled text datasets, by the name a data spec uses
BUNDLED_TEXT = {"clinc150": load_clinc150, "hwu64": load_hwu64}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"CLINC150 file '{path}' is not valid JSON ({exc.msg} at line {exc.lineno}); restore the original file.") from None


def load_text_table(path: str | Path, text_column: str = "text", label_column: str = "label",
                    domain_column: str | None = "domain", min_per_class: int = 2,
                    out_of_scope_label: str | None = OUT_OF_SCOPE) -> TextCorpus:
    """A ``.csv`` (with a header row) or ``.jsonl`` / ``.json`` file of labelled texts (UTF-8).

    The domain column is optional (absent: one domain ``default``). Rows labelled
    ``out_of_scope_label`` go to ``out_of_scope`` rather than becoming a class. Every class needs
    ``min_per_class`` examples; every text must be non-empty.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Text file '{path}' does not exist; pass a .csv or .jsonl file with columns '{text_column}' and '{label_column}'.")
    if path.is_dir():
        raise DataError(f"'{path}' is a folder; text examples come in a .csv or .jsonl file with columns '{text_column}' "
                        f"and '{label_column}' (image folders are for image runs).")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"Text file '{path}' has no rows; add examples as '{text_column},{label_column}' lines.")
    columns = set(rows[0][1])
    for needed in (text_column, label_column):
        if needed not in columns:
            raise DataError(f"Text file '{path}' has no '{needed}' column (found: {sorted(columns)}); rename the column or pass --text-column / --label-column.")
    use_domain = domain_column is not None and domain_column in columns
    texts, labels, domains, oos = [], [], [], []
    for line, row in rows:
        text = row.get(text_column)
        label = row.get(label_column)
        if text is None or not str(text).strip():
            raise DataError(f"Text file '{path}' line {line}: the '{text_column}' field is empty; give every example a text or remove the row.")
        if label is None or not str(label).strip():
            raise DataError(f"Text file '{path}' line {line}: the '{label_column}' field is empty; give every example a label or remove the row.")
        text, label = str(text).strip(), str(label).strip()
        if out_of_scope_label is not None and label == out_of_scope_label:
            oos.append(text)
            continue
        texts.append(text)
        labels.append(label)
        domains.append(str(row.get(domain_column) or "default").strip() if use_domain else "default")
    class_names = sorted(set(labels))
    if not class_names:
        raise DataError(f"Text file '{path}' has only out-of-scope rows; add labelled examples.")
    domain_of: dict[str, str] = {}
    for label, domain in zip(labels, domains):
        if domain_of.setdefault(label, domain) != domain:
            raise DataError(f"Text file '{path}': label '{label}' appears in domains '{domain_of[label]}' and '{domain}'; a label belongs to one domain.")
    counts = {c: 0 for c in class_names}
    for label in labels:
        counts[label] += 1
    for c, n in counts.items():
        if n < min_per_class:
            raise DataError(f"Text file '{path}': label '{c}' has {n} example(s) but at least {min_per_class} are needed; add examples or remove the label.")
    domain_names = sorted(set(domain_of.values()))
    index = {c: i for i, c in enumerate(class_names)}
    return TextCorpus(texts, torch.tensor([index[l] for l in labels]), class_names,
                      torch.tensor([domain_names.index(domain_of[c]) for c in class_names]), domain_names,
                      ["train"] * len(texts), path.stem, {"train": oos})


def _delimiter(raw: str, suffix: str) -> str:
    """Tab for ``.tsv``; for ``.csv`` a comma, or a semicolon when the header has semicolons and no
    comma (spreadsheets in many locales save CSV that way)."""
    if suffix == ".tsv":
        return "\t"
    header = raw.split("\n", 1)[0]
    return ";" if ";" in header and "," not in header else ","


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row dict)`` pairs from a CSV (header row) or JSON-lines / JSON-array file."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"Text file '{path}' is not UTF-8 (byte {exc.start}); save it as UTF-8.") from None
    suffix = path.suffix.lower()
    if suffix == ".csv" or suffix == ".tsv":
        reader = csv.reader(io.StringIO(raw, newline=""), delimiter=_delimiter(raw, suffix))  # quoted newlines stay in their text
        try:
            header = next(reader)
        except StopIteration:
            return []
        header = [h.strip() for h in header]
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"Text file '{path}' has duplicate header column(s) {dupes}; give each column a unique name.")
        rows = []
        for values in reader:
            line = reader.line_num  # the row's last physical line
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise DataError(f"Text file '{path}' line {line} has {len(values)} fields but the header has {len(header)}; quote texts that contain commas.")
            rows.append((line, dict(zip(header, values))))
        return rows
    if suffix in (".jsonl", ".json"):
        stripped = raw.strip()
        if suffix == ".json" and stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise DataError(f"Text file '{path}' is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file.") from None
            return [(i + 1, _as_row(path, i + 1, item)) for i, item in enumerate(items)]
        rows = []
        for line, text in enumerate(raw.split("\n"), start=1):  # not splitlines(): U+2028 may sit inside a JSON string
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"Text file '{path}' line {line} is not valid JSON ({exc.msg}); write one object per line.") from None
            rows.append((line, _as_row(path, line, item)))
        return rows
    raise DataError(f"Text file '{path}' has suffix '{path.suffix}'; use .csv, .tsv, .jsonl or .json.")


def _as_row(path: Path, line: int, item) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"Text file '{path}' line {line} is a JSON {type(item).__name__}, not an object; write objects like {{\"text\": ..., \"label\": ...}}.")
    return item


def label_name_texts(labels: list[str]) -> list[str]:
    """Each label read as a text, underscores as spaces (``"book_flight"`` → ``"book flight"``): the
    extra examples ``names_as_examples`` adds, in ``metalab adapt``, ``metalab serve`` and the benchmarks."""
    return [label.replace("_", " ") for label in labels]


def is_text_spec(spec: str) -> bool:
    """Whether a data spec names text (``clinc150``, ``hwu64`` or a .csv / .tsv / .jsonl / .json file)."""
    return spec in BUNDLED_TEXT or Path(spec).suffix.lower() in (".csv", ".tsv", ".jsonl", ".json")


def load_text(spec: str, **table_options) -> TextCorpus:
    """The text corpus named by ``spec`` (``table_options`` apply to files, not bundled sets)."""
    if spec in BUNDLED_TEXT:
        return BUNDLED_TEXT[spec]()
    return load_text_table(spec, **table_options)
