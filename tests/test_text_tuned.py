"""Meta-training the sentence encoder (``train.tune_encoder``): the training view of the tuned
layers equals the tuned encoder at inference, it learns something that carries to new intents,
resume retraces, the embedding cache keys on the tuned weights, served predictions equal the
library's, and bad input is one clear line. The tiny random encoder of ``conftest`` stands in
for MiniLM."""

import random

import pytest
import torch

from metalab.data.text import load_hwu64
from metalab.engine import MetaTrainer, RunConfig
from metalab.errors import ConfigError, DataError
from metalab.models.text_encoder import EmbeddingCache, SentenceEncoder, encode_texts
from test_text import intent_rows, write_csv

FILLER = ("please", "could", "you", "the", "my", "now", "a", "for", "me", "today", "can", "i", "want", "to", "just",
          "quickly", "again", "really", "some", "that", "this", "hey", "okay", "so")
TRAIN_WORDS = ("apple banana cherry grape lemon mango olive peach pear plum melon kiwi "
               "river ocean lake forest desert valley canyon island meadow glacier swamp prairie").split()
TEST_WORDS = "piano violin guitar trumpet flute drum harp cello".split()


def keyword_rows(seed: int = 0, per_intent: int = 16):
    """Intents told apart by one keyword among filler words: train intents ``t0..t11`` (domain
    'seen', two keywords each), new intents ``n0..n3`` (domain 'new', their own keywords)."""
    rng = random.Random(seed)
    rows = []
    intents = [(f"t{i}", TRAIN_WORDS[2 * i: 2 * i + 2], "seen") for i in range(12)]
    intents += [(f"n{i}", TEST_WORDS[2 * i: 2 * i + 2], "new") for i in range(4)]
    for label, words, domain in intents:
        for _ in range(per_intent):
            tokens = [rng.choice(words)] + rng.sample(FILLER, 6)
            rng.shuffle(tokens)
            rows.append((" ".join(tokens), label, domain))
    return rows


def tuned_config(data, encoder_dir, steps=40, **train):
    return RunConfig.from_dict({
        "data": {"source": str(data), "encoder": str(encoder_dir), "encoder_layers": None, "test_domains": ["new"],
                 "val_fraction": 0.0},
        "train": {"algo": "protonet", "tune_encoder": "all", "ways": 6, "shots": 2, "queries": 4, "steps": steps,
                  "lr": 5e-3, "checkpoint_every": 10, "val_every": 1000, "log_every": 5, **train}})


def prototype_accuracy(encoder, texts, y, shots=3, draws=10):
    """Mean accuracy of cosine prototypes on every class at ``shots`` shots (the rest as queries)."""
    from metalab.algorithms.frozen_heads import prototype_head

    z = encode_texts(encoder, texts, cache=EmbeddingCache(encoder.model_id, root=None), progress=False)
    accs = []
    for d in range(draws):
        g = torch.Generator().manual_seed(d)
        support = torch.cat([(y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)[:shots]]
                             for c in range(int(y.max()) + 1)])
        mask = torch.ones(len(y), dtype=torch.bool)
        mask[support] = False
        head = prototype_head(z[support], y[support], int(y.max()) + 1)
        accs.append((head.scores(z[mask]).argmax(-1) == y[mask]).float().mean().item())
    return sum(accs) / len(accs)


@pytest.fixture(scope="module")
def keyword_run(tiny_encoder_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    data = write_csv(root / "keywords.csv", keyword_rows())
    MetaTrainer(tuned_config(data, tiny_encoder_dir, steps=150), root / "run", show_progress=False, log=lambda m: None).train()
    return root, data


def new_intents(data):
    from metalab.data.text import load_text_table

    corpus = load_text_table(data)
    new = [c for c, name in enumerate(corpus.class_names) if name.startswith("n")]
    keep = [i for i, c in enumerate(corpus.y.tolist()) if c in new]
    return [corpus.texts[i] for i in keep], torch.tensor([new.index(int(corpus.y[i])) for i in keep])


def test_training_features_equal_the_tuned_encoder_at_inference(tiny_encoder_dir, tmp_path):
    from metalab.engine.trainer import load_trained
    from metalab.engine.adapter import run_encoder

    data = write_csv(tmp_path / "k.csv", keyword_rows())
    for layers, tune in ((None, "all"), ([1, 2], 1)):
        cfg = tuned_config(data, tiny_encoder_dir, steps=3, tune_encoder=tune)
        cfg.data.encoder_layers = layers
        trainer = MetaTrainer(cfg, tmp_path / f"run-{tune}", show_progress=False, log=lambda m: None)
        trainer.train()
        train = trainer.splits.train
        backbone = trainer.algorithm.backbone.eval()
        with torch.no_grad():
            seen = backbone(train.x[:20])
        config, _, info = load_trained(tmp_path / f"run-{tune}")
        encoder = run_encoder(config)
        assert "-tuned-" in encoder.model_id and info["context"]["tuned_encoder"]["first"] == (0 if tune == "all" else 1)
        again = encoder.encode([train.meta["texts"][i] for i in train.x[:20].flatten().tolist()])
        assert torch.allclose(seen, again, atol=1e-5), (seen - again).abs().max()
        base = SentenceEncoder(tiny_encoder_dir, layers=layers).encode(train.meta["texts"][:3])
        assert not torch.allclose(base, again[:3], atol=1e-3)  # the tuned layers moved


def test_meta_training_the_encoder_helps_new_intents(keyword_run, tiny_encoder_dir):
    from metalab.engine.adapter import run_encoder
    from metalab.engine.trainer import load_trained

    root, data = keyword_run
    texts, y = new_intents(data)
    config, _, _ = load_trained(root / "run")
    before = prototype_accuracy(SentenceEncoder(tiny_encoder_dir), texts, y)
    after = prototype_accuracy(run_encoder(config), texts, y)
    assert after > before + 0.1, (before, after)  # intents whose keywords meta-training never saw (0.42 → 0.63 here)


def test_resume_of_an_encoder_run_equals_an_uninterrupted_one(tiny_encoder_dir, tmp_path):
    """Crashed after step 15 (checkpoints at 10), resumed: the same tuned layers at step 20, dropout included."""
    from metalab.engine.checkpoint import list_checkpoints, load_checkpoint

    class Crash(Exception):
        pass

    data = write_csv(tmp_path / "k.csv", keyword_rows())
    quiet = {"show_progress": False, "log": lambda m: None}
    MetaTrainer(tuned_config(data, tiny_encoder_dir, steps=20), tmp_path / "whole", **quiet).train()
    broken = MetaTrainer(tuned_config(data, tiny_encoder_dir, steps=20), tmp_path / "broken", **quiet)
    original = broken._prepare

    def crash_at_15(step):
        if step == 15:
            raise Crash()
        return original(step)

    broken._prepare = crash_at_15
    with pytest.raises(Crash):
        broken.train()
    assert [s for s, _ in list_checkpoints(tmp_path / "broken")] == [10]
    torch.manual_seed(12345)  # whatever the global RNG holds now: resume restores dropout's state
    resumed = MetaTrainer(RunConfig.load(tmp_path / "broken" / "config.yaml"), tmp_path / "broken", resume=True, **quiet)
    assert resumed.start_step == 10
    resumed.train()
    whole, _, _ = load_checkpoint(dict(list_checkpoints(tmp_path / "whole"))[20])
    again, _, _ = load_checkpoint(dict(list_checkpoints(tmp_path / "broken"))[20])
    tuned = [k for k in whole if k.startswith("backbone.")]
    assert tuned and all(k.startswith("backbone.layers.") for k in tuned)  # only the tuned layers are stored
    for key in tuned:
        assert torch.equal(whole[key], again[key]), key


def test_the_cache_never_mixes_two_encoders(keyword_run, tiny_encoder_dir, tmp_path):
    from metalab.engine.adapter import run_encoder
    from metalab.engine.trainer import load_trained

    root, _ = keyword_run
    config, _, _ = load_trained(root / "run")
    tuned, base = run_encoder(config), SentenceEncoder(tiny_encoder_dir)
    texts = ["play the piano please", "my violin now"]
    a = encode_texts(base, texts, EmbeddingCache(base.model_id, tmp_path), progress=False)
    b = encode_texts(tuned, texts, EmbeddingCache(tuned.model_id, tmp_path), progress=False)
    assert tuned.model_id != base.model_id and not torch.allclose(a, b, atol=1e-3)
    assert torch.allclose(b, tuned.encode(texts), atol=1e-6)  # its own vectors, not the frozen model's
    other = SentenceEncoder(tiny_encoder_dir, tuned={k: v + 1e-3 for k, v in tuned.tuned.items()})
    assert other.model_id != tuned.model_id  # other weights, another key


def test_served_tuned_run_predicts_as_metalab_predict(keyword_run, tmp_path):
    """The meta-trained run through the service and through an adapter file (what `metalab predict` reads)."""
    import httpx

    from metalab.engine.adapter import Adapter, adapt_from_file
    from metalab.serve.app import create_app
    from metalab.serve.model import ServedRun
    from metalab.serve.server import BackgroundServer
    from metalab.store.registry import Registry

    root, _ = keyword_run
    rows = [("n0", "piano please now"), ("n0", "violin for me"), ("n1", "guitar today"), ("n1", "trumpet again"),
            ("n2", "flute quickly"), ("n2", "drum just")]
    support = write_csv(tmp_path / "s.csv", [(t, l) for l, t in rows], "text,label")
    queries = ["could you piano", "the trumpet now", "hey drum okay", "some violin"]
    for head in ("algorithm", "logistic"):
        path = adapt_from_file(root / "run", support, head=head).save(tmp_path / f"{head}.safetensors")
        want = Adapter.load(path).predict(queries)
        db = tmp_path / f"{head}.sqlite"
        key = Registry(db).create_key("alice")
        served = ServedRun(root / "run")
        with BackgroundServer(create_app(root / "run", db, rate_limit=0, served=served)) as server, \
                httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            made = c.post("/v1/adapters", json={"name": "x", "head": head,
                                                "examples": [{"label": l, "text": t} for l, t in rows]})
            assert made.status_code == 201, made.text
            got = c.post(f"/v1/adapters/{made.json()['id']}/predict", json={"texts": queries}).json()["predictions"]
        assert [g["label"] for g in got] == [w.label for w in want]
        for g, w in zip(got, want):
            assert max(abs(g["scores"][k] - w.scores[k]) for k in w.scores) < 1e-5


def test_bad_tuned_runs_are_one_clear_line(tiny_encoder_dir, tmp_path):
    data = write_csv(tmp_path / "i.csv", intent_rows())
    with pytest.raises(ConfigError, match="train.tune_encoder meta-trains a sentence encoder, and data.source='omniglot' is not text"):
        RunConfig.from_dict({"train": {"tune_encoder": 2}})
    with pytest.raises(ConfigError, match="'maml' does not have; use --algo protonet, r2d2 or matchingnet"):
        RunConfig.from_dict({"data": {"source": str(data)}, "train": {"algo": "maml", "tune_encoder": 1}})
    with pytest.raises(ConfigError, match=r"train.tune_encoder=0 is invalid; give a number of top transformer layers"):
        RunConfig.from_dict({"data": {"source": str(data)}, "train": {"tune_encoder": 0}})
    cfg = tuned_config(data, tiny_encoder_dir, tune_encoder=3, ways=2)
    cfg.data.test_domains = ["fun"]
    with pytest.raises(ConfigError, match=r"train.tune_encoder=3 is invalid; give a number of top layers from 1 to 2"):
        MetaTrainer(cfg, tmp_path / "run", show_progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    # an intent with fewer texts than shots + queries, an empty text, a missing column
    short = write_csv(tmp_path / "short.csv", keyword_rows() + [("piano drum", "t99", "seen"), ("drum", "t99", "seen"),
                                                                 ("drum please", "t99", "seen")])
    with pytest.raises(DataError, match="Class 't99' of source 'short:train' has 3 examples but 2-shot 4-query episodes need 6"):
        MetaTrainer(tuned_config(short, tiny_encoder_dir), tmp_path / "r2", show_progress=False, log=lambda m: None)
    single = write_csv(tmp_path / "single.csv", keyword_rows() + [("piano piano", "n9", "new")])
    with pytest.raises(DataError, match="single.csv': label 'n9' has 1 example"):
        MetaTrainer(tuned_config(single, tiny_encoder_dir), tmp_path / "r5", show_progress=False, log=lambda m: None)
    empty = write_csv(tmp_path / "empty.csv", [("hi there", "a", "x"), (" ", "a", "x"), ("yo", "b", "x")])
    with pytest.raises(DataError, match=r"empty.csv' line 3: the 'text' field is empty"):
        MetaTrainer(tuned_config(empty, tiny_encoder_dir), tmp_path / "r3", show_progress=False, log=lambda m: None)
    nolabel = write_csv(tmp_path / "nolabel.csv", [("hi", "x")], "text,domain")
    with pytest.raises(DataError, match=r"nolabel.csv' has no 'label' column"):
        MetaTrainer(tuned_config(nolabel, tiny_encoder_dir), tmp_path / "r4", show_progress=False, log=lambda m: None)


def test_a_run_without_meta_test_classes_trains_and_says_how_to_evaluate(tiny_encoder_dir, tmp_path):
    from metalab.engine.eval_run import evaluate_run

    data = write_csv(tmp_path / "k.csv", keyword_rows())
    cfg = tuned_config(data, tiny_encoder_dir, steps=2)
    cfg.data.test_domains = []
    trainer = MetaTrainer(cfg, tmp_path / "run", show_progress=False, log=lambda m: None)
    assert trainer.splits.test is None and trainer.splits.val is None and trainer.splits.train.num_classes == 16
    trainer.train()
    with pytest.raises(DataError, match="This split has no meta-test classes"):
        evaluate_run(tmp_path / "run", show_progress=False)
    with pytest.raises(DataError, match="no meta-test classes"):
        MetaTrainer(cfg, tmp_path / "run2", show_progress=False, log=lambda m: None, check_eval=True)


def test_hwu64_is_bundled_with_its_parts_and_scenarios():
    corpus = load_hwu64()
    assert corpus.num_classes == 64 and len(corpus.domain_names) == 18
    assert corpus.parts.count("train") == 9960 and corpus.parts.count("test") == 1076
    assert not set(corpus.texts[:9960]) & set(corpus.texts[9960:])  # no test text in train
    assert corpus.domain_names[int(corpus.class_domains[corpus.class_names.index("alarm_set")])] == "alarm"


def test_adapt_defaults_to_logistic_with_names_and_predict_reads_files_and_scores(keyword_run, tmp_path):
    import json
    import subprocess
    import sys

    from test_text import ENV

    root, _ = keyword_run
    rows = [("piano please now", "n0"), ("violin for me", "n0"), ("guitar today", "n1"), ("trumpet again", "n1")]
    support = write_csv(tmp_path / "s.csv", rows, "text,label")

    def metalab(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "metalab", *args], capture_output=True, text=True, env=ENV,
                              timeout=240, input=stdin)

    out = metalab("adapt", "--run", str(root / "run"), "--support", str(support), "--out", str(tmp_path / "a.safetensors"))
    assert out.returncode == 0, out.stderr
    assert "(head: logistic + label names;" in out.stdout
    labelled = write_csv(tmp_path / "l.csv", [("could you piano", "n0"), ("the trumpet now", "n1"), ("guitar", "n1")], "text,label")
    out = metalab("predict", "--adapter", str(tmp_path / "a.safetensors"), "--labelled", str(labelled), "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["examples"] == 3 and 0 <= record["accuracy"] <= 1 and "macro_f1" in record
    out = metalab("predict", "--adapter", str(tmp_path / "a.safetensors"), "--input", "-", "--json", stdin="some violin\n\nhey drum\n")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["text"] for line in out.stdout.splitlines()] == ["some violin", "hey drum"]
    bad = write_csv(tmp_path / "bad.csv", [("piano", "n7")], "text,label")
    out = metalab("predict", "--adapter", str(tmp_path / "a.safetensors"), "--labelled", str(bad))
    assert out.returncode != 0 and "has label(s) ['n7'] the adapter was not adapted to" in out.stderr


def test_norm_bias_tuning_moves_only_layer_norms_and_biases(tiny_encoder_dir, tmp_path):
    data = write_csv(tmp_path / "k.csv", keyword_rows())
    trainer = MetaTrainer(tuned_config(data, tiny_encoder_dir, steps=5, tune_params="norm-bias"), tmp_path / "run",
                          show_progress=False, log=lambda m: None)
    before = {k: v.clone() for k, v in trainer.algorithm.backbone.layers.state_dict().items()}
    trainer.train()
    after = trainer.algorithm.backbone.layers.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("LayerNorm" in k or k.endswith(".bias") for k in moved), sorted(moved)
    assert any(k.endswith("query.weight") for k in before) and not any(k.endswith(".weight") and "LayerNorm" not in k
                                                                         for k in moved)
    with pytest.raises(ConfigError, match="train.tune_params='some' is unknown"):
        RunConfig.from_dict({"train": {"tune_params": "some"}})


def test_protonet_metric_scale_sharpens_scores_and_keeps_their_ranking():
    from metalab.algorithms import build_algorithm
    from metalab.models import build_backbone

    torch.manual_seed(0)
    support, query = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1), torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    plain, scaled = (build_algorithm("protonet", build_backbone("identity", (8,)), {"metric_scale": s}).eval() for s in (1.0, 10.0))
    a, b = plain(support, labels, query), scaled(support, labels, query)
    assert torch.allclose(b, 10 * a, atol=1e-5) and torch.equal(a.argmax(-1), b.argmax(-1))
    assert b.softmax(-1).max(-1).values.mean() > a.softmax(-1).max(-1).values.mean()
    with pytest.raises(ConfigError, match="metric_scale=0 is invalid"):
        build_algorithm("protonet", build_backbone("identity", (8,)), {"metric_scale": 0})


def test_text_parts_keep_only_the_named_parts_of_a_file():
    from metalab.data.catalog import load_text_corpus

    train = load_text_corpus("hwu64", parts=["train"])
    assert len(train.texts) == 9960 and set(train.parts) == {"train"} and train.num_classes == 64
    with pytest.raises(DataError, match=r"data.text_parts \['dev'\] are not parts of 'hwu64'; its parts are \['test', 'train'\]"):
        load_text_corpus("hwu64", parts=["dev"])
