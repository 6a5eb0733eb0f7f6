"""Recipes load against the schema; bad keys and types fail in one line naming the key."""
import glob
import os
import subprocess
import sys

import pytest

from dcwdist.config import ConfigError, JobConfig, load_config
from tests.conftest import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"), recursive=True))


def test_there_are_recipes():
    assert any(r.endswith("tiny_cpu.yaml") for r in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_recipe_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig) and cfg.stages


def test_dotted_overrides_apply():
    cfg = load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"),
                      ["attention.window=64", "stages.0.steps=5", "model.rope.base=500000",
                       "stages.1.rope.factor=8", "optim.lr=1e-3"])
    assert cfg.attention.window == 64 and cfg.stages[0].steps == 5
    assert cfg.model.rope.base == 500000.0 and cfg.stages[1].rope.factor == 8.0
    assert cfg.optim.lr == 1e-3


@pytest.mark.parametrize("override, needle", [
    ("model.dimm=3", "unknown key 'model.dimm'; allowed keys: activation_checkpointing"),
    ("model.dim=abc", "model.dim: expected int, got 'abc'"),
    ("attention.kind=foo", "attention.kind: 'foo' is not one of dense|window"),
    ("stages.0.seq_lenn=4", "unknown key 'stages.0.seq_lenn'; allowed keys:"),
    ("stages.0.attention.windw=4", "unknown key 'stages.0.attention.windw'"),
    ("stages.0.data.loss_onn=all", "unknown key 'stages.0.data.loss_onn'; allowed keys:"),
    ("stages.0.data.loss_on=some", "stages.0.data.loss_on: 'some' is not one of all|answer"),
    ("stages.0.data.source=memmap", "stages.0.data.source: the data source cannot change"),
    ("stages.1.data.max_doc_len=8", "stages.1.data: data.max_doc_len must be 0 or >="),
    ("stages.9.steps=4", "index 9 out of range"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("model.n_kv_heads=3", "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
    ("segmentation.core_ratio=0.9", "segmentation.core_ratio and buffer_ratio"),
])
def test_bad_input_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"), [override])
    msg = str(err.value)
    assert needle in msg, msg
    assert "\n" not in msg


def test_a_stage_changes_only_the_data_fields_it_names():
    cfg = load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"),
                      ["stages.0.data.loss_on=answer", "stages.0.data.max_doc_len=300"])
    first, second = cfg.stage_data(cfg.stages[0]), cfg.stage_data(cfg.stages[1])
    assert (first.loss_on, first.max_doc_len) == ("answer", 300)
    assert (second.loss_on, second.max_doc_len) == (cfg.data.loss_on, cfg.data.max_doc_len)
    assert first.min_doc_len == second.min_doc_len == cfg.data.min_doc_len
    quality = load_config(os.path.join(REPO, "recipes/ablations/quality_dense.yaml"))
    copy, fact = (quality.stage_data(s) for s in quality.stages[:2])
    assert (copy.generator, fact.generator) == ("copy", "basic")


def test_sequence_length_not_divisible_by_block_is_rejected():
    with pytest.raises(ConfigError, match=r"stages.0.seq_len=500 is not divisible by attention.block_size=32"):
        load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"),
                    ["attention.kind=dcw", "stages.0.seq_len=500", "stages.0.batch_tokens=0"])


def test_missing_recipe_is_clear():
    with pytest.raises(ConfigError, match="recipe not found: nope.yaml"):
        load_config("nope.yaml")


def test_cli_reports_bad_key_in_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dcwdist.cli", "train",
                           os.path.join(REPO, "recipes/tiny_cpu.yaml"), "optim.lrr=1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'optim.lrr'" in lines[0], proc.stderr


def test_cli_help_explains_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "dcwdist.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for sub in ("train", "eval", "data"):
        assert sub in out
    for sub in ("train", "eval", "data"):
        sub_out = subprocess.run([sys.executable, "-m", "dcwdist.cli", sub, "--help"],
                                 capture_output=True, text=True, check=True).stdout
        assert "usage: dcwdist " + sub in sub_out


def test_recipe_base_is_merged_under_the_recipe(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\noptim: {lr: 0.5, warmup_steps: 7}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\noptim: {lr: 0.25}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.name, cfg.optim.lr, cfg.optim.warmup_steps) == ("child", 0.25, 7)


def test_recipe_base_cycle_and_missing_base_fail_in_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="recipe base cycle"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(str(tmp_path / "c.yaml"))
