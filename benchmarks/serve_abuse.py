"""``metalab serve`` under abuse, loopback only: what hostile or heavy traffic costs everyone else.

A real ``metalab serve`` process on 127.0.0.1 serves a small text run (ProtoNet on frozen
all-MiniLM-L6-v2, trained here on ``examples/intents.csv`` unless ``--run`` is given). While one
client probes ``GET /healthz`` every 20 ms on a kept-alive connection, three kinds of traffic arrive
in turn, each for a fixed time:

* **keyless floods**: 4 senders, each declaring a 14 MB body without an API key and streaming it
  in 64 KB pieces, over and over (a new connection each time);
* **slow headers**: 400 connections that send a request line and then one header byte per second,
  never finishing their headers;
* **heavy valid predicts**: 4 tenants' clients sending predictions of 64 distinct texts each, back to back.

For each phase: /healthz p50 / p99 / max latency, the server's resident memory (VmRSS, sampled every
50 ms) at the start and at its peak, and what the abusive clients saw (floods refused and how fast,
slow connections closed and when). Everything runs twice: with the service's limits at their defaults
(``--limits on``) and with the configurable ones lifted (``off``: timeouts of an hour, no connection
cap, no failed-authentication limit, budgets raised; keys are still checked before bodies are read,
which is not configurable). Bounded: fixed phase lengths, at most 400 + 8 connections at once.

    python -m benchmarks.serve_abuse [--run RUN] [--seconds 10] [--limits on,off] [--out benchmarks/results/serve_abuse.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FLOOD_BYTES = 14_000_000
SLOW_CONNECTIONS = 400
OFF_FLAGS = ["--header-timeout", "3600", "--body-timeout", "3600", "--max-connections", "1000000", "--auth-failures", "0",
             "--max-request-chars", "100000000", "--max-labels", "100000"]


def train_run(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "metalab", "train", "--data", str(ROOT / "examples" / "intents.csv"), "--algo", "protonet",
           "--steps", "20", "--no-eval", "--no-progress", "--out", str(folder)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def start_server(run: Path, db: Path, extra: list[str], source: Path | None = None) -> tuple[subprocess.Popen, str, int]:
    env = {**os.environ, **({"PYTHONPATH": str(source)} if source else {})}
    proc = subprocess.Popen([sys.executable, "-m", "metalab", "serve", "--run", str(run), "--db", str(db), "--port", "0",
                             "--rate-limit", "0", *extra], stdout=subprocess.PIPE, text=True, env=env, cwd=source)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    base = "http://" + line.split("http://")[1].split("/ ")[0].rstrip("/")
    return proc, base, int(base.rsplit(":", 1)[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


class Probe:
    """/healthz every 20 ms on one kept-alive connection, and the server's RSS every 50 ms."""

    def __init__(self, base: str, pid: int) -> None:
        self.base, self.pid = base, pid
        self.latencies: list[float] = []
        self.failures = 0
        self.rss: list[float] = []
        self._stop = threading.Event()

    def __enter__(self) -> "Probe":
        self.rss_start = rss_mb(self.pid)
        self._threads = [threading.Thread(target=self._health, daemon=True), threading.Thread(target=self._memory, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _health(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    client.get("/healthz").raise_for_status()
                    self.latencies.append(time.perf_counter() - start)
                except httpx.HTTPError:
                    self.failures += 1
                self._stop.wait(0.02)

    def _memory(self) -> None:
        while not self._stop.is_set():
            self.rss.append(rss_mb(self.pid))
            self._stop.wait(0.05)

    def row(self) -> dict:
        ms = [1000 * v for v in self.latencies]
        return {"healthz_n": len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms, default=float("nan")),
                "failed": self.failures, "rss_start": self.rss_start, "rss_peak": max(self.rss, default=self.rss_start)}


def flood(port: int, seconds: float) -> dict:
    """4 keyless senders of 14 MB bodies; each refused, a new connection is opened."""
    deadline = time.perf_counter() + seconds
    stats = {"requests": 0, "refused_401": 0, "refused_429": 0, "no_answer": 0, "answer_ms": [], "bytes_sent": 0}
    lock = threading.Lock()
    head = (f"POST /v1/adapters HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {FLOOD_BYTES}\r\n\r\n").encode()
    piece = b"x" * 65536

    def sender() -> None:
        while time.perf_counter() < deadline:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            start, sent, answer = time.perf_counter(), 0, b""
            try:
                sock.sendall(head)
                sock.setblocking(False)
                while sent < FLOOD_BYTES and time.perf_counter() < deadline:
                    try:
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                        if b"\r\n\r\n" in answer:
                            break
                    except BlockingIOError:
                        pass
                    try:
                        sent += sock.send(piece)
                    except BlockingIOError:
                        time.sleep(0.001)
                sock.setblocking(True)
                sock.settimeout(5)
                while b"\r\n\r\n" not in answer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            except (ConnectionResetError, BrokenPipeError, socket.timeout, OSError):
                pass
            finally:
                sock.close()
            with lock:
                stats["requests"] += 1
                stats["bytes_sent"] += sent
                code = answer[9:12].decode("latin-1") if answer.startswith(b"HTTP/1.1 ") else None
                if code in ("401", "429"):
                    stats[f"refused_{code}"] += 1
                    stats["answer_ms"].append(1000 * (time.perf_counter() - start))
                else:
                    stats["no_answer"] += 1

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = stats.pop("answer_ms")
    return {**stats, "answer_p50_ms": percentile(ms, 50), "answer_max_ms": max(ms, default=float("nan")),
            "mb_sent_per_request": stats["bytes_sent"] / max(1, stats["requests"]) / 1e6}


def slow_headers(port: int, seconds: float, timeout: float | None) -> dict:
    """400 connections that never finish their headers; when does the server close each?"""
    sel = selectors.DefaultSelector()
    opened = time.perf_counter()
    socks = []
    for _ in range(SLOW_CONNECTIONS):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    closed_at: dict[int, float] = {}
    wait = seconds if timeout is None else max(seconds, timeout + 5)
    next_byte = time.perf_counter() + 1
    while len(closed_at) < len(socks) and time.perf_counter() - opened < wait:
        for key, _ in sel.select(timeout=0.05):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except (ConnectionResetError, OSError):
                data = b""
            if not data:
                closed_at[sock.fileno()] = time.perf_counter() - opened
                sel.unregister(sock)
        if time.perf_counter() >= next_byte:  # one more header byte from each still open
            next_byte += 1
            for sock in socks:
                if sock.fileno() not in closed_at and sock.fileno() != -1:
                    try:
                        sock.send(b"X")
                    except OSError:
                        pass
    for sock in socks:
        sock.close()
    times = list(closed_at.values())
    return {"connections": len(socks), "closed": len(times), "closed_max_s": max(times, default=float("nan")),
            "closed_p50_s": percentile(times, 50), "watched_s": wait}


def heavy_predicts(base: str, keys: list[str], seconds: float) -> dict:
    texts = (ROOT / "examples" / "intents.csv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.rsplit(",", 2)[0].strip('"') for line in texts]
    deadline = time.perf_counter() + seconds
    done, latencies, lock = [0], [], threading.Lock()

    def client(key: str, offset: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            ad = c.post("/v1/adapters", json={"name": "abuse", "examples": [
                {"label": label, "text": text} for label, text in (("a", "what time is it"), ("a", "tell me the time"),
                                                                  ("b", "play some music"), ("b", "put on a song"))]}).json()
            i = offset
            while time.perf_counter() < deadline:
                batch = [f"{texts[(i + j) % len(texts)]} #{i + j}" for j in range(64)]  # distinct: every text is encoded
                i += 64
                start = time.perf_counter()
                c.post(f"/v1/adapters/{ad['id']}/predict", json={"texts": batch}).raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)
                    done[0] += 64

    threads = [threading.Thread(target=client, args=(k, 1000 * n)) for n, k in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"texts_per_s": done[0] / seconds, "predict_p50_ms": 1000 * percentile(latencies, 50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="A trained text run to serve (default: train one on examples/intents.csv).")
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of the flood and predict phases.")
    parser.add_argument("--limits", default="on,off", help="on, off or on,off.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_abuse.md")
    parser.add_argument("--server-src", type=Path, help="Run the server from this metalab checkout (e.g. an older commit's "
                                                        "worktree, for a before/after comparison); 'on' then means its defaults.")
    args = parser.parse_args()
    from metalab.serve.limits import Limits
    from metalab.store.registry import Registry

    tmp = Path(tempfile.mkdtemp(prefix="serve-abuse-"))
    run = args.run or train_run(tmp / "run")
    rows = []
    for mode in args.limits.split(","):
        db = tmp / f"registry-{mode}.sqlite"
        registry = Registry(db)
        keys = [registry.create_key(f"tenant{i}") for i in range(4)]
        proc, base, port = start_server(run, db, [] if mode == "on" else OFF_FLAGS, args.server_src)
        try:
            httpx.get(base + "/healthz", timeout=30).raise_for_status()
            with Probe(base, proc.pid) as idle:
                time.sleep(2)
            rows.append((mode, "idle (baseline)", idle.row(), {}))
            with Probe(base, proc.pid) as p:
                seen = flood(port, args.seconds)
            rows.append((mode, "4 keyless 14 MB senders", p.row(), seen))
            with Probe(base, proc.pid) as p:
                seen = slow_headers(port, args.seconds, Limits().header_timeout if mode == "on" else None)
            rows.append((mode, f"{SLOW_CONNECTIONS} slow-header connections", p.row(), seen))
            with Probe(base, proc.pid) as p:
                seen = heavy_predicts(base, keys, args.seconds)
            rows.append((mode, "4 clients of 64-text predicts", p.row(), seen))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"limits {mode}: done", flush=True)

    source = f" --server-src {args.server_src}" if args.server_src else ""
    lines = [f"# `metalab serve` under abuse (`python -m benchmarks.serve_abuse --seconds {args.seconds:g} --limits {args.limits}{source}`)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d')}; server and clients on the same cores, loopback only. "
             "Limits 'on' are the defaults (header timeout 10 s, body timeout 60 s, 1000 connections, 30 failed "
             "authentications then 1/s per address, 200,000 characters and 50 M pixels per request); 'off' lifts the "
             "configurable ones (" + " ".join(OFF_FLAGS) + "). Keys are checked before bodies are read in both.", "",
             "| limits | traffic | /healthz n | p50 ms | p99 ms | max ms | failed | RSS start MB | RSS peak MB | growth MB | what the traffic saw |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, what, r, seen in rows:
        saw = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in seen.items()) or "-"
        lines.append(f"| {mode} | {what} | {r['healthz_n']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {r['failed']} | "
                     f"{r['rss_start']:.0f} | {r['rss_peak']:.0f} | {r['rss_peak'] - r['rss_start']:.0f} | {saw} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
