"""Retrieval / QA tasks scored through predictor callables, heat-map PNG, RULER reader."""
import json
import re

import numpy as np
import pytest

from dcwdist.data_pipelines.tokenizer import build_tokenizer
from dcwdist.eval.generate import encode_prompt
from dcwdist.eval.heatmap import plot_heatmap
from dcwdist.eval.ruler import read_ruler, score_ruler
from dcwdist.eval.tasks import kv_prompt, needle_prompt, qa_eval, retrieval_grid

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


def test_heatmap_is_a_valid_png(tmp_path):
    import matplotlib.image as mpimg
    rows = [{"length": n, "depth": d, "score": (i + j) / 4}
            for i, n in enumerate(LENGTHS) for j, d in enumerate(DEPTHS)]
    path = plot_heatmap(rows, str(tmp_path / "h.png"), "needle")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


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
