"""Screen changes to the demo's recipe on the validation classes only (never the meta-test alphabets).

    python -m benchmarks.demo_screen --name base
    python -m benchmarks.demo_screen --name steps2000 --set train.steps=2000

Trains the demo's recipe (``metalab.demo.demo_config``, no time budget) with the given overrides,
then scores the trained network on the 14 validation characters at 5-way 1-shot, 14-way 1-shot and
5-way 5-shot (600 episodes, 15 queries, seed 7) under each ProtoNet ``test_feature_norm``
(``none``, ``l2``, ``centre-l2``) and each ProtoNet ``test_views`` (each image scored by its four 90°
turns, or by those and their mirror images), so one training run answers whether either pays.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from metalab.algorithms.protonet import FEATURE_NORMS, TEST_VIEWS
from metalab.cli import _assign as assign, _parse_value as parse_set_value
from metalab.demo import demo_config
from metalab.engine.config import RunConfig
from metalab.engine.evaluate import evaluate
from metalab.engine.trainer import MetaTrainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="base")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--episodes", type=int, default=600)
    args = parser.parse_args(argv)
    raw = demo_config(time_budget=None).to_dict()
    for item in args.set:  # as `metalab train --set`: nested keys, YAML values, the same checks
        key, value = item.split("=", 1)
        assign(raw, key.strip(), parse_set_value(value, key.strip()))
    cfg = RunConfig.from_dict(raw, origin="--set")
    out = Path(tempfile.mkdtemp(prefix="metalab-demo-screen-")) / args.name
    trainer = MetaTrainer(cfg, out, show_progress=False, log=lambda m: None)
    val = trainer.splits.val
    began = time.perf_counter()
    result = trainer.train()
    line = f"{args.name}: {result.steps} steps, {time.perf_counter() - began:.0f} s of training |"
    algorithm = trainer.algorithm.eval()
    for norm, views in [(norm, "none") for norm in FEATURE_NORMS] + [("none", v) for v in TEST_VIEWS[1:]]:
        algorithm.test_feature_norm, algorithm.test_views = norm, views
        cells = []
        for ways, shots in ((5, 1), (val.num_classes, 1), (5, 5)):
            r = evaluate(algorithm, val, ways, shots, 15, args.episodes, show_progress=False, seed=7)
            cells.append(f"{ways}w{shots}s {100 * r.mean:.2f} ± {100 * r.ci95:.2f}")
        line += f" {norm}{'' if views == 'none' else ' + test_views=' + views}: " + ", ".join(cells) + " |"
    print(line, flush=True)
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
