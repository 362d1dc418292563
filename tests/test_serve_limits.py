"""`metalab serve` under hostile input and faults, on 127.0.0.1: every cost is bounded before it is
paid, and every error leaves the connection usable (or says it closes it).

Raw sockets where the behaviour is about the connection itself (what is read, when it is closed);
each test opens at most a few dozen loopback connections and waits at most a few seconds."""

import http.client
import json
import socket
import sqlite3
import time

import httpx
import pytest

from metalab.serve.app import create_app
from metalab.serve.limits import Limits
from metalab.serve.server import BackgroundServer
from metalab.store.registry import Registry
from test_serve import client, examples, rows, served_text, text_run  # noqa: F401 - fixtures

BIG = 14_000_000  #: a 14 MB body, as a keyless flood would send


@pytest.fixture()
def make_service(served_text, tmp_path):  # noqa: F811 - the fixture imported above
    """``make_service(**limits) -> (server, key, db)``: a live server over the text run."""
    started = []

    def make(**changes):
        db = tmp_path / f"registry-{len(started)}.sqlite"
        key = Registry(db).create_key("alice")
        app = create_app(served_text.run_dir, db, served=served_text, limits=Limits(rate_limit=0).with_(**changes))
        server = BackgroundServer(app).start()
        started.append(server)
        return server, key, db

    yield make
    for server in started:
        server.stop()


def raw(server, timeout=5.0) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock) -> tuple[int, dict, bytes]:
    """One HTTP response from ``sock``: status, headers (lower-case), body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def closed_within(sock, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (reading and dropping anything it sends), or None."""
    start = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    return None


def post_headers(path: str, length: int, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n").encode()


# ---- authentication before the body ----------------------------------------------------------------

@pytest.mark.parametrize("key", [None, "mlk_not-a-key"])
def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(make_service, key):
    """It used to read and parse the whole body (up to 16 MiB) first: a few keyless 14 MB senders
    pushed /healthz to seconds and the process past 1.5 GB."""
    server, _, _ = make_service()
    sock = raw(server)
    sock.sendall(post_headers("/v1/adapters", BIG, key) + b"{" * 1000)  # 1 kB of the 14 MB declared
    start = time.monotonic()
    status, headers, body = read_response(sock)  # answered without waiting for the rest
    assert time.monotonic() - start < 2
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    assert headers["connection"] == "close" and closed_within(sock, 2) is not None  # said, and done
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_failed_authentication_is_rate_limited_per_client_address(make_service):
    server, key, _ = make_service(auth_failures=2, auth_burst=3)
    with client(server, "mlk_wrong") as c:
        codes = [c.get("/v1/adapters").status_code for _ in range(5)]
    assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429], codes
    with client(server, key) as c:  # the address is held off, whatever key it now sends
        r = c.get("/v1/adapters")
        assert r.status_code == 429 and "failed authentications" in r.json()["error"]["message"]
        assert int(r.headers["Retry-After"]) >= 1
        time.sleep(0.6)  # 2 failures/s: one token back
        assert c.get("/v1/adapters").status_code == 200
    assert httpx.get(server.url + "/healthz").status_code == 200  # no key needed, never limited


def test_an_oversized_body_is_refused_from_its_declared_length_with_the_connection_closed(make_service):
    server, key, db = make_service(max_body=50_000)
    sock = raw(server)
    sock.sendall(post_headers("/v1/adapters", 60_000, key))
    status, headers, body = read_response(sock)
    assert status == 413 and "50000-byte limit" in json.loads(body)["error"]["message"]
    assert headers["connection"] == "close" and closed_within(sock, 2) is not None
    assert rows(db, "adapters") == 0


# ---- the connection after an error -----------------------------------------------------------------

def test_the_connection_stays_usable_after_a_server_error(make_service, served_text, monkeypatch):  # noqa: F811
    """A 500 used to drop the keep-alive connection without a word (uvicorn closes it when the app
    re-raises after answering), so a client's next request on it failed."""
    server, key, _ = make_service()
    monkeypatch.setattr(served_text, "describe", lambda: 1 / 0)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/healthz")
    r = conn.getresponse()
    assert r.status == 500 and json.loads(r.read())["error"]["code"] == "internal"
    first = conn.sock
    conn.request("GET", "/v1/adapters", headers={"Authorization": f"Bearer {key}"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"adapters": []}
    assert conn.sock is first  # the same connection, not a new one
    conn.close()


def test_an_early_refusal_of_a_small_body_keeps_the_connection(make_service):
    server, key, _ = make_service()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    body = json.dumps({"name": "x", "examples": examples()})
    conn.request("POST", "/v1/adapters", body=body, headers={"Content-Type": "application/json", "X-API-Key": "mlk_bad"})
    r = conn.getresponse()
    assert r.status == 401 and r.getheader("connection") != "close"
    r.read()
    first = conn.sock
    conn.request("POST", "/v1/adapters", body=body, headers={"Content-Type": "application/json", "X-API-Key": key})
    r = conn.getresponse()
    assert r.status == 201, r.read()
    assert conn.sock is first
    conn.close()


# ---- slow clients and the connection cap -----------------------------------------------------------

def test_slow_headers_and_slow_bodies_are_disconnected_within_their_timeouts(make_service):
    """No deadline used to apply before a first response: a client that never finished its headers
    (or its body) held a connection, and a task, forever."""
    server, key, _ = make_service(header_timeout=0.6, body_timeout=0.6)
    idle = [raw(server) for _ in range(5)]  # connected, nothing sent
    partial = [raw(server) for _ in range(10)]
    for sock in partial:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")  # the blank line never comes
    trickle = raw(server)  # one header byte every 0.1 s does not extend the deadline
    trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
    slow_body = raw(server)
    slow_body.sendall(post_headers("/v1/adapters", 100, key) + b'{"name"')
    start = time.monotonic()
    while time.monotonic() - start < 0.5:
        trickle.sendall(b"X")
        time.sleep(0.1)
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200  # others are served meanwhile
    for sock in idle + partial + [trickle, slow_body]:
        waited = closed_within(sock, 3)
        assert waited is not None and time.monotonic() - start < 0.6 + 1.5, waited
        sock.close()
    with client(server, key) as c:  # a prompt client on a kept-alive connection is not hurt by the deadlines
        for _ in range(3):
            assert c.get("/v1/adapters").status_code == 200
            time.sleep(0.3)


def test_connections_over_the_cap_are_answered_503_and_closed(make_service):
    server, _, _ = make_service(max_connections=4, header_timeout=30)
    held = [raw(server) for _ in range(4)]
    time.sleep(0.2)
    extra = raw(server)
    status, headers, body = read_response(extra)
    assert status == 503 and json.loads(body)["error"]["code"] == "too_many_connections"
    assert headers["connection"] == "close" and closed_within(extra, 2) is not None
    for sock in held:
        sock.close()
    time.sleep(0.2)
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


# ---- per-request budgets ---------------------------------------------------------------------------

def test_request_budgets_bound_the_work_however_it_arrives(make_service):
    server, key, db = make_service(max_request_chars=300, max_labels=3)
    with client(server, key) as c:
        long = [{"label": f"l{i % 2}", "text": "word " * 20} for i in range(4)]  # 400 characters in all
        r = c.post("/v1/adapters", json={"name": "x", "examples": long})
        assert r.status_code == 413 and r.json()["error"] == {
            "status": 413, "code": "over_budget", "field": "examples",
            "message": "The request's texts hold 400 characters, over the per-request budget of 300 (metalab serve "
                       "--max-request-chars); send fewer or shorter texts per request."}
        four = [{"label": f"label{i}", "text": f"text {i}"} for i in range(4)]  # labels carried by the examples
        r = c.post("/v1/adapters", json={"name": "x", "examples": four})
        assert r.status_code == 422 and r.json()["error"]["field"] == "examples" and "limit of 3" in r.text
        r = c.post("/v1/adapters", json={"name": "x", "examples": four, "labels": [f"label{i}" for i in range(4)]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "labels"
        assert rows(db, "adapters") == 0
        ad = c.post("/v1/adapters", json={"name": "ok", "examples": four[:3]}).json()
        r = c.post(f"/v1/adapters/{ad['id']}/examples", json={"examples": [{"label": "label9", "text": "more"}]})
        assert r.status_code == 422 and "would have 4 labels" in r.text
        r = c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": ["x" * 200, "y" * 200]})
        assert r.status_code == 413 and r.json()["error"]["field"] == "texts"
        assert c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": ["short"]}).status_code == 200
    assert rows(db, "examples") == 3


# ---- a full or read-only disk under the registry ---------------------------------------------------

@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_registry_that_cannot_be_written_is_a_503_and_nothing_else_breaks(make_service, monkeypatch, fault):
    """A full disk used to answer creates with a 500 (or nothing)."""
    server, key, db = make_service()
    connect = Registry._connect

    def faulty(self):  # SQLite's own failure, as on a full disk (no page may be added) or a read-only file
        conn = connect(self)
        if fault == "full":
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        else:
            conn.execute("PRAGMA query_only = ON")
        return conn

    monkeypatch.setattr(Registry, "_connect", faulty)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    big = [{"label": f"l{i % 3}", "text": f"example number {i} " * 40} for i in range(150)]  # needs new pages
    conn.request("POST", "/v1/adapters", body=json.dumps({"name": "x", "examples": big}),
                 headers={"Content-Type": "application/json", "X-API-Key": key})
    r = conn.getresponse()
    error = json.loads(r.read())["error"]
    assert r.status == 503 and error["code"] == "storage_unavailable" and r.getheader("retry-after") == "30"
    assert f"Registry '{db}' cannot be written" in error["message"] and "nothing was changed" in error["message"]
    conn.request("GET", "/v1/adapters", headers={"X-API-Key": key})  # reads go on, on the same connection
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"adapters": []}
    conn.close()
    monkeypatch.setattr(Registry, "_connect", connect)
    with sqlite3.connect(db) as check:
        assert check.execute("SELECT COUNT(*) FROM examples").fetchone()[0] == 0


def test_oversized_and_keyless_requests_to_every_operation_get_4xx(make_service):
    """Every operation of the OpenAPI spec, sent a body over --max-body (declared, and chunked with
    no length), with and without a key: 413 or 401, never a 5xx, and the server stays healthy."""
    server, key, db = make_service(max_body=20_000)
    spec = httpx.get(server.url + "/openapi.json").json()
    operations = [(method.upper(), path.replace("{adapter_id}", "ad_0000000000000000"))
                  for path, item in spec["paths"].items() for method in item if path.startswith("/v1")]
    assert len(operations) == 6
    oversized = b'{"name": "' + b"x" * 30_000 + b'"}'

    def chunked():
        for i in range(0, len(oversized), 4096):
            yield oversized[i:i + 4096]

    seen = set()
    for method, path in operations:
        for headers in ({}, {"X-API-Key": key}):
            for content in (oversized, chunked()):
                r = httpx.request(method, server.url + path, content=content, timeout=10,
                                  headers={**headers, "Content-Type": "application/json"})
                assert r.status_code in (401, 413), (method, path, headers, r.status_code, r.text)
                seen.add(r.status_code)
    assert seen == {401, 413}
    assert httpx.get(server.url + "/healthz").status_code == 200 and rows(db, "adapters") == 0
