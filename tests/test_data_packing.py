"""Packing keeps every token, document boundary, position and loss target."""
import numpy as np
import pytest
import torch

from dcwdist.attention.context import ROLE_ANSWER, ROLE_DOCUMENT, ROLE_INSTRUCTION, ROLE_PAD
from dcwdist.data_pipelines.packing import (IGNORE, Segment, encode_example, encode_text,
                                            fit_segment, pack_row)
from dcwdist.data_pipelines.synthetic import make_example
from dcwdist.data_pipelines.tokenizer import ByteTokenizer


def _segments(rng, n):
    segs = []
    for _ in range(n):
        a, d, b = (int(x) for x in rng.integers(1, 12, size=3))
        toks = rng.integers(0, 256, size=a + d + b).tolist()
        roles = [ROLE_INSTRUCTION] * a + [ROLE_DOCUMENT] * d + [ROLE_ANSWER] * b
        segs.append(Segment(toks, roles, rng.integers(0, 2, size=a + d + b).astype(float).tolist()))
    return segs


@pytest.mark.parametrize("align", [1, 4, 16])
@pytest.mark.parametrize("loss_on", ["all", "answer"])
def test_pack_row_preserves_tokens_and_boundaries(align, loss_on):
    rng = np.random.default_rng(align)
    segs = _segments(rng, 6)
    seq_len = sum(len(s) + align for s in segs)  # room for all with padding
    row = pack_row(segs, seq_len, align, pad_id=999, loss_on=loss_on)
    t, lab, pos, doc, role, rel = (getattr(row, k)[0] for k in
                                   ("tokens", "labels", "positions", "doc_ids", "roles",
                                    "relevance"))
    assert t.shape == (seq_len,)
    for d, seg in enumerate(segs):
        idx = (doc == d).nonzero().flatten()
        assert len(idx) == len(seg)
        assert idx[0] % align == 0, "document must start at a block boundary"
        assert (idx == torch.arange(idx[0], idx[0] + len(seg))).all(), "contiguous"
        assert t[idx].tolist() == seg.tokens
        assert role[idx].tolist() == seg.roles
        assert rel[idx].tolist() == seg.relevance
        assert pos[idx].tolist() == list(range(len(seg))), "positions restart per document"
        want = seg.tokens[1:] + [IGNORE]
        if loss_on == "answer":
            want = [w if r == ROLE_ANSWER else IGNORE for w, r in zip(want, seg.roles[1:] + [0])]
        assert lab[idx].tolist() == want, "targets stay inside the document"
    pad = doc == -1
    assert (t[pad] == 999).all() and (role[pad] == ROLE_PAD).all() and (lab[pad] == IGNORE).all()
    assert int((~pad).sum()) == sum(len(s) for s in segs)


def test_pack_row_stops_when_full():
    segs = [Segment([1] * 10, [ROLE_DOCUMENT] * 10, [0.0] * 10) for _ in range(3)]
    row = pack_row(segs, 25, 8, pad_id=0)
    assert row.doc_ids[0].max() == 0  # 10 + pad 6 + 10 = 26 > 25: the second one does not fit
    row = pack_row(segs, 26, 8, pad_id=0)
    assert sorted(set(row.doc_ids[0].tolist())) == [-1, 0, 1]


def test_fit_segment_splits_text_and_truncates_examples():
    tok = ByteTokenizer()
    text = encode_text(tok, "x" * 100)
    pieces = fit_segment(text, 32, "split")
    assert [len(p) for p in pieces] == [32, 32, 32, 5]
    assert sum((p.tokens for p in pieces), []) == text.tokens
    assert fit_segment(text, 32, "truncate")[0].tokens == text.tokens[:32]
    ex = encode_example(tok, make_example(0, 0, 600))
    cut = fit_segment(ex, 300)[0]
    assert len(cut) == 300
    n_instr = ex.roles.count(ROLE_INSTRUCTION)
    n_ans = ex.roles.count(ROLE_ANSWER)
    assert cut.tokens[:n_instr + 1] == ex.tokens[:n_instr + 1]  # instruction and <doc>
    assert cut.tokens[-n_ans:] == ex.tokens[-n_ans:]  # the answer survives
    assert fit_segment(ex, n_instr + n_ans) == []  # no room for even <doc>: dropped
