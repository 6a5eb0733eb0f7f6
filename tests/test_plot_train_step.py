"""benchmarks/plot_train_step.py: rows of one (model, impl) with different memory options or
core-tier shares are separate series, and a cold first-step row is drawn and labelled."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from plot_train_step import base_impl, variant  # noqa: E402


def row(**kw):
    r = {"model": "qwen2_100m", "impl": "dcwdist_dcw_zero1", "length": 131072, "status": "ok",
         "tokens_per_s": 1000.0, "peak_gib": 10.0, "warmup_steps": 1, "tier_core": 0.2}
    r.update(kw)
    return r


def test_series_name_the_options_and_the_core_share():
    assert variant(row()) == "dcwdist_dcw_zero1"
    long = row(offload_activations=True, tiled_mlp=8192, keep_attention_outputs=False,
               tier_core=0.05)
    assert variant(long) == "dcwdist_dcw_zero1_offload_tiled_recompute_core5%"
    assert base_impl(variant(long)) == "dcwdist_dcw_zero1"
    assert base_impl(variant(row(impl="dcwdist_sdpa_zero1", tier_core=None))) == \
        "dcwdist_sdpa_zero1"


def test_a_plot_with_cold_rows_is_written(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in (
        row(), row(length=2097152, warmup_steps=0, tier_core=0.05, tokens_per_s=12000.0),
        row(impl="hf_liger", tier_core=None))) + "\n")
    png, merged = tmp_path / "p.png", tmp_path / "p.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks/plot_train_step.py"),
                           str(rows), "--png", str(png), "--json", str(merged)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.stat().st_size > 10_000
    series = {r["series"] for r in json.loads(merged.read_text())["rows"]}
    assert series == {"dcwdist_dcw_zero1", "dcwdist_dcw_zero1_core5%", "hf_liger"}
