"""The dK/dV tiles that the 64-token layouts of the 100M / 1B models tune over compile for
sm_90a without register spills (Triton offline compile + its bundled ptxas -v; no GPU)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_spanning_dkdv_tile_compiles_for_hopper_without_spills_at_head_dim_64():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_registers.py"),
         "--head-dims", "64", "--blocks", "64", "--kernels", "dkdv",
         "--configs", "32,128,8,2;64,64,4,2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["config"] for r in rows] == [[32, 128, 8, 2], [64, 64, 4, 2]], out.stdout
    for r in rows:
        assert "error" not in r, r
        assert r["ptxas_ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255 and r["shared"] > 0, r
