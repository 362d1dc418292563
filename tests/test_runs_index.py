"""The registry's index of runs: `metalab train / eval` add their runs, `metalab runs` lists them as
their folders are now, `--scan` adds folders made elsewhere, and an index that cannot be written
never costs a run."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from metalab.store import Registry
from metalab.store.runs import list_runs


def metalab(*args, home, cwd=None):
    env = {**os.environ, "COLUMNS": "160", "METALAB_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "metalab", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=240)


def listed(home, *args) -> dict:
    out = metalab("runs", "--json", *args, home=home)
    assert out.returncode == 0, out.stderr
    return {os.path.basename(r["path"]): r for r in map(json.loads, out.stdout.splitlines())}


SINUSOID = ("--algo", "maml", "--data", "sinusoid", "--no-progress", "--set", "eval.episodes=10",
            "--set", "eval.settings=[[1, 5]]", "--set", "eval.adapt_steps=[1]")


def test_train_and_eval_index_their_runs_and_runs_lists_them_as_their_folders_are(tmp_path):
    home = tmp_path / "home"
    out = metalab("runs", home=home)
    assert out.returncode == 0 and "no runs indexed yet" in " ".join(out.stderr.split())

    assert metalab("train", *SINUSOID, "--steps", "6", "--out", str(tmp_path / "sine"), home=home).returncode == 0
    # a run cut by its time budget is done; one cut short otherwise (here: its last checkpoint removed) is not
    out = metalab("train", *SINUSOID, "--steps", "100000", "--time-budget", "1", "--no-eval",
                  "--out", str(tmp_path / "budget"), home=home)
    assert out.returncode == 0 and "stopped by time_budget" in out.stdout, out.stderr
    runs = listed(home)
    assert list(runs) == ["budget", "sine"]  # the most recently written first
    sine, budget = runs["sine"], runs["budget"]
    assert (sine["algo"], sine["data"], sine["steps"], sine["steps_total"], sine["status"]) == ("maml", "sinusoid", 6, 6, "done")
    assert sine["results"][0].startswith("5-shot MSE ") and sine["results"][0].endswith(" (steps: 1, 10 ep)")
    assert sine["evaluated_step"] == 6
    figure = sine["figures"][0]  # --json: the figures as numbers too
    assert figure["metric"] == "mse" and figure["shots"] == 5 and isinstance(figure["mean"], float)
    assert f"{figure['mean']:.4f}" in sine["results"][0] and figure["episodes"] >= 1
    assert budget["status"] == "done" and 0 < budget["steps"] < 100000 and budget["results"] == []

    out = metalab("train", *SINUSOID, "--steps", "10", "--set", "train.checkpoint_every=5", "--no-eval",
                  "--out", str(tmp_path / "cut"), home=home)
    assert out.returncode == 0, out.stderr
    (tmp_path / "cut" / "checkpoint-0000010.safetensors").unlink()
    assert listed(home)["cut"]["status"] == "stopped" and listed(home)["cut"]["steps"] == 5

    # eval refreshes the figures; the table shows them; --algo / --data filter
    assert metalab("eval", str(tmp_path / "budget"), "--episodes", "5", "--no-progress", home=home).returncode == 0
    assert listed(home)["budget"]["results"][0].startswith("5-shot MSE ")
    table = metalab("runs", home=home).stdout
    assert "budget" in table and "done" in table and "stopped" in table and "MSE" in table
    assert listed(home, "--algo", "MAML").keys() == {"budget", "sine", "cut"} and listed(home, "--data", "omniglot") == {}
    assert list(listed(home, "--last", "2")) == ["budget", "cut"]  # (budget: its eval.json is the newest write)

    # a folder that is gone shows as missing, with what was last seen, until --forget-missing drops it
    shutil.rmtree(tmp_path / "sine")
    gone = listed(home)["sine"]
    assert gone["status"] == "missing" and gone["steps"] == 6 and gone["results"]
    out = metalab("runs", "--forget-missing", "--json", home=home)
    assert out.returncode == 0 and "dropped 1 run" in out.stderr and "sine" not in out.stdout


def test_an_index_that_cannot_be_written_costs_a_note_not_the_run_and_scan_adds_it_later(tmp_path):
    made = tmp_path / "made"
    unwritable = tmp_path / "home-is-a-file"
    unwritable.write_text("")
    out = metalab("train", *SINUSOID, "--steps", "3", "--out", str(made / "a" / "r1"), home=unwritable)
    assert out.returncode == 0, out.stderr
    assert (made / "a" / "r1" / "checkpoint-0000003.safetensors").exists() and (made / "a" / "r1" / "eval.json").exists()
    note = " ".join(out.stderr.split())
    assert note.count("note: the run was not added to the registry's index") == 1  # once, not at every write
    assert f"`metalab runs --scan {made / 'a'}`" in note

    # the folder is whole: a writable registry takes it in, with copies and without what is not a run
    shutil.copytree(made / "a" / "r1", made / "b" / "r2")
    (made / "notes").mkdir()
    (made / "notes" / "config.yaml").write_text("just: a file\n")  # not a run's config
    home = tmp_path / "home"
    out = metalab("runs", "--scan", str(made), "--json", home=home)
    assert out.returncode == 0 and "indexed 2 run folders" in out.stderr, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(os.path.basename(r["path"]) for r in rows) == ["r1", "r2"] and {r["status"] for r in rows} == {"done"}
    out = metalab("runs", "--scan", str(made / "notes" / "config.yaml"), home=home)
    assert out.returncode == 2 and "is not a folder; pass the folder that holds your run folders" in " ".join(out.stderr.split())


def test_one_process_trains_a_run_at_a_time_and_runs_shows_it_training_until_it_is_gone(tmp_path):
    home, run = tmp_path / "home", tmp_path / "run"
    assert metalab("train", *SINUSOID, "--steps", "4", "--set", "train.checkpoint_every=2", "--no-eval",
                   "--out", str(run), home=home).returncode == 0
    (run / "checkpoint-0000004.safetensors").unlink()  # as if training had reached step 2 of 4
    # a process holding the run's training lock, as a trainer does from opening the folder until it stops
    code = ("import sys, time; from metalab.engine.run import RunFolder; r = RunFolder(sys.argv[1]); r.lock(); "
            "print('locked', flush=True); time.sleep(60)")
    trainer = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "locked"
        registry = Registry(home / "registry.sqlite")
        assert [r.status for r in list_runs(registry)] == ["training"]
        out = metalab("train", "--resume", str(run), "--no-progress", home=home)  # a second trainer is refused
        message = " ".join(out.stderr.split())
        assert out.returncode == 2 and f"Run folder '{run}' is being trained by another process (pid {trainer.pid}); wait" in message
        metrics = (run / "metrics.jsonl").read_text()
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000002.safetensors"]
        assert (run / "metrics.jsonl").read_text() == metrics  # it wrote nothing
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
    assert [r.status for r in list_runs(registry)] == ["stopped"]  # killed at step 2 of 4: the lock died with it
    out = metalab("train", "--resume", str(run), "--no-progress", "--no-eval", home=home)
    assert out.returncode == 0 and "Resuming" in out.stdout, out.stderr
    assert [r.status for r in list_runs(registry)] == ["done"]


def test_a_new_run_waits_for_the_lock_before_writing_its_config(tmp_path):
    """Two runs started into one folder at once: the one that takes the lock second must not write
    its config.yaml over the first's (here the first is a process holding the lock of the empty folder)."""
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from metalab.store import run_lock; run_lock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = metalab("train", *SINUSOID, "--steps", "3", "--out", str(run), home=tmp_path / "home")
        assert out.returncode == 2 and "is being trained by another process" in " ".join(out.stderr.split())
        assert not (run / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)


def test_the_lock_within_one_process_names_the_other_trainer_and_is_given_back(tmp_path):
    from metalab.engine.run import RunFolder
    from metalab.errors import ConfigError

    first = RunFolder(tmp_path)
    first.lock()
    with pytest.raises(ConfigError, match=r"is held by another trainer in this process; let its train\(\) finish, or drop it"):
        RunFolder(tmp_path).lock()
    first.unlock()
    second = RunFolder(tmp_path)
    second.lock()  # given back by unlock
    del second  # and by dropping the folder object (a trainer whose set-up failed)
    RunFolder(tmp_path).lock()
    with pytest.raises(ConfigError, match=r"Run folder '.*gone' cannot be written \(No such file or directory\); copy it"):
        RunFolder(tmp_path / "gone").lock()  # (as a read-only folder: no lock file can be made)
