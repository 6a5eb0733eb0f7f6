"""Memmap shards: round trip, disjoint dp slices, resume mid-shard after a dp change."""
import json

import numpy as np
import pytest
import torch

from dcwdist.data_pipelines import DataConfig, build_rows
from dcwdist.data_pipelines.packing import encode_example, encode_text, fit_segment
from dcwdist.data_pipelines.shards import INDEX, MemmapRows, prepare_shards, rank_slice
from dcwdist.data_pipelines.sources import DataError, write_jsonl
from dcwdist.data_pipelines.synthetic import make_example
from dcwdist.data_pipelines.tokenizer import ByteTokenizer

SEQ = 256


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(60):
        if i % 3:
            recs.append({"text": "".join(chr(97 + c) for c in rng.integers(0, 26, int(
                rng.integers(5, 700))))})
        else:
            ex = make_example(1, i, int(rng.integers(40, 400)), 2, style="rich")
            recs.append({"instruction": ex.instruction, "document": ex.document,
                         "answer": ex.answer, "relevant_spans": ex.relevant_spans})
    write_jsonl(str(d / "c.jsonl"), recs)
    out = d / "shards"
    index = prepare_shards(str(d / "c.jsonl"), str(out), "byte", SEQ, shard_tokens=2000,
                           progress=False)
    return d, out, index, recs


def _segments(recs):
    from dcwdist.data_pipelines.sources import to_example
    tok = ByteTokenizer()
    return [encode_text(tok, x) if isinstance(x, str) else encode_example(tok, x)
            for x in map(to_example, recs)]


def test_index_and_round_trip(corpus):
    d, out, index, recs = corpus
    on_disk = json.loads((out / INDEX).read_text())
    assert on_disk == index and len(index["shards"]) > 3
    segs = _segments(recs)
    assert index["num_docs"] == len(recs) and index["num_tokens"] == sum(map(len, segs))
    assert index["tokenizer"]["hash"] == ByteTokenizer().hash
    rows = MemmapRows(str(out), SEQ, 16, shuffle=False, eval_fraction=0.0)
    # Every document, fitted to the row length, comes back token for token, in order.
    want = [p for s in segs for p in fit_segment(s, SEQ, "split")]
    got = []
    for i in range(len(rows)):
        b = rows.row(i)
        for dd in range(int(b.doc_ids.max()) + 1):
            m = b.doc_ids[0] == dd
            assert b.positions[0][m].tolist() == list(range(int(m.sum())))
            assert int(m.nonzero()[0]) % 16 == 0
            got.append((b.tokens[0][m].tolist(), b.roles[0][m].tolist(),
                        b.relevance[0][m].tolist()))
    assert got == [(p.tokens, p.roles, p.relevance) for p in want]
    assert index["num_rows"] == len(MemmapRows(str(out), SEQ, 1, eval_fraction=0.0))
    assert index["docs_longer_than_seq_len"] == sum(len(s) > SEQ for s in segs) > 0


def _ids(batch):
    return [tuple(r.tolist()) for r in batch.tokens]


@pytest.mark.parametrize("shuffle", [True, False])
def test_dp_slices_are_disjoint_and_resume_after_dp_change(corpus, shuffle):
    _, out, _, _ = corpus
    rows = MemmapRows(str(out), SEQ, 16, seed=3, shuffle=shuffle)
    assert len(rows) > 12
    single = _ids(rows.batch(0, 24))  # the one-process stream
    g = 4
    seen, start = [], 0
    for dp in (2, 2, 4, 1, 4, 2):  # change the dp degree mid-stream (mid-shard)
        parts = [_ids(rows.rank_batch(start, g, r, dp)) for r in range(dp)]
        firsts = [rank_slice(start, g, r, dp)[0] for r in range(dp)]
        assert len(set(firsts)) == dp
        seen += sum(parts, [])
        start += g
    assert seen == single
    fresh = MemmapRows(str(out), SEQ, 16, seed=3, shuffle=shuffle)  # a restarted job
    assert _ids(fresh.batch(12, 4)) == single[12:16]


def test_shuffle_epochs_cover_every_row(corpus):
    _, out, _, _ = corpus
    rows = MemmapRows(str(out), SEQ, 16, seed=5)
    n = len(rows)
    ep0 = [rows.row_id(i) for i in range(n)]
    ep1 = [rows.row_id(n + i) for i in range(n)]
    assert sorted(ep0) == sorted(ep1) == list(range(n)) and ep0 != ep1 != list(range(n))
    other = MemmapRows(str(out), SEQ, 16, seed=6)
    assert [other.row_id(i) for i in range(n)] != ep0


def test_held_out_documents_are_disjoint(corpus):
    _, out, index, _ = corpus
    train = MemmapRows(str(out), SEQ, 1, eval_fraction=0.1)
    held = MemmapRows(str(out), SEQ, 1, eval_fraction=0.1, held_out=True)
    assert len(train.docs) + len(held.docs) == index["num_docs"]
    assert not set(train.docs) & set(held.docs)


def test_tokenizer_mismatch_and_missing_folder(corpus, tmp_path):
    _, out, _, _ = corpus
    from dcwdist.data_pipelines.tokenizer import train_bpe
    bpe = train_bpe(["some text here"] * 5, vocab_size=300)
    with pytest.raises(DataError, match="tokenized with 'byte'"):
        MemmapRows(str(out), SEQ, tokenizer=bpe)
    with pytest.raises(FileNotFoundError, match="not a shard folder"):
        MemmapRows(str(tmp_path), SEQ)


def test_build_rows_for_each_source(corpus, tmp_path):
    d, out, _, _ = corpus
    syn = build_rows(DataConfig(min_doc_len=64), 512, 16).batch(0, 2)
    assert syn.tokens.shape == (2, 512)
    mem = build_rows(DataConfig(source="memmap", path=str(out)), SEQ, 16).batch(7, 3)
    files = build_rows(DataConfig(source="files", path=str(d / "c.jsonl"),
                                  cache_dir=str(tmp_path)), SEQ, 16).batch(7, 3)
    for f in ("tokens", "labels", "positions", "doc_ids", "roles", "relevance"):
        assert torch.equal(getattr(mem, f), getattr(files, f))
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(source="memmap")
