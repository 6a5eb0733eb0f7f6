"""benchmarks/quality.py refuses to start training when its eval suites cannot run."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = """
import sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
{block}
import quality
sys.exit(quality.main(["recipes/tiny_cpu.yaml", "--out", {out!r}] + {extra!r}))
"""


def _driver(tmp_path, extra, block=""):
    code = RUN.format(repo=REPO, bench=os.path.join(REPO, "benchmarks"), block=block,
                      out=str(tmp_path / "q"), extra=extra)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_missing_rouge_stops_the_study_before_any_training(tmp_path):
    # rouge_score made unimportable in that interpreter: the qa suite's ROUGE-L cannot run
    r = _driver(tmp_path, ["--eval-args", "--suite qa,speed --lengths 2k"],
                block="sys.modules['rouge_score'] = None")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "rouge-score" in lines[0] and "--no-eval" in lines[0]
    assert not os.path.exists(tmp_path / "q" / "runs"), "nothing may start"


def test_suites_without_qa_do_not_need_rouge():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import argparse

    import quality
    ns = argparse.Namespace(no_eval=False, eval_args="--suite needle,speed --lengths 2k")
    assert quality.eval_missing(ns) == ""
    ns = argparse.Namespace(no_eval=True, eval_args="--suite qa")
    assert quality.eval_missing(ns) == ""
    ns = argparse.Namespace(no_eval=False, eval_args="--suite=qa --lengths 2k")
    assert quality.eval_missing(ns) == ""  # rouge-score is installed here


def test_tag_tells_apart_runs_of_drivers_run_side_by_side():
    # trial 14 runs one driver per shared start, each with the same recipes and seed
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import quality
    assert quality.run_name("recipes/ablations/quality_dcw.yaml", None) == "quality_dcw"
    assert quality.run_name("recipes/ablations/quality_dcw.yaml", 0) == "quality_dcw_s0"
    names = {quality.run_name("x/shared_dcw.yaml", 0, f"from_{s}") for s in ("dense_s0", "dcw_s0")}
    assert names == {"shared_dcw_s0_from_dense_s0", "shared_dcw_s0_from_dcw_s0"}
