"""The CLI end to end, as a user runs it (subprocesses, real Omniglot, tiny budgets)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ENV = {**os.environ, "COLUMNS": "160"}


def metalab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "metalab", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=240)


def test_train_eval_resume_on_omniglot(tmp_path):
    run = tmp_path / "run"
    out = metalab("train", "--algo", "protonet", "--data", "omniglot", "--ways", "20", "--queries", "5",
                  "--steps", "30", "--set", "train.val_every=30", "--set", "train.checkpoint_every=15",
                  "--set", "eval.episodes=100", "--set", "eval.settings=[[5, 1]]", "--out", str(run), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "katakana" in out.stdout and "5-way 1-shot" in out.stdout
    assert (run / "config.yaml").exists() and (run / "checkpoint-0000030.safetensors").exists()
    record = json.loads((run / "eval.json").read_text())
    assert record["results"][0]["episodes"] == 100
    assert record["results"][0]["mean"] > 0.5  # 30 steps already far above chance (0.2) on unseen alphabets

    out = metalab("eval", str(run), "--setting", "20w1s", "--episodes", "50", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "20-way 1-shot" in out.stdout
    merged = json.loads((run / "eval.json").read_text())  # added to the 100-episode figure, which it used to replace
    seed = record["results"][0]["seed"]  # eval.seed
    assert [(r["ways"], r["shots"], r["episodes"], r["seed"], r["step"]) for r in merged["results"]] == [(5, 1, 100, seed, 30), (20, 1, 50, seed, 30)]
    assert merged["results"][0] == record["results"][0]

    # a run trained on a GPU continues on a CPU machine with --device cpu (its config.yaml keeps saying cuda)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("device: auto", "device: cuda"))
    if not torch.cuda.is_available():
        out = metalab("train", "--resume", str(run), "--no-eval", "--no-progress")
        assert out.returncode == 2 and "has no CUDA GPU; continue it here with --device cpu" in " ".join(out.stderr.split())
    out = metalab("train", "--resume", str(run), "--device", "cpu", "--no-eval", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "Resuming" in out.stdout and "resuming on --device cpu (config.yaml says cuda" in " ".join(out.stdout.split())
    assert "device: cuda" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("args,message", [
    (["train", "--algo", "mamll", "--steps", "1"], "Unknown algorithm 'mamll'; choose one of"),
    (["train", "--data", "/no/such/folder", "--steps", "1"], "'/no/such/folder' is neither a bundled dataset"),
    (["eval", "/no/such/run"], "Run folder '/no/such/run' does not exist"),
    (["eval", ".", "--setting", "5way"], "--setting '5way' is not of the form"),
    (["eval", ".", "--setting", "0w1s"], "--setting '0w1s' needs at least 1 way and 1 shot"),
    (["train", "--config", "missing.yaml"], "Config file 'missing.yaml' does not exist"),
    (["train", "--resume", "run", "--steps", "5", "--data", "sinusoid", "--device", "cpu"],
     "own config.yaml; drop --data, --steps (to train"),  # --device alone may change
])
def test_bad_input_gives_one_clear_line(args, message, tmp_path):
    out = metalab(*args, "--no-progress" if args[0] == "train" else "--no-progress", cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_empty_data_folder_and_corrupt_checkpoint(tmp_path):
    (tmp_path / "data").mkdir()
    out = metalab("train", "--data", str(tmp_path / "data"), "--steps", "1", "--out", str(tmp_path / "r1"), "--no-progress")
    assert out.returncode == 2 and "has no class sub-folders" in out.stderr
    assert not (tmp_path / "r1").exists()  # a failed start leaves no half-made run behind

    run = tmp_path / "r2"
    out = metalab("train", "--steps", "2", "--ways", "5", "--out", str(run), "--no-eval", "--no-progress")
    assert out.returncode == 0, out.stderr
    ckpt = run / "checkpoint-0000002.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-50])
    out = metalab("eval", str(run), "--episodes", "10", "--no-progress")
    assert out.returncode == 2
    assert "checkpoint-0000002.safetensors" in out.stderr and "no usable checkpoint" in out.stderr


def test_datasets_lists_bundled_sources():
    out = metalab("datasets")
    assert out.returncode == 0 and "omniglot" in out.stdout and "242" in out.stdout
    # in an 80-column pipe each source's row stays on one line (the prose goes below the table)
    rows = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith("│")}
    assert "1×28×28" in rows["omniglot"] and "22500" in rows["clinc150"] and "1200" in rows["clinc150"]
    assert "clinc150: CLINC150 (Larson et al. 2019" in out.stdout


def test_usage_errors_are_one_line_not_a_traceback():
    for args, says in ((["predict", "hello"], "Missing option '--adapter'"),
                       (["train", "--steps", "many"], "valid integer"),
                       (["predict", "--adapter", "a.safetensors", "--top", "0", "hello"], "greater than or equal to 1"),
                       (["adapt", "--run", "r", "--support", "s", "--lexical-weight", "-1"], "greater than or equal to 0"),
                       (["eval", "r", "--episodes", "0"], "greater than or equal to 1")):
        out = metalab(*args)
        assert out.returncode == 2 and says in out.stderr, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and "╭" not in out.stderr and len(out.stderr.strip().splitlines()) <= 5, (args, out.stderr)
    # a field's error that quotes brackets prints them (the console must not read "[min, max]" as markup)
    out = metalab("train", "--set", "train.ways=[3, 2]", "--no-eval")
    assert out.returncode == 2 and "train.ways=[3, 2] is invalid; give a positive integer or a [min, max] pair" in " ".join(out.stderr.split())


def test_help_and_keys_answer_without_loading_torch(tmp_path):
    """Commands that need no model (--help, `keys`) must not pay torch's ~3 s import."""
    code = ("import sys; from metalab.cli import main; sys.argv = ['metalab', *sys.argv[1:]]; main(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    for args in (["--help"], ["keys", "create", "dora", "--db", str(tmp_path / "r.sqlite")],
                 ["keys", "list", "--db", str(tmp_path / "r.sqlite")]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, timeout=60)
        assert out.returncode == 0, (args, out.stderr[-2000:])
    assert "dora" in out.stdout
    elsewhere = tmp_path / "typo" / "r.sqlite"  # listing a registry that is not there makes none
    out = subprocess.run([sys.executable, "-c", code, "keys", "list", "--db", str(elsewhere)], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 2 and "does not exist; create a key first" in out.stderr and not elsewhere.parent.exists()


def test_demo_the_readme_runs(tmp_path):
    """`make demo` runs `metalab demo`; here with a 3-second training budget (the real one: 420 s)."""
    out = metalab("demo", "--time-budget", "3", "--out", str(tmp_path / "demo"), "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert [(r["ways"], r["shots"], r["episodes"]) for r in record["results"]] == [(5, 1, 600), (5, 5, 600), (20, 1, 600), (20, 5, 600)]
    assert record["results"][0]["mean"] > 0.3 and "Japanese" in record["split_description"]  # above 5-way chance, unseen alphabets
    assert "5-way 1-shot" in out.stdout and "never trained" in out.stdout


def test_ctrl_c_stops_training_between_steps_and_keeps_a_checkpoint(tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "metalab", "train", "--steps", "100000", "--out", str(run),
                              "--no-progress", "--set", "train.checkpoint_every=100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:  # training has begun
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, (out, err)
    assert "stopping after this step" in err and "Traceback" not in err
    step = int(out.split("interrupted at step ")[1].split()[0])
    assert step >= 10 and (run / f"checkpoint-{step:07d}.safetensors").exists()  # no periodic one was due
    assert f"metalab train --resume {run}" in " ".join(out.split())  # (rich wraps long lines)
    from metalab.engine.checkpoint import latest_good_checkpoint

    assert latest_good_checkpoint(run)[0] == step  # whole: it verifies, and resume would start there


def test_three_inputs_that_ended_in_a_traceback_are_one_line(tmp_path):
    """--set on a whole section, --out naming a file, a port out of range."""
    (tmp_path / "afile").write_text("x")
    for args, said in [(["train", "--set", "eval=5", "--no-progress"], "--set eval=… names a whole section; set one of its "
                                                                       "fields, e.g. --set eval.episodes=600"),
                       (["train", "--data", "sinusoid", "--algo", "maml", "--steps", "2", "--out", str(tmp_path / "afile")], "is a file, not a folder"),
                       (["serve", "--run", str(tmp_path), "--port", "99999"], "Invalid value for '--port'")]:
        done = subprocess.run([sys.executable, "-m", "metalab", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert said in " ".join(done.stderr.split()), done.stderr
    assert (tmp_path / "afile").read_text() == "x"
