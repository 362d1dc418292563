"""Training killed (like ``kill -9``) in the middle of checkpoint writes, again and again, then resumed
each time: the run ends on exactly the weights and metrics of a run never interrupted, and the
folder holds no debris. Real processes (`metalab train`), a tiny .npz source."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import make_clusters

STEPS, EVERY = 24, 4  #: 6 checkpoints per uninterrupted run


def metalab(*args, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "METALAB_FAULT_CHECKPOINT"}
    if fault:
        env["METALAB_FAULT_CHECKPOINT"] = str(fault)
    return subprocess.run([sys.executable, "-m", "metalab", *args], capture_output=True, text=True, env=env, timeout=240)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    src = make_clusters(classes=12, per_class=10)
    path = tmp_path_factory.mktemp("faults") / "clusters.npz"
    np.savez(path, x=src.x.numpy(), y=np.array([src.class_names[c] for c in src.y.tolist()]))
    return path


def train_args(data, out):
    return ["train", "--data", str(data), "--algo", "protonet", "--ways", "3", "--shots", "1", "--queries", "2",
            "--steps", str(STEPS), "--set", f"train.checkpoint_every={EVERY}", "--set", "train.log_every=2",
            "--set", "train.val_every=8", "--set", "train.keep_checkpoints=2", "--no-eval", "--no-progress", "--out", str(out)]


def test_kills_during_checkpoint_writes_then_resume_equal_the_uninterrupted_run(data, tmp_path):
    straight = tmp_path / "straight"
    out = metalab(*train_args(data, straight))
    assert out.returncode == 0, out.stderr

    run = tmp_path / "killed"
    out = metalab(*train_args(data, run), fault=2)  # dies writing its 2nd checkpoint (step 8)
    assert out.returncode == 17, out.stderr
    assert [p.name for p in run.glob(".checkpoint-*.tmp")], "the kill left a half-written temporary file"
    kills = 1
    for fault in (1, 3, 2):  # each resume dies writing its 1st, 3rd, 2nd checkpoint
        out = metalab("train", "--resume", str(run), "--no-eval", "--no-progress", fault=fault)
        if out.returncode == 0:
            break
        assert out.returncode == 17, out.stderr
        kills += 1
    out = metalab("train", "--resume", str(run), "--no-eval", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert kills == 4 and "Resuming" in out.stdout

    final = f"checkpoint-{STEPS:07d}.safetensors"
    a, b = load_file(str(straight / final)), load_file(str(run / final))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key  # bit for bit: weights, optimiser moments, RNG states
    metrics = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (straight, run)]
    assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]]  # nothing lost, nothing twice
    assert [m["loss"] for m in metrics[0]] == [m["loss"] for m in metrics[1]]
    assert [m.get("val_acc") for m in metrics[0]] == [m.get("val_acc") for m in metrics[1]]
    assert not list(run.glob(".checkpoint-*.tmp"))  # the debris of every kill was cleared
    assert sorted(p.name for p in run.glob("checkpoint-*")) == sorted(p.name for p in straight.glob("checkpoint-*"))
