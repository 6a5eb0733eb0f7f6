"""JobConfig.deterministic: two runs of one seed take the same steps, through torch's
deterministic algorithms and the kernels' first fitting tile (here on CPU, through the torch
attention path: the setting is wired, not a GPU proof). The setting is process-wide, so
each run is its own interpreter (as `dcwdist train` is)."""
import json
import os
import subprocess
import sys

from dcwdist.cli import main
from dcwdist.train.logging import compare_scalars
from tests.conftest import REPO

SCRIPT = r"""
import json, sys, torch
from dcwdist.config import load_config
from dcwdist.kernels import _block_sparse_plan
from dcwdist.train.trainer import Trainer
cfg = load_config(sys.argv[1], sys.argv[3:])
lines = []
summary = Trainer(cfg, run_dir=sys.argv[2], echo=lines.append).fit()
print(json.dumps({"summary": summary, "det": torch.are_deterministic_algorithms_enabled(),
                  "autotune": _block_sparse_plan.AUTOTUNE, "banner": lines[0]}))
"""
OVER = ["attention.impl=torch", "model.dim=64", "model.n_layers=2", "stages.0.seq_len=384",
        "stages.0.steps=2", "stages.0.batch_tokens=768", "stages.0.micro_batch_size=2",
        "stages.1.seq_len=768", "stages.1.steps=1", "stages.1.batch_tokens=768",
        "stages.1.micro_batch_size=1", "stages.1.rope.original_max_len=384", "data.eval_rows=1",
        "logging.progress=false"]


def run(tmp_path, name, *extra):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(REPO, "recipes/tiny_cpu.yaml"),
                          str(tmp_path / name), *OVER, *extra], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_deterministic_runs_of_one_seed_take_the_same_steps(tmp_path):
    a = run(tmp_path, "a", "deterministic=true")
    b = run(tmp_path, "b", "deterministic=true")
    assert a["det"] and not a["autotune"] and "deterministic" in a["banner"]
    for key in ("first_loss", "last_loss"):
        assert a["summary"][key] == b["summary"][key], (a["summary"], b["summary"])
    # `dcwdist tb A --against B` reads both TensorBoard logs and finds every scalar equal
    rows = {r["scalar"]: r for r in compare_scalars(str(tmp_path / "a"), str(tmp_path / "b"))}
    assert rows["train/loss"]["steps"] == 3 and all(r["differ"] == 0 for r in rows.values())
    assert "train/tokens_per_s" not in rows  # timings differ between identical runs
    assert main(["tb", str(tmp_path / "a"), "--against", str(tmp_path / "b")]) == 0


def test_runs_are_not_made_deterministic_unless_asked(tmp_path):
    c = run(tmp_path, "c", "stages.0.steps=1", "stages.1.steps=1")
    assert not c["det"] and c["autotune"] and "deterministic" not in c["banner"]
    # another seed is another run, and the comparison says so (exit 1)
    run(tmp_path, "d", "stages.0.steps=1", "stages.1.steps=1", "seed=1")
    rows = {r["scalar"]: r for r in compare_scalars(str(tmp_path / "c"), str(tmp_path / "d"))}
    assert rows["train/loss"]["first_differing_step"] == 1
    assert main(["tb", str(tmp_path / "c"), "--against", str(tmp_path / "d")]) == 1
