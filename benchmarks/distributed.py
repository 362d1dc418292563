"""Data-parallel scaling: meta-training tasks/s with 1 process vs N processes (torchrun, gloo on
loopback), same global meta-batch, Omniglot canonical split, conv4.

    python -m benchmarks.distributed [--procs 2] [--steps 30] [--algos protonet maml]

Each arm is a real ``metalab train`` run; tasks/s is read from the run's metrics.jsonl (the
trainer's own window average, warm-up excluded). With N processes each gets
``threads // N`` intra-op threads so the arms use the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {
    "protonet": ["--ways", "20", "--shots", "1", "--queries", "5", "--meta-batch", "8"],
    "maml": ["--ways", "5", "--shots", "1", "--queries", "15", "--meta-batch", "8",
             "--set", "train.algo_options.inner_lr=0.4"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arm(algo: str, procs: int, steps: int, threads: int, out: Path) -> float:
    args = ["train", "--data", "omniglot", "--algo", algo, *SETTINGS[algo], "--steps", str(steps),
            "--set", f"train.log_every={max(1, steps // 3)}", "--set", f"train.val_every={10 * steps}",
            "--set", f"train.checkpoint_every={10 * steps}", "--no-eval", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // procs)), "GLOO_SOCKET_IFNAME": "lo"}
    if procs == 1:
        cmd = [sys.executable, "-m", "metalab", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_port()}", "-m", "metalab", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["tasks_per_s"]  # the last window: after the first (warm-up) one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--algos", nargs="*", default=["protonet", "maml"])
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {threads} CPU cores, torch {torch.__version__}, gloo on 127.0.0.1; "
          f"{args.steps} steps per arm")
    print(f"{'algorithm':10s} {'1 process tasks/s':>18s} {f'{args.procs} processes tasks/s':>20s} {'scaling':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos:
            one = arm(algo, 1, args.steps, threads, Path(tmp) / f"{algo}-1")
            many = arm(algo, args.procs, args.steps, threads, Path(tmp) / f"{algo}-{args.procs}")
            print(f"{algo:10s} {one:18.1f} {many:20.1f} {many / one:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
