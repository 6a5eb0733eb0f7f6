"""`dcwdist report`: one table and plots over real finished runs (TensorBoard + eval JSON); the
oracle scorer (tiers from labels, also at eval) and the validation loss logged at each stage."""
import json
import os
import shutil

import pytest
import torch

from dcwdist.attention.context import TIER_CORE, AttnContext
from tests.test_eval_cli import _cli

TRAIN = ["recipes/tiny_cpu.yaml", "model.dim=32", "model.n_layers=1",
         "segmentation.scorer_layers=1",
         "segmentation.scorer_dim=16", "segmentation.scorer_heads=2",
         "stages.0.seq_len=256", "stages.0.steps=2", "stages.0.batch_tokens=512",
         "stages.1.seq_len=512", "stages.1.steps=1", "stages.1.batch_tokens=512",
         "data.min_doc_len=100", "data.num_facts=1", "data.eval_rows=1",
         "logging.progress=false", "logging.log_every=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    out = {}
    for name, extra in (("dense", ["attention.kind=dense"]),
                        ("oracle", ["segmentation.scorer=oracle"])):
        d = str(root / name)
        _cli("train", *TRAIN, *extra, "--run-dir", d)
        _cli("eval", d, "--suite", "qa,speed", "--lengths", "512", "--qa-samples", "2",
             "--out", os.path.join(d, "eval_suite"), "--no-progress")
        out[name] = d
    return out


def test_report_has_a_row_per_run_with_stage_losses_quality_and_cost(runs, tmp_path):
    out = str(tmp_path / "rep")
    proc = _cli("report", runs["dense"], runs["oracle"], "--out", out, "--title", "t")
    data = json.load(open(os.path.join(out, "report.json")))
    rows = {r["run"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "oracle"}
    assert rows["oracle"]["attention"] == "dcw (oracle)"
    for r in rows.values():  # validation loss at both stages' ends, QA and FLOPs filled in
        assert r["val loss 256"] != "–" and r["val loss 512"] != "–", r
        assert r["QA EM"] != "–" and r["attn FLOPs % dense @512"] != "–", r
    assert rows["dense"]["attn FLOPs % dense @512"] == "100.0"
    assert float(rows["oracle"]["attn FLOPs % dense @512"]) < 100
    assert os.path.exists(os.path.join(out, "val_loss.png"))
    assert "| dense |" in proc.stdout.replace(" ", "").replace("|dense|", "| dense |")


def test_a_reused_run_dir_reports_only_its_own_stage_lengths(runs, tmp_path):
    from dcwdist.eval.report import run_summary
    d = str(tmp_path / "reused")
    shutil.copytree(runs["dense"], d)
    _cli("train", *TRAIN, "attention.kind=dense", "stages.1.seq_len=1024",
         "stages.1.batch_tokens=1024", "--run-dir", d)
    assert sorted(run_summary(d)["val_loss"]) == [256, 1024]


def test_seeds_of_one_recipe_aggregate_into_one_row_with_mean_and_std(runs, tmp_path):
    d = str(tmp_path / "dense_s1")
    _cli("train", *TRAIN, "attention.kind=dense", "seed=1", "--run-dir", d)
    out = str(tmp_path / "rep")
    _cli("report", runs["dense"], d, runs["oracle"], "--out", out)
    data = json.load(open(os.path.join(out, "report.json")))
    by = {r["attention"]: r for r in data["seed_rows"]}
    assert len(by) == 2 and by["dense"]["seeds"] == "0,1" and by["dcw (oracle)"]["seeds"] == "0"
    a = [r["val_answer_loss"]["512"] for r in data["runs"] if r["kind"] == "dense"]
    assert by["dense"]["answer loss 512"].startswith(f"{sum(a) / 2:.3f} ± ")
    assert "Over seeds" in open(os.path.join(out, "report.md")).read()


def test_report_names_a_missing_run_dir(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "dcwdist.cli", "report", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "nope does not exist" in proc.stderr


def test_oracle_scorer_tiers_come_from_the_labels_and_need_them():
    from dcwdist.attention.config import AttentionConfig
    from dcwdist.segmentation import SegmentationConfig, build_segmenter
    attn = AttentionConfig(kind="dcw", block_size=8)
    seg = build_segmenter(SegmentationConfig(scorer="oracle", scorer_layers=1, scorer_dim=16,
                                             scorer_heads=2), 32, attn)
    T = 64
    doc = torch.zeros(1, T, dtype=torch.long)
    rel = torch.zeros(1, T)
    rel[0, 40:44] = 1.0  # a relevant span in block 5: the block before it (4) decides core
    ctx = AttnContext(doc_ids=doc, positions=torch.arange(T)[None], cache={"relevance": rel})
    seg(torch.randn(1, T, 32), torch.zeros(1, T, dtype=torch.long), ctx)
    core = (ctx.tiers[0] == TIER_CORE).nonzero().flatten().tolist()
    assert 5 in core and 0 in core  # the relevant block, and the document's first block
    ctx = AttnContext(doc_ids=doc, positions=torch.arange(T)[None])
    with pytest.raises(ValueError, match="scorer=oracle needs relevance labels"):
        seg(torch.randn(1, T, 32), torch.zeros(1, T, dtype=torch.long), ctx)


def test_eval_prompts_carry_relevance_where_the_needle_is():
    from dcwdist.data_pipelines.tokenizer import build_tokenizer
    from dcwdist.eval.generate import encode_prompt, prompt_relevance
    from dcwdist.eval.tasks import kv_prompt, needle_prompt
    tok = build_tokenizer("byte")
    for make in (needle_prompt, kv_prompt):
        p = make(tok, 512, 0.5, seed=0)
        ids, _ = encode_prompt(tok, p)
        rel = prompt_relevance(tok, p)
        assert len(rel) == len(ids)
        marked = bytes(ids[i] for i, r in enumerate(rel) if r and ids[i] < 256).decode()
        assert p.answer.strip() in marked
