"""`dcwdist eval --suite` and `dcwdist generate` end to end on a tiny trained run."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

TRAIN = ["recipes/tiny_cpu.yaml", "attention.kind=dense", "model.dim=32", "model.n_layers=1",
         "stages.0.seq_len=512", "stages.0.steps=2", "stages.0.batch_tokens=512",
         "stages.1.steps=0", "logging.progress=false"]


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "dcwdist.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("evalrun") / "run")
    _cli("train", *TRAIN, "--run-dir", d)
    return d


def test_eval_suite_ppl_qa_end_to_end(run_dir, tmp_path):
    out = str(tmp_path / "ev")
    proc = _cli("eval", run_dir, "--suite", "ppl,qa", "--lengths", "512", "--out", out,
                "--no-progress")
    res = json.load(open(os.path.join(out, "results.json")))
    qa = res["qa"][0]
    assert qa["length"] == 512 and qa["n"] == 8
    assert {"em", "f1", "rouge_l", "hallucination_rate"} <= set(qa)
    assert len(res["qa_answers"]) == 8
    assert res["ppl"] and all(r["length"] == 512 and r["loss"] > 0 for r in res["ppl"])
    report = open(os.path.join(out, "report.md")).read()
    assert "Held-out synthetic QA" in report and "Loss by position" in report
    assert "hallucination_rate" in proc.stdout


def test_eval_suite_fact_gives_an_answer_loss_heatmap(run_dir, tmp_path):
    out = str(tmp_path / "fact")
    _cli("eval", run_dir, "--suite", "fact", "--lengths", "256,512", "--depths", "0,1",
         "--out", out, "--no-progress")
    res = json.load(open(os.path.join(out, "results.json")))
    assert [(r["length"], r["depth"]) for r in res["fact"]] == [(256, 0.0), (256, 1.0),
                                                                (512, 0.0), (512, 1.0)]
    assert all(0 < r["answer_loss"] < 10 and 0 <= r["score"] <= 1 for r in res["fact"])
    with open(res["fact_heatmap"], "rb") as f:
        assert f.read(4) == b"\x89PNG"
    report = open(os.path.join(out, "report.md")).read()
    assert "teacher-forced answer loss" in report and "0% loss" in report


def test_generate_with_an_evicting_cache(run_dir, tmp_path):
    prompt = tmp_path / "p.json"
    prompt.write_text(json.dumps({"instruction": "What is the value of AB-12?",
                                  "document": "The audit value of AB-12 is 4821. " * 3}))
    proc = _cli("generate", run_dir, "--prompt-file", str(prompt), "--max-new-tokens", "4",
                "--policy", "h2o", "--budget", "16", "--stats")
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats["policy"] == "h2o" and stats["new_tokens"] <= 4
    assert max(max(r) for r in stats["peak_cache_per_head"]) <= 16
