"""benchmarks/train_step.py on CPU: a case writes one JSON row with the phase it reached, and a
case past --case-timeout-s is written with status "timeout" instead of taking the run down."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO


def bench(tmp_path, *args):
    out = tmp_path / "rows.jsonl"
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
