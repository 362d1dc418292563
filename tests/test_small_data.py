"""Defaults that fit small data, and the out-of-scope threshold a small adapter inherits."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import metalab
from metalab.engine.adapter import default_threshold
from metalab.errors import DataError


def _tiny(per_class: int = 6, classes: int = 12):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(classes).repeat_interleave(per_class)
    return metalab.from_arrays(torch.randn(classes, 8, generator=g)[y] + 0.1 * torch.randn(len(y), 8, generator=g), y)


def test_defaults_scale_down_to_what_the_split_can_fill(tmp_path):
    notes = []
    cfg = metalab.RunConfig.from_dict({"train": {"algo": "protonet", "steps": 3, "val_episodes": 2}})
    splits = metalab.split_by_class(_tiny(), 0.1, 0.3, 0)
    trainer = metalab.MetaTrainer(cfg, tmp_path / "run", splits=splits, show_progress=False, log=notes.append)
    trainer.train()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["queries"] == 5 and saved["train"]["ways"] == 5  # 6 examples, 1 shot; 8 train classes
    assert saved["eval"]["settings"] == [[4, 1], [4, 5]] and saved["eval"]["queries"] == 1
    assert len(notes) >= 1 and notes[0].startswith("small data: train.queries 15 → 5")


def test_fields_the_user_wrote_are_never_changed(tmp_path):
    cfg = metalab.RunConfig.from_dict({"train": {"algo": "protonet", "steps": 3, "queries": 15}})
    splits = metalab.split_by_class(_tiny(), 0.1, 0.3, 0)
    with pytest.raises(DataError, match="examples but 1-shot 15-query episodes need 16"):
        metalab.MetaTrainer(cfg, tmp_path / "run", splits=splits, show_progress=False, log=lambda _: None).train()


def test_a_small_adapter_does_not_inherit_a_many_way_threshold(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"full_task": [{"ways": 45, "out_of_scope": {"threshold": -3.5}}]}))
    assert default_threshold(tmp_path, "algorithm", labels=45) == -3.5
    assert default_threshold(tmp_path, "algorithm", labels=23) == -3.5
    assert default_threshold(tmp_path, "algorithm", labels=4) is None
    assert default_threshold(tmp_path, "algorithm") == -3.5  # (labels unknown: as before)


def test_config_files_that_would_hang_or_garble_are_one_clear_error(tmp_path):
    """A few hundred bytes of nested YAML aliases expand to gigabytes; non-UTF-8 bytes are not text."""
    from metalab.errors import ConfigError

    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"{n}: &{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(rows) + "\n")
    assert bomb.stat().st_size < 500
    with pytest.raises(ConfigError, match=r"^Config file '.*bomb.yaml' uses a YAML alias"):
        metalab.RunConfig.load(bomb)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 9\); save it as UTF-8"):
        metalab.RunConfig.load(latin)
    fine = tmp_path / "fine.yaml"
    fine.write_text("name: café\ntrain: {algo: maml}\n", encoding="utf-8")
    assert metalab.RunConfig.load(fine).name == "café"


def test_train_takes_a_yaml_path_and_names_it_in_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {algo: protonet, stepz: 3}\n")
    with pytest.raises(metalab.ConfigError, match=r"bad.yaml: train: unknown field\(s\) \['stepz'\]"):
        metalab.train(bad, data=_tiny(), out=tmp_path / "bad-run", progress=False)
    good = tmp_path / "good.yaml"
    good.write_text("train: {algo: protonet, steps: 3, val_episodes: 2}\n")
    run = metalab.train(good, data=_tiny(), out=tmp_path / "run", progress=False)
    assert run.config.train.steps == 3 and (tmp_path / "run" / "checkpoint-0000003.safetensors").exists()
    assert not (tmp_path / "bad-run").exists()
