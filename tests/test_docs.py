"""The documentation's runnable blocks run, as a user would paste them, on the small data in
``examples/``; the package root answers the first questions a user asks (version, help)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment's `metalab` script
RUNNABLE = re.compile(r"<!-- runnable -->\s*\n```(bash|python)\n(.*?)\n```", re.S)


def runnable_blocks() -> list[tuple[str, int, str, str]]:
    """``(file, number, language, code)`` of every block marked ``<!-- runnable -->``."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, match in enumerate(RUNNABLE.finditer(path.read_text())):
            found.append((str(path.relative_to(ROOT)), i + 1, match.group(1), match.group(2)))
    return found


def test_the_readme_has_runnable_recipes_and_fits_300_lines():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert not re.search(r"20\d\d-[01]\d-[0-3]\d", readme), "figures and dates belong in benchmarks/results/"
    assert len([b for b in runnable_blocks() if b[0] == "README.md"]) >= 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder like the repository's root for the recipes: its ``examples/``, nothing else."""
    work = tmp_path_factory.mktemp("recipes")
    shutil.copytree(ROOT / "examples", work / "examples")
    return work


@pytest.mark.parametrize("where,number,language,code", runnable_blocks(),
                         ids=[f"{b[0]}-{b[1]}" for b in runnable_blocks()])
def test_runnable_block(where, number, language, code, workdir):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    print(f"{where} block {number}: {seconds:.1f} s")
    assert done.returncode == 0, f"{where} block {number} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr


def test_the_python_recipe_learns_and_names_its_labels(tmp_path):
    """Recipe 3's claims hold: unseen classes far above chance (20 % at 5 ways), string labels out."""
    block = next(code for where, _, language, code in runnable_blocks() if where == "README.md" and language == "python")
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    accuracy = float(re.search(r"5-way 1-shot: ([\d.]+) ±", done.stdout).group(1))
    assert accuracy > 60
    assert "['left', 'left', 'left']" in done.stdout
    listed = subprocess.run([str(BIN / "metalab"), "runs", "--json"], capture_output=True, text=True, timeout=60)
    assert str(tmp_path / "runs" / "tensors") in listed.stdout  # a run trained from Python joins the index of runs


def test_version_and_short_help():
    import metalab

    version = subprocess.run([str(BIN / "metalab"), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"metalab {metalab.__version__}"
    helped = subprocess.run([str(BIN / "metalab"), "demo", "-h"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "[default: 420.0]" in helped.stdout and "<bool>" not in helped.stdout


def test_import_metalab_is_light_and_exports_one_way_in():
    code = ("import sys, metalab; assert 'torch' not in sys.modules; "
            "assert callable(metalab.train) and metalab.Run and metalab.Adapter and metalab.EpisodeSampler; "
            "assert 'torch' in sys.modules; print(metalab.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
