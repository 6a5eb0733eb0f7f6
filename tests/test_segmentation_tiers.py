"""Tier rules: prefix quantiles per document, ties, forced-core blocks, padding; causal caps."""
import math

import pytest
import torch

from dcwdist.attention.context import (ROLE_ANSWER, ROLE_DOCUMENT, ROLE_INSTRUCTION, ROLE_PAD,
                                       TIER_BACKGROUND, TIER_BUFFER, TIER_CORE)
from dcwdist.segmentation.tiers import block_info, causal_tiers, prefix_tiers

BLK = 4


def packed_row(doc_blocks, instr_blocks=0, answer_blocks=0, pad_blocks=1):
    """doc ids / roles [1, T] for documents of the given block counts (all blocks full)."""
    doc, roles = [], []
    for d, n in enumerate(doc_blocks):
        for j in range(n):
            role = (ROLE_INSTRUCTION if j < instr_blocks else
                    ROLE_ANSWER if j >= n - answer_blocks else ROLE_DOCUMENT)
            doc += [d] * BLK
            roles += [role] * BLK
    doc += [-1] * BLK * pad_blocks
    roles += [ROLE_PAD] * BLK * pad_blocks
    return torch.tensor([doc]), torch.tensor([roles])


def test_prefix_ratios_hold_per_document():
    g = torch.Generator().manual_seed(0)
    for blocks in ([10, 20, 7], [30, 15], [5, 9, 11]):
        doc, roles = packed_row(blocks, instr_blocks=1, answer_blocks=1)
        info = block_info(doc, roles, BLK)
        tiers = prefix_tiers(torch.rand(info.doc.shape, generator=g), info, 0.2, 0.3)[0]
        for d, n in enumerate(blocks):
            t = tiers[info.doc[0] == d]
            ranked = t[1:-1]  # instruction block first, answer block last
            m = n - 2
            assert t[0] == TIER_CORE and t[-1] == TIER_CORE
            assert int((ranked == TIER_CORE).sum()) == math.floor(0.2 * m + 0.5), (blocks, d)
            assert int((ranked != TIER_BACKGROUND).sum()) == math.floor(0.5 * m + 0.5), (blocks, d)
        assert (tiers[info.doc[0] < 0] == TIER_BACKGROUND).all()


def test_prefix_core_blocks_are_each_documents_top_scores():
    doc, roles = packed_row([6, 11])
    info = block_info(doc, roles, BLK)
    scores = torch.rand(info.doc.shape)
    tiers = prefix_tiers(scores, info, 0.2, 0.3)[0]
    for d in (0, 1):
        sel = info.doc[0] == d
        s, t = scores[0][sel], tiers[sel]
        assert s[t == TIER_CORE].min() > s[t == TIER_BUFFER].max() > s[t == TIER_BACKGROUND].max()


def test_prefix_ties_go_to_the_lower_block_index():
    doc, roles = packed_row([10, 10])
    info = block_info(doc, roles, BLK)
    scores = torch.full(info.doc.shape, 0.5)
    tiers = prefix_tiers(scores, info, 0.2, 0.3)[0]
    expected = [TIER_CORE] * 2 + [TIER_BUFFER] * 3 + [TIER_BACKGROUND] * 5
    assert tiers[:10].tolist() == expected and tiers[10:20].tolist() == expected
    # blocks 3, 7 and 8 tie above the rest for two core places: 3 and 7 win
    scores[0, 3] = scores[0, 7] = scores[0, 8] = 0.9
    tiers = prefix_tiers(scores, info, 0.2, 0.3)[0]
    assert tiers[[3, 7, 8]].tolist() == [TIER_CORE, TIER_CORE, TIER_BUFFER]


def test_prefix_instruction_and_answer_blocks_are_core_whatever_their_score():
    doc, roles = packed_row([8, 12], instr_blocks=2, answer_blocks=1)
    roles[0, BLK * 8 + 3] = ROLE_INSTRUCTION  # a block mixing instruction and document tokens
    info = block_info(doc, roles, BLK)
    scores = torch.rand(info.doc.shape)
    scores[info.forced] = 0.0  # lowest possible score
    tiers = prefix_tiers(scores, info, 0.2, 0.3)[0]
    forced = [0, 1, 7, 8, 9, 19]
    assert info.forced[0].nonzero().squeeze(1).tolist() == forced
    assert (tiers[forced] == TIER_CORE).all()


def test_block_info_rejects_documents_not_at_block_boundaries():
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="block boundaries"):
        block_info(doc, None, BLK)


def sequential_causal_tiers(dec, info, core_ratio, buffer_ratio, tau_core, tau_buffer, slack,
                            roles_core=False):
    """The running-cap rule one block at a time (the specification); with roles_core,
    instruction / answer blocks are core and count in neither cap."""
    tiers = torch.full(dec.shape, TIER_BACKGROUND, dtype=torch.long)
    for b in range(dec.shape[0]):
        n_core = n_buf = 0
        for j in range(dec.shape[1]):
            if not info.real[b, j]:
                continue
            k = int(info.index[b, j])
            if info.first[b, j]:
                n_core, n_buf, tiers[b, j] = 1, 0, TIER_CORE
                continue
            if roles_core and info.forced[b, j]:
                tiers[b, j] = TIER_CORE
                continue
            s = float(dec[b, j])
            if s >= tau_core and n_core + 1 <= max(1, math.floor(core_ratio * (k + 1) + slack + 1e-9)):
                n_core, tiers[b, j] = n_core + 1, TIER_CORE
            elif s >= tau_buffer and n_buf + 1 <= math.floor(buffer_ratio * (k + 1) + slack + 1e-9):
                n_buf, tiers[b, j] = n_buf + 1, TIER_BUFFER
    return tiers


@pytest.mark.parametrize("slack", [0.0, 1.0, 2.5])
def test_causal_running_cap_matches_the_sequential_rule(slack):
    g = torch.Generator().manual_seed(1)
    rows = [packed_row(b, pad_blocks=p) for b, p in (([13, 40, 6], 2), ([1, 25, 30], 5),
                                                      ([59], 2))]
    doc = torch.cat([r[0] for r in rows])
    info = block_info(doc, None, BLK)
    for trial in range(5):
        dec = torch.rand(info.doc.shape, generator=g) ** (0.3 + trial * 0.4)
        args = (0.2, 0.3, 0.5, 0.3, slack)
        got = causal_tiers(dec, info, *args)
        assert torch.equal(got, sequential_causal_tiers(dec, info, *args))
        # every document prefix stays within the target ratios (plus slack)
        for b in range(doc.shape[0]):
            for d in info.doc[b].unique().tolist():
                if d < 0:
                    continue
                t = got[b][info.doc[b] == d]
                n = torch.arange(1, t.numel() + 1, dtype=torch.float64)
                assert ((t == TIER_CORE).cumsum(0) <= torch.clamp(0.2 * n + slack, min=1) + 1e-9).all()
                assert ((t == TIER_BUFFER).cumsum(0) <= 0.3 * n + slack + 1e-9).all()
                assert t[0] == TIER_CORE
        assert (got[~info.real] == TIER_BACKGROUND).all()


def test_causal_instruction_and_answer_blocks_are_core_outside_the_cap():
    """segmentation.answer_core: in causal mode too, blocks with instruction / answer tokens
    are core whatever the score that decides them, and take no core slot from later blocks."""
    g = torch.Generator().manual_seed(2)
    rows = [packed_row(b, instr_blocks=2, answer_blocks=a) for b, a in (([13, 40, 6], 1),
                                                                        ([25, 30], 2))]
    L = max(r[0].shape[1] for r in rows)
    doc = torch.cat([torch.nn.functional.pad(r[0], (0, L - r[0].shape[1]), value=-1)
                     for r in rows])
    roles = torch.cat([torch.nn.functional.pad(r[1], (0, L - r[1].shape[1]), value=ROLE_PAD)
                       for r in rows])
    info = block_info(doc, roles, BLK)
    for trial in range(4):
        dec = torch.rand(info.doc.shape, generator=g) ** (0.3 + trial * 0.4)
        dec[info.forced] = 0.0  # the lowest score: only the role makes these core
        args = (0.2, 0.3, 0.5, 0.3, 1.0)
        on = causal_tiers(dec, info, *args, roles_core=True)
        assert torch.equal(on, sequential_causal_tiers(dec, info, *args, roles_core=True))
        assert (on[info.forced] == TIER_CORE).all()
        off = causal_tiers(dec, info, *args, roles_core=False)
        assert torch.equal(off, sequential_causal_tiers(dec, info, *args))
        assert (off[info.forced & ~info.first] != TIER_CORE).all()
        # the other blocks' tiers are the same either way: a role-core block takes no slot
        # (and with the rule off, its zero score asked for none)
        rest = ~info.forced
        assert torch.equal(on[rest], off[rest])
