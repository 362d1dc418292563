"""From a data spec (``omniglot``, a folder, an ``.npz``) to meta-train / val / test splits."""

from __future__ import annotations

from pathlib import Path

from metalab.data.augment import with_rotations
import torch

from metalab.data.folders import load_image_folder, load_npz
from metalab.data.omniglot import load_omniglot
from metalab.data.source import LabelledSource
from metalab.data.splits import Splits, omniglot_canonical_split, split_by_class, split_by_domain
from metalab.data.text import BUNDLED_TEXT, TextCorpus, is_text_spec, load_text
from metalab.errors import DataError

BUNDLED = {
    "omniglot": "Omniglot minimal background sets (Lake et al. 2015, MIT): characters as classes, alphabets as domains",
    "clinc150": "CLINC150 (Larson et al. 2019, CC BY 3.0): 150 intents in 10 domains + out-of-scope, as sentence embeddings",
    "hwu64": "HWU64 (Liu et al. 2019, CC BY 4.0): 64 home-assistant intents in 18 scenarios, as sentence embeddings",
}
#: CLINC150's meta-test domains (fixed; meta-train and validation come from the other seven).
CLINC150_TEST_DOMAINS = ("auto_and_commute", "kitchen_and_dining", "travel")
TASK_FAMILIES = {
    "sinusoid": "sinusoid regression y = A sin(x - phase), A in [0.1, 5], phase in [0, pi], x in [-5, 5] (Finn et al. 2017)",
}


def is_array_spec(spec: str) -> bool:
    """Whether ``spec`` names an ``.npz`` file of arrays ``x``, ``y`` (its runs' adapters read ``.npz`` too)."""
    return str(spec).lower().endswith(".npz")


def is_task_family(spec: str) -> bool:
    """Whether ``spec`` names a generated task family (regression) rather than a labelled source."""
    return spec in TASK_FAMILIES


def load_task_family(spec: str, shots: int, queries: int, tasks: int, seed: int):
    """A task family with the sampler interface (``tasks``, ``sample(index)``)."""
    from metalab.data.sinusoid import SinusoidTasks

    if spec == "sinusoid":
        return SinusoidTasks(shots=shots, queries=queries, tasks=tasks, seed=seed)
    raise DataError(f"'{spec}' is not a task family; known: {', '.join(TASK_FAMILIES)}.")


def text_options(data_config) -> dict:
    """The text-related fields of a :class:`~metalab.engine.config.DataConfig`. A config loaded
    with a meta-trained encoder run (:func:`metalab.engine.trainer.load_trained`) also carries
    the run's tuned layer tensors (``tuned_encoder``), so its texts are embedded by that encoder."""
    d = data_config
    return {"encoder": d.encoder, "layers": d.encoder_layers, "text_column": d.text_column,
            "label_column": d.label_column, "domain_column": d.domain_column, "parts": d.text_parts,
            "tuned": getattr(d, "tuned_encoder", None)}


def load_text_corpus(spec: str, text_column: str = "text", label_column: str = "label",
                     domain_column: str | None = "domain", parts: list | None = None) -> TextCorpus:
    """The texts of ``spec`` (``clinc150``, ``hwu64`` or a .csv/.jsonl file); ``parts``: only the
    examples of these parts of the file (e.g. ``['train']``; ``None``: all)."""
    corpus = load_text(spec) if spec in BUNDLED_TEXT else \
        load_text(spec, text_column=text_column, label_column=label_column, domain_column=domain_column)
    if parts:
        unknown = sorted(set(parts) - set(corpus.parts))
        if unknown:
            raise DataError(f"data.text_parts {unknown} are not parts of '{spec}'; its parts are {sorted(set(corpus.parts))}.")
        keep = [i for i, p in enumerate(corpus.parts) if p in parts]
        corpus = TextCorpus([corpus.texts[i] for i in keep], corpus.y[keep], corpus.class_names, corpus.class_domains,
                            corpus.domain_names, [corpus.parts[i] for i in keep], corpus.name,
                            {p: t for p, t in corpus.out_of_scope.items() if p in parts})
    return corpus


def load_text_source(spec: str, encoder: str = "minilm", layers=None, text_column: str = "text",
                     label_column: str = "label", domain_column: str | None = "domain", parts: list | None = None,
                     tuned: dict | None = None, progress: bool = True) -> LabelledSource:
    """A text spec (``clinc150``, ``hwu64`` or a .csv/.jsonl file) as cached sentence embeddings ``[M, D]``."""
    from metalab.models.text_encoder import embed_corpus, load_encoder

    corpus = load_text_corpus(spec, text_column, label_column, domain_column, parts)
    return embed_corpus(corpus, load_encoder(encoder, layers=layers, tuned=tuned), progress=progress)


def text_id_source(corpus: TextCorpus) -> LabelledSource:
    """The corpus as a source whose examples are their own ids ``int64 [M, 1]`` (the texts in
    ``meta``): what a meta-trained encoder run samples episodes from."""
    return LabelledSource(torch.arange(len(corpus.texts))[:, None], corpus.y.clone(), list(corpus.class_names),
                          corpus.class_domains.clone(), list(corpus.domain_names), corpus.name,
                          {"modality": "text-ids", "texts": list(corpus.texts),
                           "per_example": {"text": list(corpus.texts), "part": list(corpus.parts)}})


def load_source(spec: str, image_size: int = 28, text: dict | None = None, channels: int | None = None,
                progress: bool = False, text_ids: bool = False) -> LabelledSource:
    """The whole labelled source named by ``spec`` (``text``: options of text sources; ``channels``:
    of an image folder, 1, 3 or ``None`` to decide from its images; ``progress``: a bar while an
    image folder is decoded)."""
    if spec == "omniglot":
        return load_omniglot(image_size)
    if is_text_spec(spec):
        if text_ids:
            options = {k: v for k, v in (text or {}).items() if k in ("text_column", "label_column", "domain_column", "parts")}
            return text_id_source(load_text_corpus(spec, **options))
        return load_text_source(spec, **(text or {}))
    path = Path(spec)
    if is_array_spec(spec):
        if not path.exists():
            raise DataError(f"Data file '{path}' does not exist; pass an existing .npz or folder, or a bundled name ({', '.join(BUNDLED)}).")
        return load_npz(path)
    if not path.exists():
        raise DataError(
            f"Data '{spec}' is neither a bundled dataset ({', '.join(BUNDLED)}) nor an existing path; "
            "pass a folder laid out as root/<class>/<image>.png or an .npz file."
        )
    return load_image_folder(path, image_size, channels, progress=progress)


def load_splits(spec: str, image_size: int = 28, val_fraction: float = 0.1, test_fraction: float = 0.2,
                split_seed: int = 0, rotations: bool | None = False, text: dict | None = None,
                test_domains: list | None = None, channels: int | None = None, progress: bool = False,
                text_ids: bool = False) -> Splits:
    """Class-disjoint splits of ``spec``: Omniglot's canonical alphabet split; for text, held-out
    domains (``test_domains``; CLINC150 defaults to :data:`CLINC150_TEST_DOMAINS`); else a seeded
    random class split; ``test_domains=[]``: every domain meta-trains and there is no meta-test
    split (a run to transfer elsewhere). ``rotations`` adds rotated copies of meta-train classes
    only (``None``: for Omniglot, the standard protocol, and not for other sources).
    ``text_ids``: text examples are their ids (:func:`text_id_source`), not embeddings."""
    if rotations is None:
        rotations = spec == "omniglot"
    source = load_source(spec, image_size, text, channels, progress, text_ids)
    if spec == "clinc150" and test_domains is None:
        test_domains = list(CLINC150_TEST_DOMAINS)
    if spec == "omniglot":
        splits = omniglot_canonical_split(source, val_fraction, split_seed)
    elif test_domains is not None and len(test_domains) == 0:
        splits = split_by_domain(source, list(source.domain_names), [], val_fraction, split_seed)
    elif test_domains:
        train_domains = [d for d in source.domain_names if d not in test_domains]
        splits = split_by_domain(source, train_domains, list(test_domains), val_fraction, split_seed)
    else:
        splits = split_by_class(source, val_fraction, test_fraction, split_seed)
    if rotations:
        x = splits.train.x
        if x.dim() != 4 or x.shape[2] != x.shape[3]:
            raise DataError(f"rotations need square images [C, H, W]; source '{source.name}' has examples {list(x.shape[1:])}. Set data.rotations: false.")
        splits = Splits(with_rotations(splits.train), splits.val, splits.test,
                        splits.description + "; meta-train classes augmented with 90/180/270° rotations")
    return splits
