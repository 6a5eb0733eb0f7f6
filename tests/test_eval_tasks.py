"""Retrieval / QA tasks scored through predictor callables, heat-map PNG, RULER reader."""
import json
import re

import numpy as np
import pytest

from dcwdist.data_pipelines.tokenizer import build_tokenizer
from dcwdist.eval.generate import encode_prompt
from dcwdist.eval.heatmap import plot_heatmap
from dcwdist.eval.ruler import read_ruler, score_ruler
from dcwdist.eval.tasks import fact_prompt, kv_prompt, needle_prompt, qa_eval, retrieval_grid

TOK = build_tokenizer("byte")
LENGTHS, DEPTHS = [256, 1024], [0.0, 0.5, 1.0]


def needle_oracle(p):
    """Reads the needle out of the document (it never sees the answer field)."""
    key = re.search(r"number for (\w+)\?", p.instruction).group(1)
    return re.search(rf"number for {key} is (\d+)", p.document).group(1)


def kv_oracle(p):
    key = re.search(r'key "(\w+)"', p.instruction).group(1)
    return re.search(rf'"{key}": "(\d+)"', p.document).group(1)


def test_needle_oracle_scores_100_and_a_guesser_0():
    rows = retrieval_grid(needle_oracle, TOK, needle_prompt, LENGTHS, DEPTHS, seed=0, samples=2)
    assert len(rows) == len(LENGTHS) * len(DEPTHS)
    assert all(r["score"] == 1.0 for r in rows)
    guesser = lambda p: " 1000"  # noqa: E731  (a fixed guess: never the needle, bar chance)
    rows = retrieval_grid(guesser, TOK, needle_prompt, LENGTHS, DEPTHS, seed=0, samples=2)
    assert np.mean([r["score"] for r in rows]) < 0.1


def test_needle_sits_at_its_depth_and_prompt_has_its_length():
    for n in (512, 2048):
        for d in DEPTHS:
            p = needle_prompt(TOK, n, d, seed=1)
            assert n - 80 <= len(encode_prompt(TOK, p)[0]) <= n
            at = p.document.index("special magic number") / len(p.document)
            assert abs(at - d) < 0.15


def test_kv_oracle_and_qa_oracle():
    rows = retrieval_grid(kv_oracle, TOK, kv_prompt, [512], DEPTHS, seed=0)
    assert all(r["score"] == 1.0 for r in rows)
    qa_rows, records = qa_eval(lambda p: p.answer, TOK, [512], seed=3, samples=3)
    assert qa_rows[0]["em"] == 100.0 and qa_rows[0]["f1"] == 100.0
    assert qa_rows[0]["rouge_l"] == 100.0 and qa_rows[0]["hallucination_rate"] == 0.0
    made_up, _ = qa_eval(lambda p: " 0999 or 1000", TOK, [512], seed=3, samples=3)
    assert made_up[0]["em"] == 0.0 and made_up[0]["answers_with_value"] == 3


def fact_oracle(p):
    """The training task read the way the instruction asks: topic, key and section."""
    topic, key, sec = re.search(r"the (\w+) value of (\S+) in section ([\d.]+)\?",
                                p.instruction).groups()
    section = re.search(rf"Section {re.escape(sec)}\. (.*?)\n", p.document).group(1)
    return re.search(rf"The {topic} value of {re.escape(key)} is (\d+)\.", section).group(1)


def test_fact_task_is_the_training_format_at_its_depth():
    from dcwdist.data_pipelines.packing import encode_example
    from dcwdist.data_pipelines.synthetic import Example

    rows = retrieval_grid(fact_oracle, TOK, fact_prompt, [256, 2048], DEPTHS, seed=0, samples=2)
    assert all(r["score"] == 1.0 for r in rows) and "answer_loss" not in rows[0]
    for n in (256, 2048, 8192):
        for d in DEPTHS:
            p = fact_prompt(TOK, n, d, seed=1)
            seg = encode_example(TOK, Example(p.instruction, p.document, p.answer,
                                              p.relevant_spans))
            assert n - 80 <= len(seg.tokens) <= n  # prompt + answer + <eos> fit the row
            (a, b), = p.relevant_spans
            assert p.document[a:b] == f"The {p.instruction.split()[3]} value of " \
                                      f"{p.instruction.split()[6]} is {p.answer.strip()}."
            if n > 256:  # a 256-token document holds two or three sentences
                assert abs(a / len(p.document) - d) < 0.1


def test_heatmap_is_a_valid_png(tmp_path):
    import matplotlib.image as mpimg
    rows = [{"length": n, "depth": d, "score": (i + j) / 4}
            for i, n in enumerate(LENGTHS) for j, d in enumerate(DEPTHS)]
    path = plot_heatmap(rows, str(tmp_path / "h.png"), "needle")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    for r in rows:
        r["answer_loss"] = 1.5 * r["score"]
    loss = plot_heatmap(rows, str(tmp_path / "l.png"), "fact", key="answer_loss", chance=1.52)
    assert mpimg.imread(loss).shape[0] > 50


def test_ruler_reader_scores_a_fixture(tmp_path):
    recs = [{"index": 0, "input": "ctx A. What are the numbers?", "outputs": ["11", "22"],
             "length": 4096, "answer_prefix": " Answer:"},
            {"index": 1, "input": "ctx B. Which city?", "outputs": ["Paris"], "length": 4096},
            {"index": 2, "input": "ctx C. Which word?", "outputs": ["apple", "pear"],
             "length": 8192}]
    path = tmp_path / "niah.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    samples = read_ruler(str(path))
    assert [s.length for s in samples] == [4096, 4096, 8192]
    assert samples[0].prompt().document.endswith("numbers? Answer:")
    canned = {"ctx A": "11 and 33", "ctx B": "it is PARIS", "ctx C": "banana"}
    predictor = lambda p: canned[p.document[:5]]  # noqa: E731
    rows, records = score_ruler(samples, predictor)
    by = {r["length"]: r for r in rows}
    assert by[4096]["score"] == pytest.approx(75.0) and by[4096]["n"] == 2  # (1/2 + 1) / 2
    assert by[8192]["score"] == 0.0
    assert by["all"]["score"] == pytest.approx(50.0)
    rows, _ = score_ruler(samples, predictor, metric="part")
    assert {r["length"]: r["score"] for r in rows}[4096] == 100.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_ruler(str(bad))


def test_answer_loss_is_the_mean_nll_of_the_answer_digits_space_and_eos():
    import os

    import torch

    from dcwdist.config import load_config
    from dcwdist.eval.positions import AnswerLoss
    from dcwdist.train.trainer import build_model
    from tests.conftest import REPO

    cfg = load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"),
                      ["attention.kind=dense", "model.dim=32", "model.n_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg, cfg.attention).eval()
    p = fact_prompt(TOK, 512, 0.5, seed=2)
    got = AnswerLoss(model, TOK, align=32)(p)
    ids, _ = encode_prompt(TOK, p)  # <instr> .. <doc> .. <answer>
    targets = TOK.encode(p.answer) + [TOK.special_ids["<eos>"]]
    full = torch.tensor([ids + targets])
    from dcwdist.attention.context import AttnContext
    n = full.shape[1]
    ctx = AttnContext(doc_ids=torch.zeros(1, n, dtype=torch.long),
                      positions=torch.arange(n)[None])
    with torch.no_grad():
        logits = model.logits(model(full, ctx))[0].float()
    nll = torch.nn.functional.cross_entropy(logits[len(ids) - 1:-1], torch.tensor(targets))
    assert len(targets) == 6
    assert got == pytest.approx(float(nll), rel=1e-4)
