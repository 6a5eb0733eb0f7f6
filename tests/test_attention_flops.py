"""attention_flops equals 4*D*heads times the oracle mask's allowed pairs, per kind and tier."""
import pytest
import torch

from dcwdist.attention import AttnContext, attention_flops, build_attention
from tests.test_attention_kinds import BLK, CFG, D, DOCS, H, TIERS, cfg_for, inputs
from tests.test_attention_oracle import (block_topk_mask, dcw_local_mask, dcw_summaries,
                                         dense_mask, static_mask, window_mask)


def oracle_pairs(kind, cfg, q=None, k=None):
    """[B, T] allowed pairs summed over heads, from the oracle's masks."""
    rows = []
    for b in range(DOCS.shape[0]):
        d = DOCS[b].tolist()
        if kind == "dense":
            m = dense_mask(d)
        elif kind == "window":
            m = window_mask(d, cfg.window)
        elif kind == "static_sparse":
            m = static_mask(d, cfg.window, cfg.num_global)
        elif kind == "block_topk":
            m = block_topk_mask(q[b], k[b], d, BLK, cfg.topk_blocks)  # [G, T, T]
            rows.append(m.sum(-1).sum(0) * (H // m.shape[0]))
            continue
        else:
            m = dcw_local_mask(d, TIERS[b].tolist(), BLK, cfg.window, cfg.buffer_window, cfg.stride)
            sums = dcw_summaries(d, TIERS[b].tolist(), BLK, cfg.summary_pool)
            rows.append((m.sum(-1) + torch.tensor([len(s) for s in sums])) * H)
            continue
        rows.append(m.sum(-1) * H)
    return torch.stack(rows).double()


@pytest.mark.parametrize("kind", ["dense", "window", "static_sparse", "block_topk", "dcw"])
def test_flops_equal_bruteforce_count(kind):
    cfg = cfg_for(kind)
    ctx = AttnContext(doc_ids=DOCS, positions=torch.zeros_like(DOCS), tiers=TIERS)
    q = k = None
    if kind == "block_topk":
        q, k, v = inputs(6)
        build_attention(cfg, 0, H, 2, D)(q, k, v, ctx)  # data-dependent layouts come from the forward
    flops = attention_flops(cfg, ctx, H, D)
    pairs = oracle_pairs(kind, cfg, q, k)
    assert flops["computed"] == pytest.approx(float(pairs.sum()) * 4 * D)
    dense = oracle_pairs("dense", cfg)
    assert flops["dense"] == pytest.approx(float(dense.sum()) * 4 * D)
    if kind == "dense":
        assert flops["density"] == pytest.approx(1.0)
    if kind == "dcw":
        tok_tier = TIERS.repeat_interleave(BLK, 1)
        for t, name in enumerate(("core", "buffer", "background")):
            sel = (tok_tier == t) & (DOCS >= 0)
            assert flops["by_tier"][name] == pytest.approx(float(pairs[sel].sum()) * 4 * D)


def test_caa_flops_need_a_forward_then_count_both_branches():
    cfg = cfg_for("caa")
    ctx = AttnContext(doc_ids=DOCS, positions=torch.zeros_like(DOCS))
    with pytest.raises(ValueError, match="forward"):
        attention_flops(cfg, ctx, H, D)
    q, k, v = inputs(7)
    build_attention(cfg, 0, H, 2, D)(q, k, v, ctx)
    flops = attention_flops(cfg, ctx, H, D)
    assert set(flops["by_part"]) == {"local", "global"}
    assert 0 < flops["computed"] <= 2 * flops["dense"]
