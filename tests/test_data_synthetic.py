"""The synthetic DCW generator: deterministic, labels mark exactly the key sections on the
answer's chain, and the answer can be read back from the labelled text alone."""
import hashlib
import json
import re

import pytest

from dcwdist.data_pipelines import build_rows
from dcwdist.data_pipelines.config import DataConfig
from dcwdist.data_pipelines.sources import iter_examples
from dcwdist.data_pipelines.synthetic import make_example, write_synthetic

VALUE = r"(?:is|shall be) (\d{4})\.|\| ([A-Z]{2}-\d{2}) \| (\d{4}) \|"


def test_basic_output_is_pinned():
    out = [json.dumps(make_example(3, i, 1500, 4, sp).__dict__, sort_keys=True)
           for sp in ("specific", "keyed", "vague") for i in range(5)]
    digest = hashlib.sha256("".join(out).encode()).hexdigest()
    assert digest == "14a7e9713c5389934754987ae3f91fbef7c07ba087afc01dd2f5945b7e148549"


@pytest.mark.parametrize("style,hops", [("basic", 1), ("rich", 1), ("rich", 2), ("rich", 3)])
def test_deterministic(style, hops):
    a = make_example(5, 17, 3000, 4, "keyed", style=style, hops=hops)
    b = make_example(5, 17, 3000, 4, "keyed", style=style, hops=hops)
    c = make_example(5, 18, 3000, 4, "keyed", style=style, hops=hops)
    assert a == b and a != c


def _key_sections(doc: str, key: str):
    """Every key section about `key`: fact sentence, clause, table row or cross-reference."""
    pats = [rf"The \w+ value of {key} (?:is \d{{4}}|equals the value of [A-Z]{{2}}-\d{{2}})\.",
            rf"Clause \d+\([a-h]\): the \w+ value of {key} shall be \d{{4}}\.",
            rf"\| {key} \| \d{{4}} \|"]
    return sorted((m.start(), m.end()) for p in pats for m in re.finditer(p, doc))


def _follow(texts: list[str], key: str) -> str:
    """Resolve `key` using only the labelled texts."""
    for _ in range(5):
        for t in texts:
            m = re.search(rf"{key} equals the value of ([A-Z]{{2}}-\d{{2}})", t)
            if m:
                key = m.group(1)
                break
        else:
            for t in texts:
                m = re.search(rf"{key}(?: is| shall be| \|) (\d{{4}})", t)
                if m:
                    return m.group(1)
    raise AssertionError(f"cannot resolve {key} from {texts}")


@pytest.mark.parametrize("hops", [1, 2, 3])
@pytest.mark.parametrize("index", range(6))
def test_labels_mark_exactly_the_chain_and_answer_is_recoverable(hops, index):
    ex = make_example(11, index, 4000, 5, "keyed", style="rich", hops=hops)
    key = re.search(r"[A-Z]{2}-\d{2}", ex.instruction).group(0)
    chain, want, k = [], [], key
    for _ in range(hops):  # walk the chain through the whole document
        chain.append(k)
        want += _key_sections(ex.document, k)
        m = re.search(rf"{k} equals the value of ([A-Z]{{2}}-\d{{2}})", ex.document)
        if m:
            k = m.group(1)
    assert sorted(ex.relevant_spans) == sorted(want), "labels = the chain's key sections"
    texts = [ex.document[s:e] for s, e in ex.relevant_spans]
    assert _follow(texts, key) == ex.answer.strip()
    assert all(ex.facts[c] == ex.answer.strip() for c in chain)
    # Every planted key section elsewhere is a supported fact with the stated value.
    for m in re.finditer(r"value of ([A-Z]{2}-\d{2}) (?:is|shall be) (\d{4})", ex.document):
        assert ex.facts[m.group(1)] == m.group(2)


def test_basic_labels_mark_the_fact_sentence():
    for i in range(10):
        ex = make_example(2, i, 2000)
        (s, e), = ex.relevant_spans
        key = re.search(r"[A-Z]{2}-\d{2}", ex.instruction).group(0)
        assert re.fullmatch(rf"The \w+ value of {key} is {ex.answer.strip()}\.", ex.document[s:e])


def test_specificity_and_lengths():
    for spec in ("specific", "keyed", "vague"):
        ex = make_example(1, 0, 20_000, 4, spec, style="rich", hops=2)
        assert ex.specificity == spec
        assert abs(len(ex.document) - 20_000) < 400
    assert "section" in make_example(1, 0, 5000, style="rich").instruction
    assert re.search(r"\d\.\d ", make_example(1, 0, 5000, style="rich").document)


def test_write_synthetic_roundtrip(tmp_path):
    out = tmp_path / "syn.jsonl"
    assert write_synthetic(str(out), 12, 1000, 3000, seed=4, hops=0) == 12
    first = out.read_text()
    write_synthetic(str(out), 12, 1000, 3000, seed=4, hops=0)
    assert out.read_text() == first
    back = list(iter_examples(str(out)))
    assert all(1000 <= len(e.document) <= 3100 for e in back)
    assert {e.specificity for e in back} == {"specific", "keyed", "vague"}
    assert any("cross-references" in e.instruction for e in back)
    assert back[3] == make_example(4, 3, _length(4, 3, 1000, 3000), 4, "specific",
                                   style="rich", hops=2)


def _length(seed, i, lo, hi):
    import numpy as np
    return int(np.random.default_rng([seed, i, 1]).integers(lo, hi + 1))


def _docs_per_row(cfg, seq_len, rows):
    src = build_rows(cfg, seq_len, 64)
    return [len(set(src.row(i).doc_ids[0].tolist()) - {-1}) for i in range(rows)]


def test_loguniform_document_lengths_put_more_questions_in_a_long_row():
    uni = DataConfig(min_doc_len=100, num_facts=1)
    log = DataConfig(min_doc_len=100, num_facts=1, doc_len_dist="loguniform")
    a, b = _docs_per_row(uni, 8192, 12), _docs_per_row(log, 8192, 12)
    assert sum(b) > 1.4 * sum(a)
    assert _docs_per_row(log, 8192, 3) == b[:3]  # deterministic per row index
    # the default draw is unchanged (the digest is the row before the option existed)
    row = build_rows(uni, 2048, 64).row(5)
    assert hashlib.sha256(row.tokens.numpy().tobytes()).hexdigest() == \
        "2a81ed733bea120da380a9369d3aaed7bc15f4604f3b13756da3236746d8f9e6"


def test_an_unknown_document_length_distribution_names_the_allowed_ones():
    from dcwdist.config import load_config
    from dcwdist.configtree import ConfigError

    with pytest.raises(ConfigError, match="doc_len_dist.*loguniform"):
        load_config("recipes/tiny_cpu.yaml", ["data.doc_len_dist=normal"])


def test_copy_documents_hide_a_code_that_the_answer_repeats():
    for i in range(20):
        ex = make_example(5, i, 400, style="copy")
        assert ex == make_example(5, i, 400, style="copy")  # deterministic
        code = ex.answer.strip()
        assert 8 <= len(code) <= 32 and re.fullmatch(r"[A-Z0-9]+", code)
        (a, b), = ex.relevant_spans
        assert ex.document[a:b] == f"The code is {code}."
        assert ex.document.count(code) == 1 and len(ex.document) <= 400


def test_a_copy_stage_supervises_many_more_answer_tokens_than_the_fact_task():
    cfg = DataConfig(min_doc_len=100, num_facts=1, loss_on="answer", doc_len_dist="loguniform")
    copy = DataConfig(**{**cfg.__dict__, "generator": "copy"})
    count = lambda c: int((build_rows(c, 256).batch(0, 16).labels >= 0).sum())  # noqa: E731
    assert count(copy) > 3 * count(cfg)
