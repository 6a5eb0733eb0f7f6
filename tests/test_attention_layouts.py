"""Layout builders against the contract's worked examples and the oracle's token masks."""
import json

import torch

from dcwdist.attention import AttentionConfig
from dcwdist.attention.dcw import build_dcw_plan
from dcwdist.attention.layouts import ROW_WINDOW, compact_far_layout, doc_position, local_layout
from tests.test_attention_oracle import CONTRACT, TIER, dcw_local_mask, dcw_summaries


def plan_keys_and_summaries(plan, cfg, i, b=0):
    """Key set and summary ranges of query i as the layouts (not the oracle) define them."""
    keys = set(torch.nonzero(plan.local.token_mask()[b, 0, i] | plan.buffer.token_mask()[b, 0, i])
               .flatten().tolist())
    strided = plan.strided_idx[b][plan.strided.token_mask()[b, 0, i]].tolist()
    assert not keys & set(strided), "a key counted twice"
    per = cfg.block_size // cfg.summary_pool
    sums = []
    for n in torch.nonzero(plan.summary.token_mask()[b, 0, i]).flatten().tolist():
        s0 = plan.core_idx[b, n // per].item() * cfg.block_size + (n % per) * cfg.summary_pool
        sums.append([s0, s0 + cfg.summary_pool])
    return sorted(keys | set(strided)), sorted(sums)


def test_layout_reproduces_contract():
    for case in json.loads(CONTRACT.read_text())["cases"]:
        p = case["params"]
        cfg = AttentionConfig(kind="dcw", block_size=p["B"], window=p["window"],
                              buffer_window=p["buffer_window"], stride=p["stride"],
                              summary_pool=p["summary_pool"])
        plan = build_dcw_plan(cfg, torch.tensor([case["doc_ids"]]),
                              torch.tensor([[TIER[t] for t in case["tiers"]]]))
        for qy in case["queries"]:
            keys, sums = plan_keys_and_summaries(plan, cfg, qy["i"])
            assert keys == qy["keys"], (case["name"], qy["i"])
            assert sums == qy["summaries"], (case["name"], qy["i"])


def test_strided_keys_are_doc_relative_multiples_outside_buffer_window():
    # Documents of odd lengths, padded to blocks: doc 1 starts at token 16 (not a stride multiple).
    doc = torch.tensor([[0] * 13 + [-1] * 3 + [1] * 40])
    tiers = torch.ones(1, 14, dtype=torch.long)  # every block buffer
    cfg = AttentionConfig(kind="dcw", block_size=4, window=3, buffer_window=6, stride=5,
                          summary_pool=2)
    plan = build_dcw_plan(cfg, doc, tiers)
    mask = plan.strided.token_mask()[0, 0]
    start = {0: 0, 1: 16}
    for i in range(56):
        got = sorted(plan.strided_idx[0][mask[i]].tolist())
        d = doc[0, i].item()
        want = [] if d < 0 else [j for j in range(start[d], i + 1) if doc[0, j] == d
                                 and (j - start[d]) % 5 == 0 and j <= i - 6]
        assert got == want, i


def test_dcw_layout_masks_equal_oracle_on_packed_rows():
    doc = torch.tensor([[0] * 10 + [-1] * 2 + [1] * 20, [0] * 32])
    tiers = torch.tensor([[0, 1, 2, 0, 1, 0, 2, 1], [2, 0, 1, 1, 0, 2, 1, 2]])
    cfg = AttentionConfig(kind="dcw", block_size=4, window=3, buffer_window=5, stride=3,
                          summary_pool=2)
    plan = build_dcw_plan(cfg, doc, tiers)
    strided = plan.strided.token_mask()[:, 0]
    for b in range(2):
        local = plan.local.token_mask()[b, 0] | plan.buffer.token_mask()[b, 0]
        full = local.clone()
        for i in range(32):
            full[i, plan.strided_idx[b][strided[b, i]]] = True
        d, t = doc[b].tolist(), tiers[b].tolist()
        assert torch.equal(full, dcw_local_mask(d, t, 4, 3, 5, 3))
        sums = dcw_summaries(d, t, 4, 2)
        for i in range(32):
            _, got = plan_keys_and_summaries(plan, cfg, i, b)
            assert got == sorted(list(r) for r in sums[i]), (b, i)


def test_csr_rows_sorted_and_in_range():
    doc = torch.tensor([[0] * 24 + [1] * 40])
    lay = local_layout(doc, 8, torch.full((1, 8), ROW_WINDOW), 11)
    far, _ = compact_far_layout(doc, 8, doc_position(doc) % 3 == 0, torch.ones(1, 8, dtype=torch.bool), 11)
    for layout in (lay, far):
        assert layout.indptr[0] == 0 and layout.indptr[-1] == layout.nnz
        assert (layout.kv_block >= 0).all() and (layout.kv_block < layout.num_k_blocks).all()
        for r in range(layout.indptr.numel() - 1):
            row = layout.kv_block[layout.indptr[r]:layout.indptr[r + 1]]
            assert (row[1:] > row[:-1]).all()
    # window rows read no block that lies wholly outside the window or the document
    assert lay.kv_block[lay.indptr[3]:lay.indptr[4]].tolist() == [3]  # doc 1 starts at block 3
