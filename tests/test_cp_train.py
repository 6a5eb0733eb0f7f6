"""End to end: `dcwdist train` with zero + parallel.cp=2 on 2 processes equals one process."""
import pytest

from tests.distributed import SMALL, losses, run_train


@pytest.mark.parametrize("kind", ["dense", "dcw"])
def test_cp2_training_equals_single_process(tmp_path, kind):
    """dcw: the tiny recipe's causal scorer (joint phase) runs on the gathered sequence."""
    over = [o for o in SMALL if not o.startswith("attention.kind=")]
    over += [f"attention.kind={kind}", "stages.1.steps=1"]
    ref = run_train(str(tmp_path / "one"), over)
    out = run_train(str(tmp_path / "cp2"), over + ["zero.enabled=true", "parallel.cp=2"], nproc=2)
    assert "world=2 (dp=1 x cp=2)" in out["stdout"]
    assert losses(out) == pytest.approx(losses(ref), rel=1e-5, abs=1e-6)
    assert [h["loss_tokens"] for h in out["history"]] == [h["loss_tokens"] for h in ref["history"]]
    assert [h["grad_norm"] for h in out["history"]] == pytest.approx(
        [h["grad_norm"] for h in ref["history"]], rel=1e-4)
    if kind == "dcw":  # scorer metrics are counted once per row, not once per cp rank
        assert [h["scorer/tier_core"] for h in out["history"]] == pytest.approx(
            [h["scorer/tier_core"] for h in ref["history"]], rel=1e-6)


def test_resume_with_a_changed_cp_degree_continues_the_same_loss(tmp_path):
    from tests.distributed import SMALL, losses, run_train
    over = SMALL + ["zero.enabled=true", "zero.stage=1", "checkpoint.every=2",
                    "checkpoint.keep_last=5"]
    full = run_train(str(tmp_path / "cp2"), over + ["parallel.cp=2"], nproc=2)
    ckpt = str(tmp_path / "cp2" / "checkpoints")
    resumed = run_train(str(tmp_path / "cp1"), over + [
        "parallel.cp=1", f"checkpoint.dir={ckpt}", f"checkpoint.resume={ckpt}/step00000002"],
        nproc=2)
    assert "dp=2 x cp=1" in resumed["stdout"] and "resumed at step 2" in resumed["stdout"]
    assert losses(resumed) == pytest.approx(losses(full)[2:], rel=1e-6)
