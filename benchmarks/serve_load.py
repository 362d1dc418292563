"""Load benchmark of ``metalab serve``: text predict with a 150-label adapter, loopback only.

A ProtoNet run (diagonal head on frozen all-MiniLM-L6-v2 layers 4-6, meta-trained on CLINC150's 7
training domains) is served by a real ``metalab serve`` process on 127.0.0.1; a tenant creates an
adapter from 5 examples of each of the 150 intents (train split, seed 0), then clients send
predictions of *distinct* test-split texts (so every request encodes its text; nothing is served
from a cache). Bounded: fixed request counts, and a fixed duration with a request cap for the
concurrent phase. Client-side latencies (request sent → response parsed) over HTTP/1.1 keep-alive.

    python -m benchmarks.serve_load [--run RUN] [--out benchmarks/results/serve_load.md]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from metalab.data.text import load_clinc150


def train_run(folder: Path, steps: int) -> Path:
    cmd = [sys.executable, "-m", "metalab", "train", "--data", "clinc150", "--algo", "protonet", "--backbone", "diagonal",
           "--ways", "5", "--shots", "5", "--queries", "10", "--meta-batch", "16", "--steps", str(steps), "--lr", "0.01",
           "--no-eval", "--no-progress", "--out", str(folder)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def start_server(run: Path, db: Path, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "metalab", "serve", "--run", str(run), "--db", str(db), "--port", "0",
                             "--rate-limit", "0"], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, "http://" + line.split("http://")[1].split("/ ")[0].rstrip("/")


def describe_run(run: Path) -> str:
    """What the served run is, from its config."""
    from metalab.engine.run import RunFolder

    t = RunFolder.open(run).config().train
    if t.tune_encoder is not None:
        return (f"{t.algo}, all-MiniLM-L6-v2 with its top {t.tune_encoder} layers meta-trained ({t.steps} steps) on "
                f"CLINC150's 7 training domains ({run.name})")
    return f"{t.algo} + {t.backbone} head on frozen all-MiniLM-L6-v2 layers 4-6 (meta-trained on CLINC150's 7 training domains)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def sequential(client: httpx.Client, url: str, texts: list[str], batch: int) -> tuple[list[float], list[dict]]:
    times, predictions = [], []
    for start in range(0, len(texts), batch):
        t = time.perf_counter()
        r = client.post(url, json={"texts": texts[start:start + batch], "top_k": 3})
        r.raise_for_status()
        predictions += r.json()["predictions"]
        times.append(time.perf_counter() - t)
    return times, predictions


def concurrent(base: str, key: str, url: str, texts: list[str], clients: int, seconds: float, cap: int) -> tuple[list[float], float, int]:
    times: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    counter = iter(range(cap))

    def work(offset: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = c.post(url, json={"texts": [texts[(offset + i) % len(texts)]], "top_k": 3})
                elapsed = time.perf_counter() - t
                with lock:
                    times.append(elapsed)
                    errors[0] += r.status_code != 200

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k * 997,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times, time.perf_counter() - start, errors[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained CLINC150 text run (default: meta-train one, ~1 min)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--requests", type=int, default=500, help="sequential batch-1 predictions")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of the concurrent phase")
    parser.add_argument("--cap", type=int, default=5000, help="most requests in the concurrent phase")
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.md"))
    args = parser.parse_args()
    lines: list[str] = []
    log = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731

    work = Path(tempfile.mkdtemp(prefix="metalab-serve-bench-"))
    run = args.run
    if run is None:
        t = time.perf_counter()
        run = train_run(work / "run", args.steps)
        log(f"meta-trained ProtoNet + diagonal head on CLINC150's 7 training domains: {args.steps} steps, "
            f"{time.perf_counter() - t:.0f} s (with loading)")
    corpus = load_clinc150()
    rng = random.Random(0)
    train = [(t, corpus.class_names[int(y)]) for t, y, p in zip(corpus.texts, corpus.y, corpus.parts) if p == "train"]
    test = [(t, corpus.class_names[int(y)]) for t, y, p in zip(corpus.texts, corpus.y, corpus.parts) if p == "test"]
    by_label: dict[str, list[str]] = {}
    for text, label in train:
        by_label.setdefault(label, []).append(text)
    support = [{"label": label, "text": text} for label in sorted(by_label) for text in rng.sample(by_label[label], 5)]
    rng.shuffle(test)

    from metalab.store.registry import Registry

    db = work / "registry.sqlite"
    key = Registry(db).create_key("bench")
    proc, base = start_server(run, db, args.server_threads)
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            t = time.perf_counter()
            r = c.post("/v1/adapters", json={"name": "clinc150-5shot", "examples": support})
            r.raise_for_status()
            adapter = r.json()
            log(f"created a {len(adapter['labels'])}-label adapter from {adapter['examples']} examples in "
                f"{time.perf_counter() - t:.2f} s (encoding them included)")
            url = f"/v1/adapters/{adapter['id']}/predict"
            sequential(c, url, [t for t, _ in test[-20:]], 1)  # warm-up
            texts = [t for t, _ in test[: args.requests]]
            seq, predictions = sequential(c, url, texts, 1)
            accuracy = sum(p["label"] == label for p, (_, label) in zip(predictions, test)) / len(predictions)
            batch_texts = [t for t, _ in test[args.requests: args.requests + 32 * 30]]
            batched, _ = sequential(c, url, batch_texts, 32)
        conc, wall, errors = concurrent(base, key, url, [t for t, _ in test], args.clients, args.seconds, args.cap)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    ms = lambda v: f"{1000 * v:.1f}"  # noqa: E731
    rows = [
        (f"batch of 1, sequential ({len(seq)} requests)", ms(percentile(seq, 50)), ms(percentile(seq, 99)),
         f"{len(seq) / sum(seq):.0f}", "0"),
        (f"batch of 32, sequential ({len(batched)} requests)", ms(percentile(batched, 50)), ms(percentile(batched, 99)),
         f"{len(batched) / sum(batched):.1f} ({32 * len(batched) / sum(batched):.0f} texts/s)", "0"),
        (f"batch of 1, {args.clients} concurrent clients, {args.seconds:.0f} s ({len(conc)} requests)",
         ms(percentile(conc, 50)), ms(percentile(conc, 99)), f"{len(conc) / wall:.0f}", str(errors)),
    ]
    log(f"accuracy of the served adapter on {len(predictions)} test-split texts: {100 * accuracy:.1f} %")
    for row in rows:
        log(" | ".join(row))
    md = [f"# `metalab serve` load benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "",
          f"Machine: {os.cpu_count()}-core CPU, torch {torch.__version__}, server and clients on the same machine "
          f"(127.0.0.1); server process with {args.server_threads} torch threads; run: {describe_run(run)}.", "",
          "Adapter: 150 labels × 5 examples (CLINC150 train split, seed 0). Requests: `POST /v1/adapters/{id}/predict` "
          "with distinct CLINC150 test-split texts (each request encodes its texts; no cache), `top_k` 3, "
          "client-side latency over keep-alive HTTP/1.1. Target: p50 < 20 ms for a batch of 1.", "",
          "| load | p50 (ms) | p99 (ms) | requests/s | errors |", "|---|---|---|---|---|",
          *[f"| {' | '.join(r)} |" for r in rows], "",
          "## Log", "", "```", *lines, "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
