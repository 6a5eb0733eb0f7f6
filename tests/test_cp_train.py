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
