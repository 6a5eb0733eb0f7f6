"""benchmarks/train_step.py on CPU: a case writes one JSON row with the phase it reached, and a
case past --case-timeout-s is written with status "timeout" instead of taking the run down."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO


def bench(tmp_path, *args):
    out = tmp_path / "rows.jsonl"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks/train_step.py"), "--plan", "smoke",
         "--only", "hf_sdpa", "--device", "cpu", "--timed", "1", "--no-attn-share",
         "--out", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()], proc.stderr


def test_a_case_row_records_its_result_and_last_phase(tmp_path):
    (row,), err = bench(tmp_path)
    assert row["status"] == "ok" and row["tokens_per_s"] > 0
    assert row["phase"].startswith("timed step 1")
    assert "[train_step] tiny hf_sdpa 256: built" in err


def test_a_case_past_its_timeout_is_a_timeout_row(tmp_path):
    (row,), err = bench(tmp_path, "--case-timeout-s", "0.001")
    assert row["status"] == "timeout" and "timeout" in row["error"]
    assert "tokens_per_s" not in row


def test_forced_tiles_run_without_tuning_and_layer_marks_show_the_step(tmp_path):
    tiles = {"fwd": [64, 64, 4, 3], "dq": [64, 64, 4, 3], "dkdv": [64, 64, 4, 2]}
    (row,), err = bench(tmp_path, "--only", "dcwdist_dcw", "--warmup", "0", "--trace-layers",
                        "--tiles", *(f"{k}={','.join(map(str, v))}" for k, v in tiles.items()))
    assert row["status"] == "ok" and row["forced_tiles"] == tiles
    # every kernel of the step ran the forced tile
    assert row["kernel_configs"]
    for key, tile in row["kernel_configs"].items():
        assert tile == tiles[key.split("'")[1]]
    # each layer's forward and its output's gradient, in step order
    marks = [line.split(": ", 1)[1].rsplit(" (", 1)[0] for line in err.splitlines()
             if line.startswith("[train_step] tiny dcwdist_dcw 256: layer")]
    assert marks == ["layer 0 forward done", "layer 1 forward done",
                     "layer 1 output gradient ready", "layer 0 output gradient ready"]


def test_the_core_ratio_sets_the_core_tier_share(tmp_path):
    (small,), _ = bench(tmp_path, "--only", "dcwdist_dcw", "--core-ratio", "0.05")
    (large,), _ = bench(tmp_path, "--only", "dcwdist_dcw", "--core-ratio", "0.5")
    assert small["status"] == large["status"] == "ok"
    assert small["tier_core"] < large["tier_core"]


def test_a_bad_tiles_spec_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks/train_step.py"), "--smoke",
         "--device", "cpu", "--tiles", "fwd=64,64"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--tiles: expected KERNEL=BLOCK_M,BLOCK_N,WARPS,STAGES, got 'fwd=64,64'" in proc.stderr


def test_dense_through_torch_sdpa_is_an_impl(tmp_path):
    (row,), _ = bench(tmp_path, "--only", "dcwdist_sdpa_zero1")
    assert row["status"] == "ok" and row["attention"] == "dense (torch SDPA)"
    assert row["backend"] == "deepspeed zero1 bf16"
