"""Tiles that span two 64-token layout blocks (the 100M / 1B models' layouts) compile for
sm_90a without register spills (Triton offline compile + its bundled ptxas -v; no GPU)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_spanning_tiles_compile_for_hopper_without_spills_at_head_dim_64():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_registers.py"),
         "--head-dims", "64", "--blocks", "64", "--kernels", "fwd,dkdv",
         "--configs", "128,64,8,3;32,128,8,2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    # the 128-query tile serves the forward, the 128-key tile dK/dV (each skips the other)
    assert [(r["kernel"], r["config"]) for r in rows] == [("fwd", [128, 64, 8, 3]),
                                                          ("dkdv", [32, 128, 8, 2])], out.stdout
    for r in rows:
        assert "error" not in r, r
        assert r["ptxas_ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255 and r["shared"] > 0, r
