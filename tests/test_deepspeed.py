"""DeepSpeed ZeRO over two real gloo processes equals plain single-process torch; checkpoints
resume the uninterrupted loss curve exactly; torn checkpoints fall back; SIGTERM saves."""
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import REPO
from tests.distributed import SMALL, losses, run_train, train_cmd, train_env


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("single"))
    return d, run_train(d, SMALL)


def weights(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_on_two_ranks_equals_single_process_adamw(single, tmp_path, stage):
    single_dir, ref = single
    out = run_train(str(tmp_path), SMALL + ["zero.enabled=true", f"zero.stage={stage}"], nproc=2)
    assert "world=2 (dp=2 x cp=1)" in out["stdout"]
    assert losses(out) == pytest.approx(losses(ref), rel=1e-6, abs=1e-6)
    grad_norms = [h["grad_norm"] for h in out["history"]]
    assert grad_norms == pytest.approx([h["grad_norm"] for h in ref["history"]], rel=1e-5)
    a, b = weights(single_dir), weights(str(tmp_path))
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-5, atol=1e-6)


def test_update_equals_single_process_when_ranks_hold_different_loss_token_counts(tmp_path):
    # Loss only on answers: rows (and so ranks) hold very different numbers of loss tokens.
    over = SMALL + ["data.loss_on=answer", "stages.1.steps=0"]
    ref = run_train(str(tmp_path / "one"), over)
    out = run_train(str(tmp_path / "two"), over + ["zero.enabled=true", "zero.stage=2"], nproc=2)
    assert losses(out) == pytest.approx(losses(ref), rel=1e-6, abs=1e-7)
    a, b = weights(str(tmp_path / "one")), weights(str(tmp_path / "two"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("full"))
    over = SMALL + ["zero.enabled=true", "zero.stage=2", "checkpoint.every=2",
                    "checkpoint.keep_last=5"]
    return d, over, run_train(d, over, nproc=2)


def test_resume_reproduces_the_uninterrupted_loss_curve(uninterrupted, tmp_path):
    full_dir, over, full = uninterrupted
    ckpt = os.path.join(full_dir, "checkpoints")
    assert sorted(t for t in os.listdir(ckpt) if t.startswith("step")) == [
        "step00000002", "step00000003", "step00000004", "step00000005"]
    assert open(os.path.join(ckpt, "latest")).read() == "step00000005"
    resumed = run_train(str(tmp_path), over + [f"checkpoint.dir={ckpt}",
                                               f"checkpoint.resume={ckpt}/step00000002"], nproc=2)
    assert "resumed at step 2" in resumed["stdout"]
    assert losses(resumed) == losses(full)[2:]  # the same floats, across the stage switch too
    assert os.path.exists(os.path.join(ckpt, "step00000002", "ds_config.json"))


def test_truncated_newest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    full_dir, over, full = uninterrupted
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(full_dir, "checkpoints"), ckpt)
    for tag in ("step00000005",):  # keep 4 as the newest complete one after the damage
        shutil.rmtree(os.path.join(ckpt, tag))
    newest = os.path.join(ckpt, "step00000004")
    shard = max((os.path.join(r, f) for r, _, fs in os.walk(newest) for f in fs
                 if f.endswith(".pt")), key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    resumed = run_train(str(tmp_path / "run"), over + [f"checkpoint.dir={ckpt}",
                                                       "checkpoint.resume=auto"], nproc=2)
    assert "step00000004 is incomplete or corrupt" in resumed["stdout"]
    assert "resumed at step 3" in resumed["stdout"]
    assert losses(resumed) == losses(full)[3:]


def test_sigterm_saves_a_checkpoint_exits_0_and_resume_continues(tmp_path):
    over = SMALL + ["stages.0.steps=60", "stages.1.steps=0", "optim.warmup_steps=2"]
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen(train_cmd(run_dir, over), env=train_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = os.path.join(run_dir, "last_step")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(last) and int(open(last).read() or 0) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out
    stopped_at = int(open(last).read())
    assert stopped_at < 60
    resumed = run_train(run_dir, over + ["checkpoint.resume=auto"])
    assert f"resumed at step {stopped_at}" in resumed["stdout"]
    assert resumed["steps"] == 60
    reference = run_train(str(tmp_path / "ref"), over)
    assert losses(resumed) == losses(reference)[stopped_at:]


def test_resume_with_a_different_world_size_continues_the_same_loss(uninterrupted, tmp_path):
    # Saved by 2 ranks (ZeRO-2 shards), resumed by 1: converted to a universal checkpoint.
    full_dir, over, full = uninterrupted
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(full_dir, "checkpoints"), ckpt)
    resumed = run_train(str(tmp_path / "run"), over + [f"checkpoint.dir={ckpt}",
                                                       f"checkpoint.resume={ckpt}/step00000003"])
    assert "world=1 (dp=1 x cp=1)" in resumed["stdout"]
    assert "saved with world size 2" in resumed["stdout"]
    assert losses(resumed) == pytest.approx(losses(full)[3:], rel=1e-6)


def test_dcw_with_the_scorer_on_two_ranks_equals_single_process(tmp_path):
    over = [o for o in SMALL if o != "attention.kind=dense"] + [
        "attention.kind=dcw", "stages.1.steps=1", "segmentation.scorer_layers=1",
        "segmentation.scorer_dim=32"]
    ref = run_train(str(tmp_path / "one"), over)
    out = run_train(str(tmp_path / "two"), over + ["zero.enabled=true", "zero.stage=1"], nproc=2)
    assert losses(out) == pytest.approx(losses(ref), rel=1e-5)
    a, b = weights(str(tmp_path / "one")), weights(str(tmp_path / "two"))
    assert any(k.startswith("segmenter.") for k in a) and any(k.endswith("alpha") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_stop_at_drill_checkpoints_exits_0_and_resume_reproduces_the_curve(uninterrupted,
                                                                           tmp_path):
    _, over, full = uninterrupted
    run_dir = str(tmp_path / "run")
    first = subprocess.run(train_cmd(run_dir, over + ["checkpoint.stop_at=3"], nproc=2),
                           env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stopped by checkpoint.stop_at at step 3" in first.stdout + first.stderr
    resumed = run_train(run_dir, over + ["checkpoint.resume=auto"], nproc=2)
    assert "resumed at step 3" in resumed["stdout"]
    assert losses(resumed) == losses(full)[3:]
