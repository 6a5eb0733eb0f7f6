"""benchmarks/length_transfer.py: the answer loss it reports at a run's trained length and RoPE is
the trainer's own held-out eval, its distance buckets add up, and it reads checkpoints too."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcwdist.attention.context import ROLE_ANSWER, ROLE_DOCUMENT, ROLE_INSTRUCTION
from dcwdist.data_pipelines.packing import Batch
from tests.test_eval_cli import REPO, _cli

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from length_transfer import answer_distances, per_answer  # noqa: E402

TRAIN = ["recipes/tiny_cpu.yaml", "model.dim=32", "model.n_layers=1",
         "segmentation.scorer_layers=1", "segmentation.scorer_dim=16",
         "segmentation.scorer_heads=2",
         "stages.0.seq_len=256", "stages.0.steps=2", "stages.0.batch_tokens=512",
         "stages.1.seq_len=512", "stages.1.steps=1", "stages.1.batch_tokens=512",
         "data.min_doc_len=100", "data.num_facts=1", "data.eval_rows=2", "data.loss_on=answer",
         "checkpoint.every=2", "logging.progress=false", "logging.log_every=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("transfer") / "run")
    _cli("train", *TRAIN, "--run-dir", d)
    return d


def _transfer(*args):
    proc = subprocess.run([sys.executable, "benchmarks/length_transfer.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


def _eval_answer_loss(run_dir):
    ea = EventAccumulator(os.path.join(run_dir, "tb"))
    ea.Reload()
    return ea.Scalars("eval/answer_loss")[-1].value


def test_answer_loss_at_the_trained_length_is_the_trainers_held_out_eval(run_dir):
    lines = _transfer(run_dir, "--lengths", "512", "--rope", "stage,none", "--rows", "2",
                      "device=cpu")
    assert [(x["length"], x["rope"]) for x in lines] == [(512, "stage"), (512, "none")]
    stage = lines[0]
    assert stage["answer_loss"] == pytest.approx(_eval_answer_loss(run_dir), abs=2e-4)
    buckets = stage["by_distance"].values()
    assert sum(b["tokens"] for b in buckets) == stage["answer_tokens"] > 0
    mean = sum(b["loss"] * b["tokens"] for b in buckets) / stage["answer_tokens"]
    assert mean == pytest.approx(stage["answer_loss"], abs=1e-3)
    # retrieval accuracy counts answers, and the buckets' answers add up to them
    assert sum(b["answers"] for b in buckets) == stage["answers"] > 0
    assert 0 <= stage["answer_acc"] <= 100
    hits = sum(b["acc"] * b["answers"] for b in buckets) / 100
    assert hits == pytest.approx(stage["answer_acc"] * stage["answers"] / 100, abs=1e-6)
    assert lines[1]["answer_tokens"] == stage["answer_tokens"]  # same rows, other RoPE


def test_reads_a_checkpoint_and_appends_json_lines(run_dir, tmp_path):
    tags = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    tag = next(t for t in tags if t != "latest")
    out = str(tmp_path / "t.jsonl")
    lines = _transfer(run_dir, "--checkpoint", tag, "--lengths", "256", "--rope", "yarn:2",
                      "--rows", "1", "--out", out, "device=cpu")
    assert lines[0]["checkpoint"] == tag and math.isfinite(lines[0]["answer_loss"])
    assert [json.loads(x) for x in open(out)] == lines


def test_all_checkpoints_give_answer_loss_over_training_in_step_order(run_dir):
    saved = sorted(t for t in os.listdir(os.path.join(run_dir, "checkpoints"))
                   if t.startswith("step"))
    assert len(saved) >= 2
    lines = _transfer(run_dir, "--checkpoint", "all", "--lengths", "256", "--rope", "none",
                      "--rows", "1", "device=cpu")
    assert [x["checkpoint"] for x in lines] == saved
    one = _transfer(run_dir, "--checkpoint", saved[-1], "--lengths", "256", "--rope", "none",
                    "--rows", "1", "device=cpu")
    assert one[0]["answer_loss"] == lines[-1]["answer_loss"]


def test_a_missing_checkpoint_is_one_clear_error(run_dir):
    proc = subprocess.run([sys.executable, "benchmarks/length_transfer.py", run_dir,
                           "--checkpoint", "step_99999999", "device=cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "state.pt does not exist" in proc.stderr


def test_distance_is_counted_from_the_documents_last_fact_token():
    # doc 0: instruction (relevant, not a fact), fact at 3-4, answer at 7-8 (distance 3);
    # doc 1: fact at 10, answer at 12-13 (distance 2, nearer than doc 0's); doc 2: no fact
    roles = [ROLE_INSTRUCTION] * 2 + [ROLE_DOCUMENT] * 5 + [ROLE_ANSWER] * 2 + \
            [ROLE_DOCUMENT] * 3 + [ROLE_ANSWER] * 2 + [ROLE_DOCUMENT] * 2 + [ROLE_ANSWER]
    rel = [1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1]
    docs = [0] * 9 + [1] * 5 + [2] * 3
    t = lambda x, dt=torch.long: torch.tensor([x], dtype=dt)  # noqa: E731
    n = len(roles)
    batch = Batch(tokens=t([0] * n), labels=t([0] * n), positions=t(list(range(n))),
                  doc_ids=t(docs), roles=t(roles), relevance=t(rel, torch.float32))
    assert answer_distances(batch)[0].tolist() == \
        [-1] * 7 + [3, 3] + [-1] * 3 + [2, 2] + [-1] * 3


def test_plot_draws_the_cases_of_a_results_file(run_dir, tmp_path):
    out, png = str(tmp_path / "t.jsonl"), str(tmp_path / "t.png")
    _transfer(run_dir, "--lengths", "512", "--rope", "stage", "--rows", "1", "--out", out,
              "device=cpu")
    _transfer("--plot", out, "--png", png, "--lengths", "512")
    assert os.path.getsize(png) > 10_000
    acc_png = str(tmp_path / "acc.png")  # its own file: the loss plot cannot stand in for it
    _transfer("--plot", out, "--png", acc_png, "--lengths", "512", "--metric", "acc")
    assert os.path.getsize(acc_png) > 10_000


def test_an_answer_is_retrieved_only_if_every_token_is_predicted():
    # two answers in one row: tokens 2-3 (both right) and 6-8 (one wrong)
    ans = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    right = torch.tensor([0, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    ce = torch.tensor([9, 9, 0.5, 1.5, 9, 9, 1.0, 2.0, 3.0, 9])
    dist = torch.tensor([-1, -1, 40, 40, -1, -1, 700, 700, 700, -1])
    got = per_answer(ce, right, ans, dist)
    assert [(d, ok) for d, ok, _ in got] == [(40, True), (700, False)]
    assert [x for _, _, x in got] == pytest.approx([1.0, 2.0])
