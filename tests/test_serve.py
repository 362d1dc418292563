"""`metalab serve`: the real server on 127.0.0.1 (random ports), driven over HTTP.

Adapter lifecycle, predictions equal to the library's, restart with nothing lost, tenant isolation,
bad inputs (4xx naming the field, nothing written), concurrency, rate and size limits, registry
migrations, and a schemathesis run against the OpenAPI spec. A tiny random sentence encoder
stands in for MiniLM (tests only)."""

import base64
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from metalab.engine import MetaTrainer, RunConfig
from metalab.engine.adapter import Adapter
from metalab.errors import ConfigError, DataError
from metalab.serve.app import create_app
from metalab.serve.limits import Limits
from metalab.serve.model import ServedRun
from metalab.store.registry import MIGRATIONS, SCHEMA_VERSION, Registry
from metalab.serve.server import BackgroundServer
from test_text import intent_rows, write_csv

SUPPORT = [("balance", "what is my balance"), ("balance", "how much money do i have"),
           ("transfer", "send money to mom"), ("transfer", "wire money abroad"),
           ("weather", "will it rain today"), ("weather", "what is the weather")]
QUERIES = ["check my account balance", "transfer cash to my brother", "is it sunny tomorrow", "play some jazz"]


def examples(rows=SUPPORT):
    return [{"label": label, "text": text} for label, text in rows]


@pytest.fixture(scope="module")
def text_run(tiny_encoder_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-text")
    data = write_csv(root / "intents.csv", intent_rows())
    cfg = RunConfig.from_dict({"data": {"source": str(data), "encoder": str(tiny_encoder_dir), "encoder_layers": None,
                                        "test_domains": ["fun"], "val_fraction": 0.25},
                               "train": {"algo": "protonet", "ways": 2, "shots": 1, "queries": 2, "steps": 5,
                                         "val_every": 100, "device": "cpu"}})
    MetaTrainer(cfg, root / "run", show_progress=False, log=lambda m: None).train()
    return root / "run"


@pytest.fixture(scope="module")
def served_text(text_run):
    return ServedRun(text_run)


@pytest.fixture()
def service(served_text, tmp_path):
    """A live server over the text run with a fresh registry and keys for two tenants."""
    db = tmp_path / "registry.sqlite"
    registry = Registry(db)
    keys = {"alice": registry.create_key("alice"), "bob": registry.create_key("bob")}
    with BackgroundServer(create_app(served_text.run_dir, db, rate_limit=0, served=served_text)) as server:
        yield server, keys, db


def client(server, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def rows(db, table):
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


# ---- lifecycle and equality with the library ------------------------------------------------------

def test_adapter_lifecycle(service):
    server, keys, db = service
    with client(server, keys["alice"]) as c:
        assert c.get("/healthz").json()["modality"] == "text"
        created = c.post("/v1/adapters", json={"name": "bank", "examples": examples()})
        assert created.status_code == 201, created.text
        ad = created.json()
        assert ad["labels"] == ["balance", "transfer", "weather"] and ad["examples"] == 6 and ad["version"] == 1
        assert c.get(f"/v1/adapters/{ad['id']}").json() == ad
        assert [a["id"] for a in c.get("/v1/adapters").json()["adapters"]] == [ad["id"]]
        later = [c.post("/v1/adapters", json={"name": f"n{i}", "examples": examples()}).json()["id"] for i in range(3)]
        # listed oldest first, also when made within the same second (ids are random)
        assert [a["id"] for a in c.get("/v1/adapters").json()["adapters"]] == [ad["id"], *later]
        for other in later:
            assert c.delete(f"/v1/adapters/{other}").status_code == 204

        before = c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": ["play some jazz"]}).json()
        assert set(before["predictions"][0]["scores"]) == {"balance", "transfer", "weather"}
        more = c.post(f"/v1/adapters/{ad['id']}/examples",
                      json={"examples": [{"label": "music", "text": "play some jazz"}, {"label": "music", "text": "put on my playlist"}]})
        assert more.status_code == 200, more.text
        assert more.json()["labels"][-1] == "music" and more.json()["examples"] == 8 and more.json()["version"] == 2
        after = c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": ["play some jazz"], "top_k": 2}).json()
        assert after["version"] == 2 and after["predictions"][0]["label"] == "music"
        assert len(after["predictions"][0]["scores"]) == 2  # top_k, highest first
        scores = list(after["predictions"][0]["scores"].values())
        assert scores == sorted(scores, reverse=True)

        assert c.delete(f"/v1/adapters/{ad['id']}").status_code == 204
        for method, path in (("GET", ""), ("POST", "/predict"), ("DELETE", "")):
            r = c.request(method, f"/v1/adapters/{ad['id']}{path}", json={"texts": ["x"]} if method == "POST" else None)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert c.get("/v1/adapters").json()["adapters"] == []
    assert rows(db, "examples") == 0  # deleted with their adapter


@pytest.mark.parametrize("head", ["algorithm", "logistic", "prototypes"])
def test_predictions_equal_the_library(service, served_text, head):
    from metalab.models.text_encoder import encode_texts

    server, keys, _ = service
    with client(server, keys["alice"]) as c:
        ad = c.post("/v1/adapters", json={"name": "x", "examples": examples(), "head": head, "threshold": 0.5}).json()
        got = c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": QUERIES}).json()["predictions"]
    labels = ["balance", "transfer", "weather"]
    x = encode_texts(served_text._encoder, [t for _, t in SUPPORT], progress=False)
    y = torch.tensor([labels.index(l) for l, _ in SUPPORT])
    want = Adapter(served_text.run_dir, x, y, labels, head, 0.5).predict(QUERIES)
    assert [p["label"] for p in got] == [p.label for p in want]
    assert [p["out_of_scope"] for p in got] == [p.out_of_scope for p in want]
    for g, w in zip(got, want):
        assert g["scores"].keys() == w.scores.keys()
        assert max(abs(g["scores"][k] - w.scores[k]) for k in w.scores) < 1e-5


def test_label_names_and_lexical_weight_equal_the_library(service, served_text):
    """The options `metalab adapt` has (--names-as-examples, --lexical-weight) work over HTTP too,
    stored with the adapter and kept when examples are added."""
    from metalab.models.text_encoder import encode_texts

    server, keys, _ = service
    options = {"names_as_examples": True, "lexical_weight": 0.5}
    music = [("music", "play some jazz"), ("music", "put on my playlist")]
    with client(server, keys["alice"]) as c:
        plain = c.post("/v1/adapters", json={"name": "plain", "examples": examples(), "head": "logistic"}).json()
        ad = c.post("/v1/adapters", json={"name": "x", "examples": examples(), "head": "logistic", **options}).json()
        assert {k: ad[k] for k in options} == options and {k: plain[k] for k in options} == {"names_as_examples": False, "lexical_weight": 0.0}
        got = c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": QUERIES}).json()["predictions"]
        base = c.post(f"/v1/adapters/{plain['id']}/predict", json={"texts": QUERIES}).json()["predictions"]
        more = c.post(f"/v1/adapters/{ad['id']}/examples", json={"examples": examples(music)}).json()
        assert {k: more[k] for k in options} == options and more["version"] == 2
        got_more = c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": QUERIES}).json()["predictions"]

    def library(rows, labels):
        texts = [t for _, t in rows] + labels  # the names (no underscores here) as one more example each
        x = encode_texts(served_text._encoder, texts, progress=False)
        y = torch.tensor([labels.index(l) for l, _ in rows] + list(range(len(labels))))
        return Adapter(served_text.run_dir, x, y, labels, "logistic", support_texts=texts, lexical_weight=0.5).predict(QUERIES)

    for served, want in ((got, library(SUPPORT, ["balance", "transfer", "weather"])),
                         (got_more, library(SUPPORT + music, ["balance", "transfer", "weather", "music"]))):
        assert [p["label"] for p in served] == [p.label for p in want]
        for g, w in zip(served, want):
            assert max(abs(g["scores"][k] - w.scores[k]) for k in w.scores) < 1e-5
    # the options change the scores (names and n-grams are evidence the plain adapter lacks)
    assert max(abs(g["scores"][k] - b["scores"][k]) for g, b in zip(got, base) for k in b["scores"]) > 0.01


def test_restart_serves_the_same_adapters(served_text, tmp_path):
    db = tmp_path / "registry.sqlite"
    registry = Registry(db)
    keys = {"alice": registry.create_key("alice"), "bob": registry.create_key("bob")}

    def snapshot(server):
        out = {}
        for tenant, key in keys.items():
            with client(server, key) as c:
                for ad in c.get("/v1/adapters").json()["adapters"]:
                    out[(tenant, ad["id"])] = (ad, c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": QUERIES}).json())
        return out

    with BackgroundServer(create_app(served_text.run_dir, db, rate_limit=0, served=served_text)) as server:
        for tenant, key in keys.items():
            with client(server, key) as c:
                for head, options in (("algorithm", {}), ("logistic", {"names_as_examples": True, "lexical_weight": 0.2})):
                    ad = c.post("/v1/adapters", json={"name": f"{tenant}-{head}", "examples": examples(), "head": head,
                                                      **options}).json()
                c.post(f"/v1/adapters/{ad['id']}/examples", json={"examples": [{"label": "music", "text": "play jazz"}]})
        first = snapshot(server)
    assert len(first) == 4
    # a new process state: the run loaded again, the registry opened again, no fitted adapter in memory
    with BackgroundServer(create_app(served_text.run_dir, db, rate_limit=0, served=ServedRun(served_text.run_dir))) as server:
        assert snapshot(server) == first


def test_cli_serve_restart_and_keys(text_run, tmp_path):
    """`metalab keys create` + `metalab serve --port 0` in a real process, stopped with SIGTERM and started again."""
    db = tmp_path / "registry.sqlite"
    env = {**os.environ, "COLUMNS": "200"}
    made = subprocess.run([sys.executable, "-m", "metalab", "keys", "create", "carol", "--db", str(db)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("mlk_") and key not in db.read_bytes().decode("latin-1")  # stored hashed only

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "metalab", "serve", "--run", str(text_run), "--db", str(db),
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = proc.stdout.readline()
        assert "metalab serve: http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        return proc, line.split("http://")[1].split("/")[0]

    proc, address = start()
    try:
        with httpx.Client(base_url=f"http://{address}", headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            ad = c.post("/v1/adapters", json={"name": "c", "examples": examples()}).json()
            before = c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": QUERIES}).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    proc, address = start()
    try:
        with httpx.Client(base_url=f"http://{address}", headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            assert c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": QUERIES}).json() == before
            assert c.get("/").status_code == 200 and "metalab" in c.get("/").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    revoked = subprocess.run([sys.executable, "-m", "metalab", "keys", "revoke", key[:12], "--db", str(db)],
                             capture_output=True, text=True, env=env, timeout=60)
    assert revoked.returncode == 0 and Registry(db).tenant_for_key(key) is None


# ---- tenants and keys -----------------------------------------------------------------------------

def test_tenants_never_see_each_others_adapters(service):
    server, keys, db = service
    with client(server, keys["alice"]) as alice, client(server, keys["bob"]) as bob:
        ad = alice.post("/v1/adapters", json={"name": "secret", "examples": examples()}).json()
        missing = bob.get("/v1/adapters/ad_0000000000000000")
        for method, path, body in (("GET", "", None), ("DELETE", "", None), ("POST", "/predict", {"texts": ["hi"]}),
                                   ("POST", "/examples", {"examples": [{"label": "x", "text": "y"}]})):
            r = bob.request(method, f"/v1/adapters/{ad['id']}{path}", json=body)
            assert r.status_code == 404, (method, path, r.text)
            # the same answer as for an id that does not exist (apart from the id itself)
            assert r.json()["error"]["message"].replace(ad["id"], "ID") == missing.json()["error"]["message"].replace("ad_0000000000000000", "ID")
        assert bob.get("/v1/adapters").json()["adapters"] == []
        assert alice.get(f"/v1/adapters/{ad['id']}").json()["examples"] == 6  # untouched by bob's attempts
    for headers in ({}, {"Authorization": "Bearer mlk_wrong"}, {"X-API-Key": "nope"}):
        r = httpx.get(f"{server.url}/v1/adapters", headers=headers)
        assert r.status_code == 401 and "metalab keys create" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/adapters", headers={"X-API-Key": keys["bob"]}).status_code == 200
    Registry(db).revoke_key(keys["bob"])
    assert httpx.get(f"{server.url}/v1/adapters", headers={"X-API-Key": keys["bob"]}).status_code == 401


# ---- bad input --------------------------------------------------------------------------------------

LONG = "x" * 2001
BAD_CREATES = [
    ({"name": "a", "examples": [{"label": "a", "text": 5}, {"label": "b", "text": "y"}]}, "examples.0.text"),
    ({"name": "a", "examples": []}, "examples"),
    ({"name": "a", "examples": "nope"}, "examples"),
    ({"name": "a", "labels": ["a", "b"], "examples": [{"label": "a", "text": "hi"}]}, "labels.1"),
    ({"name": "a", "labels": ["a", "b"], "examples": [{"label": "a", "text": "hi"}, {"label": "c", "text": "x"}]}, "examples.1.label"),
    ({"name": "a", "examples": [{"label": "a", "text": "hi"}]}, "examples"),  # one label only
    ({"name": "a", "examples": [{"label": "a", "text": LONG}, {"label": "b", "text": "y"}]}, "examples.0.text"),
    ({"name": "a", "examples": [{"label": "a", "text": "   "}, {"label": "b", "text": "y"}]}, "examples.0.text"),
    ({"name": "a", "examples": [{"label": "a", "image": "aGVsbG8="}, {"label": "b", "text": "y"}]}, "examples.0.text"),
    ({"name": "a", "examples": [{"label": "", "text": "x"}, {"label": "b", "text": "y"}]}, "examples.0.label"),
    ({"name": "a", "examples": [{"label": "a", "text": "x"}] * 2001}, "examples"),
    ({"examples": examples()}, "name"),
    ({"name": "a", "examples": examples(), "colour": "red"}, "colour"),
    ({"name": "a", "examples": examples(), "head": "svm"}, "head"),
    ({"name": "a", "examples": examples(), "threshold": "high"}, "threshold"),
    ({"name": "a", "examples": examples(), "lexical_weight": -0.1}, "lexical_weight"),
    ({"name": "a", "examples": examples(), "lexical_weight": 1e9}, "lexical_weight"),
    ({"name": "a", "examples": examples(), "names_as_examples": "yes"}, "names_as_examples"),
]


@pytest.mark.parametrize("body,field", BAD_CREATES)
def test_bad_creates_name_the_field_and_write_nothing(service, body, field):
    server, keys, db = service
    with client(server, keys["alice"]) as c:
        r = c.post("/v1/adapters", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and field.split(".")[0] in error["message"], error
    assert rows(db, "adapters") == 0 and rows(db, "examples") == 0


def test_bad_predictions_and_additions(service):
    server, keys, db = service
    with client(server, keys["alice"]) as c:
        ad = c.post("/v1/adapters", json={"name": "a", "examples": examples()}).json()
        url = f"/v1/adapters/{ad['id']}"
        cases = [({"texts": []}, "texts"), ({"texts": [LONG]}, "texts.0"), ({"texts": ["ok", " "]}, "texts.1"),
                 ({"images": ["aGVsbG8="]}, "texts"), ({"texts": ["x"] * 257}, "texts"), ({"texts": ["x"], "top_k": 0}, "top_k"),
                 ({}, "texts"), ({"texts": "just a string"}, "texts")]
        for body, field in cases:
            r = c.post(url + "/predict", json=body)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, (body, r.text)
        r = c.post(url + "/examples", json={"examples": [{"label": "music", "text": ""}]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "examples.0.text"
        r = c.post(url + "/predict", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
        assert c.get(url).json()["version"] == 1 and c.get(url).json()["examples"] == 6  # nothing half-added
    assert rows(db, "examples") == 6


def test_body_size_and_rate_limits(served_text, tmp_path):
    db = tmp_path / "r.sqlite"
    key = Registry(db).create_key("alice")
    app = create_app(served_text.run_dir, db, rate_limit=2, max_body=20_000, served=served_text)
    with BackgroundServer(app) as server, client(server, key) as c:
        big = {"name": "a", "examples": [{"label": f"l{i % 2}", "text": "y" * 1000} for i in range(30)]}
        r = c.post("/v1/adapters", json=big)
        assert r.status_code == 413 and "byte limit" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit still holds
            for _ in range(30):
                yield b"x" * 1000
        r = c.post("/v1/adapters", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert rows(db, "adapters") == 0
        codes = [c.get("/v1/adapters").status_code for _ in range(8)]  # bucket of 4, refilling at 2/s
        assert 429 in codes and codes[0] == 200
        r = c.get("/v1/adapters")
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and "Rate limit" in r.json()["error"]["message"]


# ---- concurrency ----------------------------------------------------------------------------------

def test_concurrent_clients_lose_nothing(service):
    server, keys, db = service
    registry = Registry(db)
    tenant_keys = [registry.create_key(f"tenant-{i}") for i in range(4)] * 2  # 8 clients, 2 per tenant
    errors, made = [], []

    def work(key, n):
        try:
            with client(server, key) as c:
                for j in range(3):
                    r = c.post("/v1/adapters", json={"name": f"c{n}-{j}", "examples": examples()})
                    assert r.status_code == 201, r.text
                    made.append((key, r.json()["id"]))
                    p = c.post(f"/v1/adapters/{r.json()['id']}/predict", json={"texts": QUERIES})
                    assert p.status_code == 200 and len(p.json()["predictions"]) == len(QUERIES), p.text
                    a = c.post(f"/v1/adapters/{r.json()['id']}/examples", json={"examples": [{"label": "music", "text": f"song {n} {j}"}]})
                    assert a.status_code == 200 and a.json()["examples"] == 7, a.text
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k, n)) for n, k in enumerate(tenant_keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert len(made) == 24 and rows(db, "adapters") == 24 and rows(db, "examples") == 24 * 7
    for key in set(tenant_keys):
        with client(server, key) as c:
            listed = {a["id"] for a in c.get("/v1/adapters").json()["adapters"]}
        assert listed == {i for k, i in made if k == key} and len(listed) == 6


# ---- registry --------------------------------------------------------------------------------------

def test_registry_migrates_old_files_and_refuses_newer(tmp_path):
    old = tmp_path / "v1.sqlite"
    with sqlite3.connect(old) as conn:  # a file as the first release wrote it
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied TEXT NOT NULL)")
        conn.executescript(MIGRATIONS[0][1])
        conn.execute("INSERT INTO schema_version VALUES (1, 'x', 'then')")
    Registry(tmp_path / "scratch.sqlite")  # the hashing is the registry's own
    from metalab.store.registry import hash_key

    with sqlite3.connect(old) as conn:
        conn.execute("INSERT INTO tenants (name, created) VALUES ('acme', 'then')")
        conn.execute("INSERT INTO api_keys (tenant_id, key_hash, prefix, created) VALUES (1, ?, 'mlk_old', 'then')", (hash_key("mlk_old-key"),))
    registry = Registry(old)
    assert registry.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
    assert registry.tenant_for_key("mlk_old-key").name == "acme"  # data kept across the migration
    assert registry.list_adapters(registry.tenant_for_key("mlk_old-key"), "run") == []
    with sqlite3.connect(old) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("INSERT INTO schema_version VALUES (99, 'future', 'later')")
    with pytest.raises(ConfigError, match="newer than this metalab"):
        Registry(old)

    v2 = tmp_path / "v2.sqlite"  # adapters stored before the text options existed keep working, options off
    with sqlite3.connect(v2) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied TEXT NOT NULL)")
        for version in (1, 2):
            conn.executescript(MIGRATIONS[version - 1][1])
            conn.execute("INSERT INTO schema_version VALUES (?, 'x', 'then')", (version,))
        conn.execute("INSERT INTO tenants (name, created) VALUES ('acme', 'then')")
        conn.execute("INSERT INTO adapters VALUES ('ad_1', 1, 'run', 'old', 'text', 'logistic', NULL, '[\"a\", \"b\"]', 3, 'then', 'then')")
        conn.execute("INSERT INTO examples (adapter_id, label, text, features, added_in) VALUES ('ad_1', 'a', 'hi', x'00', 1)")
    registry = Registry(v2)
    from metalab.store.registry import Tenant

    record = registry.get_adapter(Tenant(1, "acme"), "run", "ad_1")
    assert (record.labels, record.version, record.examples) == (["a", "b"], 3, 1)
    assert (record.names_as_examples, record.lexical_weight) == (False, 0.0)


# ---- images -------------------------------------------------------------------------------------------

def png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def bytes_run(tmp_path_factory):
    """A run trained on an .npz of uint8 arrays [2, 3] (the weights barely matter)."""
    root = tmp_path_factory.mktemp("serve-array")
    x = np.random.default_rng(0).integers(0, 256, size=(72, 2, 3)).astype(np.uint8)
    np.savez(root / "bytes.npz", x=x, y=np.repeat(np.arange(6), 12))
    cfg = RunConfig.from_dict({"data": {"source": str(root / "bytes.npz")},
                               "train": {"algo": "protonet", "backbone": "mlp", "ways": 2, "shots": 1, "queries": 2,
                                         "steps": 2, "val_every": 100, "device": "cpu"}})
    MetaTrainer(cfg, root / "run", show_progress=False, log=lambda m: None).train()
    return root / "run"


def test_array_run_takes_numbers_as_its_npz_held_them(bytes_run, tmp_path):
    """A run trained on an .npz is served with arrays of numbers (flat, row-major); a uint8 run takes
    whole numbers 0-255, which the model scales as it did in training."""
    db = tmp_path / "r.sqlite"
    key = Registry(db).create_key("alice")
    low, high = [[10, 20, 30, 40, 50, 60], [11, 19, 31, 42, 49, 61]], [[250, 240, 230, 220, 210, 200], [251, 239, 231, 219, 211, 201]]
    support = [{"label": "low", "array": v} for v in low] + [{"label": "high", "array": v} for v in high]
    with BackgroundServer(create_app(bytes_run, db, rate_limit=0)) as server, client(server, key) as c:
        health = c.get("/healthz").json()
        assert health["modality"] == "array" and health["input_shape"] == [2, 3]
        ad = c.post("/v1/adapters", json={"name": "bytes", "examples": support, "head": "prototypes"})
        assert ad.status_code == 201, ad.text
        ad_id = ad.json()["id"]
        got = c.post(f"/v1/adapters/{ad_id}/predict", json={"arrays": [[248, 238, 229, 221, 212, 199], [12, 21, 29, 41, 52, 58]]})
        assert got.status_code == 200, got.text
        got = got.json()["predictions"]
        assert [p["label"] for p in got] == ["high", "low"]
        for body, field, says in (
                ({"arrays": [[1, 2, 3]]}, "arrays.0", "has 3 numbers; this run takes 6 (an input of shape [2, 3]"),
                ({"arrays": [[1, 2, 3, 4, 5, 6], [0.5, 2, 3, 4, 5, 6]]}, "arrays.1", "trained on uint8 arrays"),
                ({"arrays": [[1, 2, 3, 4, 5, 300]]}, "arrays.0", "whole ones from 0 to 255"),
                ({"texts": ["a"]}, "arrays", "takes array inputs; send them as 'arrays'")):
            bad = c.post(f"/v1/adapters/{ad_id}/predict", json=body)
            assert bad.status_code == 422 and bad.json()["error"]["field"] == field and says in bad.json()["error"]["message"], bad.text
        bad = c.post("/v1/adapters", json={"name": "x", "examples": support[:3] + [{"label": "high", "array": [1, 2]}]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "examples.3.array", bad.text
        bad = c.post("/v1/adapters", json={"name": "x", "examples": support[:3] + [{"label": "high", "text": "hi"}]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "examples.3.array", bad.text
        more = c.post(f"/v1/adapters/{ad_id}/examples", json={"examples": [{"label": "mid", "array": [128] * 6}]})
        assert more.status_code == 200 and more.json()["labels"] == ["low", "high", "mid"], more.text
        assert c.post(f"/v1/adapters/{ad_id}/predict", json={"arrays": [[127] * 6]}).json()["predictions"][0]["label"] == "mid"
        models = c.get("/openapi.json").json()["components"]["schemas"]
        assert set(models["ExampleIn"]["properties"]) == {"label", "array"} and "arrays" in models["PredictIn"]["required"]
    assert rows(db, "adapters") == 1 and rows(db, "examples") == 5
    # the library on the same numbers as uint8 tensors gives the service's scores
    want = Adapter(bytes_run, torch.tensor(low + high, dtype=torch.uint8).reshape(4, 2, 3), torch.tensor([0, 0, 1, 1]),
                   ["low", "high"], head="prototypes").predict(torch.tensor([[248, 238, 229, 221, 212, 199]], dtype=torch.uint8).reshape(1, 2, 3))
    assert want[0].label == "high" and abs(want[0].scores["high"] - got[0]["scores"]["high"]) < 1e-4


def test_image_run_adapters(tmp_path, omniglot):
    cfg = RunConfig.from_dict({"train": {"algo": "maml", "ways": 3, "shots": 1, "queries": 2, "steps": 2, "val_every": 100,
                                         "val_episodes": 4, "device": "cpu"}})  # the run only has to exist
    MetaTrainer(cfg, tmp_path / "run", show_progress=False, log=lambda m: None).train()
    db = tmp_path / "r.sqlite"
    key = Registry(db).create_key("alice")
    pick = torch.cat([torch.nonzero(omniglot.y == c)[:3, 0] for c in range(3)])
    images = omniglot.x[pick, 0].numpy()  # 3 characters × 3 drawings, ink-high uint8
    labels = omniglot.y[pick].tolist()
    pages = [255 - im for im in images]  # as scanned: dark ink on a light page
    served = ServedRun(tmp_path / "run")
    with BackgroundServer(create_app(tmp_path / "run", db, rate_limit=0, served=served)) as server, client(server, key) as c:
        support = [{"label": f"c{labels[i]}", "image": png(pages[i])} for i in (0, 1, 3, 4, 6, 7)]
        ad = c.post("/v1/adapters", json={"name": "chars", "examples": support})
        assert ad.status_code == 201, ad.text
        got = c.post(f"/v1/adapters/{ad.json()['id']}/predict",
                     json={"images": ["data:image/png;base64," + png(pages[i]) for i in (2, 5, 8)]}).json()["predictions"]
        for i, together in zip((2, 5, 8), got):  # a MAML run: an image alone gets what it gets in the batch
            alone = c.post(f"/v1/adapters/{ad.json()['id']}/predict", json={"images": [png(pages[i])]}).json()["predictions"][0]
            assert alone["label"] == together["label"]
            assert max(abs(alone["scores"][k] - together["scores"][k]) for k in together["scores"]) < 1e-4
        bad = c.post("/v1/adapters", json={"name": "x", "examples": support[:5] + [{"label": "c9", "image": base64.b64encode(b"not a png").decode()}]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "examples.5.image"
        bad = c.post("/v1/adapters", json={"name": "x", "examples": support[:5] + [{"label": "c9", "image": "%%%"}]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "examples.5.image"
        gif = io.BytesIO()
        Image.fromarray(pages[0]).save(gif, format="GIF")
        bad = c.post("/v1/adapters", json={"name": "x", "examples": support[:5] + [
            {"label": "c9", "image": base64.b64encode(gif.getvalue()).decode()}]})
        assert bad.status_code == 422 and "is a GIF image; send PNG or JPEG" in bad.json()["error"]["message"]
        truncated = base64.b64encode(base64.b64decode(png(pages[0]))[:60]).decode()  # a valid header, no pixels
        bad = c.post("/v1/adapters", json={"name": "x", "examples": support[:5] + [{"label": "c9", "image": truncated}]})
        assert bad.status_code == 422 and "not a readable PNG or JPEG" in bad.json()["error"]["message"]
        bad = c.post(f"/v1/adapters/{ad.json()['id']}/predict", json={"texts": ["a"]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "images"
        models = c.get("/openapi.json").json()["components"]["schemas"]  # the spec says what this run takes
        assert "text" not in models["ExampleIn"]["properties"] and "image" in models["ExampleIn"]["required"]
        assert "images" in models["PredictIn"]["required"] and "lexical_weight" not in models["AdapterCreate"]["properties"]
        for option in ({"names_as_examples": True}, {"lexical_weight": 0.1}):
            bad = c.post("/v1/adapters", json={"name": "x", "examples": support, **option})
            assert bad.status_code == 422 and bad.json()["error"]["field"] == next(iter(option)), bad.text
            assert "text runs only" in bad.json()["error"]["message"]
    assert rows(db, "adapters") == 1
    pixels = pages[0].size  # a per-request budget of 5 images' pixels: counted from the headers, before decoding
    with BackgroundServer(create_app(tmp_path / "run", db, served=served, limits=Limits(rate_limit=0, max_request_pixels=5 * pixels))) as server, \
            client(server, key) as c:
        bad = c.post("/v1/adapters", json={"name": "x", "examples": support})
        assert bad.status_code == 413 and bad.json()["error"]["code"] == "over_budget" and bad.json()["error"]["field"] == "examples"
        assert f"hold {6 * pixels} pixels, over the per-request budget of {5 * pixels}" in bad.json()["error"]["message"]
        adapter_id = c.get("/v1/adapters").json()["adapters"][0]["id"]
        bad = c.post(f"/v1/adapters/{adapter_id}/predict", json={"images": [png(pages[i]) for i in range(6)]})
        assert bad.status_code == 413 and bad.json()["error"]["field"] == "images"
        assert c.post(f"/v1/adapters/{adapter_id}/predict", json={"images": [png(pages[i]) for i in range(5)]}).status_code == 200
    assert rows(db, "adapters") == 1
    x = torch.from_numpy(images[[0, 1, 3, 4, 6, 7]][:, None])
    names = list(dict.fromkeys(f"c{labels[i]}" for i in (0, 1, 3, 4, 6, 7)))
    y = torch.tensor([names.index(f"c{labels[i]}") for i in (0, 1, 3, 4, 6, 7)])
    adapter = Adapter(tmp_path / "run", x, y, names)
    want = adapter.predict(torch.from_numpy(images[[2, 5, 8]][:, None]))
    assert [p["label"] for p in got] == [p.label for p in want]
    for i, w in zip((2, 5, 8), want):  # and through the Adapter, one image at a time
        alone = adapter.predict(torch.from_numpy(images[[i]][:, None]))[0]
        assert alone.label == w.label and max(abs(alone.scores[k] - w.scores[k]) for k in w.scores) < 1e-4
    for g, w in zip(got, want):
        assert max(abs(g["scores"][k] - w.scores[k]) for k in w.scores) < 1e-4
    from metalab.engine.adapter import adapt_from_file  # `metalab adapt`'s text options, on an image run

    for option in ({"names_as_examples": True}, {"lexical_weight": 0.1}, {"finetune_epochs": 2}):
        with pytest.raises(ConfigError, match="apply to text runs only"):
            adapt_from_file(tmp_path / "run", tmp_path, **option)

    # `metalab adapt` on a folder of scans, then `metalab predict` on image files: the server's predictions
    for i in range(9):
        folder = tmp_path / ("support" if i % 3 != 2 else "queries") / (f"c{labels[i]}" if i % 3 != 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pages[i]).save(folder / f"{i}.png")
    saved = adapt_from_file(tmp_path / "run", tmp_path / "support").save(tmp_path / "chars.safetensors")
    (tmp_path / "lonely" / "c0").mkdir(parents=True)
    Image.fromarray(pages[0]).save(tmp_path / "lonely" / "c0" / "0.png")
    with pytest.raises(DataError, match="has examples of one label only"):
        adapt_from_file(tmp_path / "run", tmp_path / "lonely")
    queries = [str(tmp_path / "queries" / f"{i}.png") for i in (2, 5, 8)]
    from typer.testing import CliRunner

    from metalab.cli import app

    out = CliRunner().invoke(app, ["predict", "--adapter", str(saved), "--json", *queries])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.output.splitlines()]
    assert [line["image"] for line in lines] == queries and [line["label"] for line in lines] == [p.label for p in want]
    for line, w in zip(lines, want):
        assert max(abs(line["scores"][k] - w.scores[k]) for k in w.scores) < 1e-4
    out = CliRunner().invoke(app, ["predict", "--adapter", str(saved), queries[0], str(tmp_path / "missing.png")])
    assert isinstance(out.exception, DataError) and "missing.png' does not exist" in str(out.exception)  # main() prints it


# ---- OpenAPI fuzzing ---------------------------------------------------------------------------------

def test_openapi_spec_describes_what_this_run_accepts(service):
    """A text run's spec asks for texts only (required, not blank); every request the tests send fits it."""
    import jsonschema_rs  # installed with schemathesis

    server, keys, _ = service
    spec = httpx.get(f"{server.url}/openapi.json").json()
    models = spec["components"]["schemas"]
    example, predict = models["ExampleIn"], models["PredictIn"]
    assert "image" not in example["properties"] and {"label", "text"} <= set(example["required"])
    assert "images" not in predict["properties"] and "texts" in predict["required"]
    assert "lexical_weight" in models["AdapterCreate"]["properties"]
    resolver = {"components": {"schemas": models}}
    check = lambda name, body: jsonschema_rs.validate({**models[name], **resolver}, body)  # noqa: E731
    check("AdapterCreate", {"name": "bank", "examples": examples(), "names_as_examples": True, "lexical_weight": 0.1})
    check("PredictIn", {"texts": QUERIES, "top_k": 2})
    for bad in ({"label": "x", "image": "aGk="}, {"label": "x", "text": "   "}, {"label": " ", "text": "hi"}, {"label": "x"}):
        with pytest.raises(jsonschema_rs.ValidationError):
            check("ExampleIn", bad)
        with client(server, keys["alice"]) as c:  # and the server refuses each, naming the field
            r = c.post("/v1/adapters", json={"name": "x", "examples": examples()[:3] + [bad]})
            assert r.status_code == 422 and r.json()["error"]["field"].startswith("examples.3"), r.text


def test_schemathesis_finds_no_server_error(service, tmp_path):
    """Generated requests never get a 5xx, and (ignored_auth) every /v1 operation refuses requests
    without a key or with a wrong one."""
    server, keys, _ = service
    out = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
                          "--checks", "not_a_server_error,ignored_auth", "-H", f"Authorization: Bearer {keys['alice']}",
                          "--max-examples", "10", "--seed", "1", "--max-time", "45", "--workers", "1",
                          "--request-timeout", "30"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_combining_batcher_gives_each_caller_its_rows():
    from metalab.serve.model import CombiningBatcher

    calls = []

    def encode(texts):
        calls.append(len(texts))
        time.sleep(0.01)  # long enough for other callers to queue up
        if "boom" in texts:
            raise RuntimeError("boom")
        return torch.tensor([[float(t)] for t in texts])

    batcher = CombiningBatcher(encode)
    results, errors = {}, []

    def call(i):
        try:
            results[i] = batcher([str(i), str(i + 1000)])
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert all(results[i].flatten().tolist() == [i, i + 1000] for i in range(16))
    assert sum(calls) == 32 and len(calls) < 16  # some calls were combined
    with pytest.raises(RuntimeError, match="boom"):
        batcher(["boom"])
