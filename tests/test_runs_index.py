"""The registry's index of runs: `metalab train / eval` add their runs, `metalab runs` lists them as
their folders are now, `--scan` adds folders made elsewhere, and an index that cannot be written
never costs a run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from metalab.store import Registry
from metalab.store.runs import index_run, list_runs


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
    assert sine["results"][0].startswith("5-shot 1 steps MSE ") and sine["evaluated_step"] == 6
    assert budget["status"] == "done" and 0 < budget["steps"] < 100000 and budget["results"] == []

    out = metalab("train", *SINUSOID, "--steps", "10", "--set", "train.checkpoint_every=5", "--no-eval",
                  "--out", str(tmp_path / "cut"), home=home)
    assert out.returncode == 0, out.stderr
    (tmp_path / "cut" / "checkpoint-0000010.safetensors").unlink()
    assert listed(home)["cut"]["status"] == "stopped" and listed(home)["cut"]["steps"] == 5

    # eval refreshes the figures; the table shows them; --algo / --data filter
    assert metalab("eval", str(tmp_path / "budget"), "--episodes", "5", "--no-progress", home=home).returncode == 0
    assert listed(home)["budget"]["results"][0].startswith("5-shot 1 steps MSE ")
    table = metalab("runs", home=home).stdout
    assert "budget" in table and "done" in table and "stopped" in table and "MSE" in table
    assert listed(home, "--algo", "MAML").keys() == {"budget", "sine", "cut"} and listed(home, "--data", "omniglot") == {}

    # a folder that is gone shows as missing, with what was last seen, until --forget-missing drops it
    shutil.rmtree(tmp_path / "sine")
    gone = listed(home)["sine"]
    assert gone["status"] == "missing" and gone["steps"] == 6 and gone["results"]
    out = metalab("runs", "--forget-missing", "--json", home=home)
    assert out.returncode == 0 and "dropped 1 run" in out.stderr and "sine" not in out.stdout


def test_scan_adds_run_folders_made_elsewhere_and_refuses_a_file(tmp_path):
    made = tmp_path / "made"
    assert metalab("train", *SINUSOID, "--steps", "3", "--no-eval", "--out", str(made / "a" / "r1"),
                   home=tmp_path / "other-home").returncode == 0
    shutil.copytree(made / "a" / "r1", made / "b" / "r2")
    (made / "notes").mkdir()
    (made / "notes" / "config.yaml").write_text("just: a file\n")  # not a run's config
    home = tmp_path / "home"
    out = metalab("runs", "--scan", str(made), "--json", home=home)
    assert out.returncode == 0 and "indexed 2 run folders" in out.stderr, out.stderr
    assert {os.path.basename(json.loads(line)["path"]) for line in out.stdout.splitlines()} == {"r1", "r2"}
    out = metalab("runs", "--scan", str(made / "notes" / "config.yaml"), home=home)
    assert out.returncode == 2 and "is not a folder; pass the folder that holds your run folders" in " ".join(out.stderr.split())


def test_a_run_in_training_shows_as_such_until_its_process_is_gone(tmp_path):
    home = tmp_path / "home"
    assert metalab("train", *SINUSOID, "--steps", "4", "--set", "train.checkpoint_every=2", "--no-eval",
                   "--out", str(tmp_path / "run"), home=home).returncode == 0
    (tmp_path / "run" / "checkpoint-0000004.safetensors").unlink()  # as if training were at step 2 of 4
    # a process that indexes the run as its own training, as `metalab train` does, then waits
    code = ("import sys, time; from metalab.store import Registry; from metalab.store.runs import index_run; "
            "index_run(Registry(sys.argv[1]), sys.argv[2], training=True); print('indexed', flush=True); time.sleep(60)")
    trainer = subprocess.Popen([sys.executable, "-c", code, str(home / "registry.sqlite"), str(tmp_path / "run")],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "indexed"
        registry = Registry(home / "registry.sqlite")
        assert [r.status for r in list_runs(registry)] == ["training"]
        index_run(registry, tmp_path / "run")  # a scan or an eval meanwhile keeps the process
        assert [r.status for r in list_runs(registry)] == ["training"]
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
    deadline = time.time() + 10
    while list_runs(registry)[0].status == "training" and time.time() < deadline:
        time.sleep(0.1)
    assert [r.status for r in list_runs(registry)] == ["stopped"]  # killed at step 2 of 4


def test_an_index_that_cannot_be_written_costs_a_note_not_the_run(tmp_path):
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    run = tmp_path / "run"
    out = metalab("train", *SINUSOID, "--steps", "3", "--out", str(run), home=home)
    assert out.returncode == 0, out.stderr
    assert (run / "checkpoint-0000003.safetensors").exists() and (run / "eval.json").exists()
    note = " ".join(out.stderr.split())
    assert note.count("note: the run was not added to the registry's index") == 1  # once, not at every step
    assert f"`metalab runs --scan {tmp_path}`" in note
    # the folder is whole: a writable registry takes it in later
    assert listed(tmp_path / "home", "--scan", str(tmp_path))["run"]["status"] == "done"
