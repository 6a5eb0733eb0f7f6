"""The trainer: the tiny recipe's loss falls across stages, logs land in TensorBoard, the
resolved config is written, and gradient accumulation equals one big batch."""
import copy
import json
import os

import pytest
import torch
import yaml

from dcwdist.config import load_config
from dcwdist.train.trainer import Trainer
from tests.conftest import REPO

TINY = os.path.join(REPO, "recipes/tiny_cpu.yaml")
SMALL = ["attention.kind=dense", "model.dim=64", "model.n_layers=2", "stages.0.seq_len=384", "stages.0.steps=14",
         "stages.0.batch_tokens=1536", "stages.0.micro_batch_size=4", "stages.1.seq_len=768",
         "stages.1.steps=4", "stages.1.batch_tokens=1536", "stages.1.micro_batch_size=2",
         "stages.1.rope.original_max_len=384", "data.eval_rows=2", "logging.progress=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    cfg = load_config(TINY, SMALL)
    summary = Trainer(cfg, run_dir=run_dir, echo=lambda *_: None).fit()
    return run_dir, summary


def test_tiny_recipe_loss_falls(tiny_run):
    _, summary = tiny_run
    assert summary["steps"] == 18
    assert summary["last_loss"] < summary["first_loss"] - 1.0, summary


def test_resolved_config_and_outputs_are_written(tiny_run):
    run_dir, summary = tiny_run
    resolved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert resolved["model"]["dim"] == 64 and resolved["stages"][1]["seq_len"] == 768
    assert load_config(os.path.join(run_dir, "config.yaml")).stages[0].steps == 14
    table = json.load(open(os.path.join(run_dir, "eval.json")))
    assert table and all({"positions", "tokens", "loss", "ppl"} <= set(r) for r in table)
    assert os.path.exists(os.path.join(run_dir, "model.pt"))


def test_tensorboard_events_hold_the_scalars(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tiny_run
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "train/seq_len"):
        assert tag in tags, tags
    history = json.load(open(os.path.join(run_dir, "summary.json")))["history"]
    losses = acc.Scalars("train/loss")
    assert len(losses) == 18
    assert losses[-1].value == pytest.approx(history[-1]["loss"], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/seq_len")][-1] == 768


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    over = SMALL + ["stages.0.steps=1", "stages.1.steps=0", "logging.tensorboard=false"]
    weights = []
    for mb in (1, 4):
        cfg = load_config(TINY, over + [f"stages.0.micro_batch_size={mb}"])
        tr = Trainer(cfg, run_dir=str(tmp_path / f"mb{mb}"), echo=lambda *_: None)
        tr.model.double()
        stage = cfg.stages[0]
        batch = tr.apply_stage(stage).batch(0, stage.rows_per_step(1))
        tr.train_step(batch, stage)
        weights.append(copy.deepcopy(tr.model.state_dict()))
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-9, atol=1e-12)


def test_a_stage_trains_on_its_own_data_settings(tmp_path):
    """stages.N.data: the first stage learns from every token, the next from answers only."""
    over = SMALL + ["stages.0.steps=2", "stages.1.steps=2", "data.loss_on=answer",
                    "stages.0.data.loss_on=all", "logging.tensorboard=false"]
    summary = Trainer(load_config(TINY, over), run_dir=str(tmp_path), echo=lambda *_: None).fit()
    history = json.load(open(tmp_path / "summary.json"))["history"]
    assert summary["steps"] == 4 and [h["stage"] for h in history] == [0, 0, 1, 1]
    first, second = history[0]["loss_tokens"], history[2]["loss_tokens"]
    assert first > 1000 and second < first / 5, (first, second)  # 1536 tokens a step in both


def test_non_finite_loss_stops_naming_step_and_stage(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "dcwdist.cli", "train", TINY, *SMALL,
                           "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0",
                           "--run-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dcwdist: error: non-finite") and "(stage 384)" in last, last


def test_dcw_with_the_learned_scorer_trains_and_logs_tiers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = [o for o in SMALL if o != "attention.kind=dense"] + [
        "stages.0.steps=6", "stages.1.steps=1", "stages.0.micro_batch_size=4",
        "logging.peak_tflops=1.0"]
    cfg = load_config(TINY, over)
    assert cfg.attention.kind == "dcw"
    summary = Trainer(cfg, run_dir=str(tmp_path), echo=lambda *_: None).fit()
    assert summary["last_loss"] < summary["first_loss"]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/scorer/seg_bce", "alpha/layer0"} <= tags, tags
    assert any("core" in t for t in tags), tags
    last = lambda tag: acc.Scalars(tag)[-1].value  # noqa: E731
    # Both MFUs are logged and labelled; DCW computes less attention than dense-equivalent.
    assert 0 < last("train/mfu_computed") < last("train/mfu_dense_equiv")


def test_nonfinite_skip_drops_the_batch_and_goes_on(tmp_path):
    """optim.nonfinite=skip: a batch whose loss is non-finite updates nothing; training goes on."""
    over = SMALL + ["optim.nonfinite=skip", "stages.0.steps=3", "stages.1.steps=0"]
    cfg = load_config(TINY, over)
    lines = []
    trainer = Trainer(cfg, run_dir=str(tmp_path), echo=lines.append)
    real_forward = trainer._forward
    calls = {"n": 0}

    def poisoned(batch):  # the second optimizer step's first micro-batch returns a NaN loss
        loss, ctx = real_forward(batch)
        calls["n"] += 1
        if trainer.step == 1 and loss is not None:
            loss = loss * float("nan")
        return loss, ctx

    trainer._forward = poisoned
    before = {}

    def snapshot():
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    real_step = trainer.train_step

    def step(batch, stage):
        if trainer.step == 1:
            before.update(snapshot())
        out = real_step(batch, stage)
        if trainer.step == 2:
            after = snapshot()
            assert all(torch.equal(before[k], after[k]) for k in before)  # nothing updated
            assert out["skipped"] == 1.0
        return out

    trainer.train_step = step
    summary = trainer.fit()
    assert summary["steps"] == 3
    assert any("batch skipped (optim.nonfinite=skip)" in str(x) for x in lines)
    skipped = [h["skipped"] for h in json.load(open(tmp_path / "summary.json"))["history"]]
    assert skipped == [0.0, 1.0, 0.0]


def test_nonfinite_skip_is_refused_with_deepspeed():
    from dcwdist.configtree import ConfigError
    with pytest.raises((ValueError, ConfigError), match="optim.nonfinite=skip needs the torch"):
        load_config(TINY, SMALL + ["optim.nonfinite=skip", "zero.enabled=true"])
