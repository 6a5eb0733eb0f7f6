"""Every attention kind against the brute-force oracle of its own pattern: outputs and gradients,
causality, packed rows vs documents alone, DCW's alpha and all-core properties."""
import pytest
import torch

from dcwdist.attention import AttentionConfig, AttnContext, build_attention
from tests.test_attention_oracle import (block_topk_mask, caa_choices, dcw_oracle, dense_mask,
                                   softmax_attention, static_mask, window_mask)

KINDS = ["dense", "window", "static_sparse", "block_topk", "caa", "dcw"]
H, HKV, D, BLK = 4, 2, 8, 4
CFG = dict(block_size=BLK, window=3, buffer_window=5, stride=3, summary_pool=2, num_global=5,
           topk_blocks=2, caa_windows=(13, 18, 23), caa_c=2.0, caa_gate_hidden=8, chunk_size=8)
# Row 0: one 32-token document. Row 1: a 10-token document padded to its block, then 20 tokens.
DOCS = torch.tensor([[0] * 32, [0] * 10 + [-1] * 2 + [1] * 20])
TIERS = torch.tensor([[0, 2, 1, 0, 2, 1, 1, 2], [0, 1, 2, 0, 1, 0, 2, 1]])


def cfg_for(kind, **kw):
    return AttentionConfig(kind=kind, **{**CFG, **kw})


def inputs(seed=0, T=32, B=2):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, T, h, D, generator=g, dtype=torch.float64).float().requires_grad_()  # noqa
    return mk(H), mk(HKV), mk(HKV)


def run(kind, q, k, v, doc=DOCS, tiers=TIERS, scores=None, module=None, **kw):
    module = module or build_attention(cfg_for(kind, **kw), 0, H, HKV, D)
    if kind == "dcw" and module.alpha.item() == 0:
        with torch.no_grad():
            module.alpha.fill_(0.7)  # exercise the cross-tier path
    ctx = AttnContext(doc_ids=doc, positions=torch.zeros_like(doc), tiers=tiers,
                      block_scores=scores)
    return module(q, k, v, ctx), module


def oracle(kind, module, q, k, v, doc=DOCS, tiers=TIERS, scores=None):
    cfg, outs = module.cfg, []
    for b in range(q.shape[0]):
        d = doc[b].tolist()
        qb, kb, vb = q[b], k[b], v[b]
        if kind == "dense":
            o = softmax_attention(qb, kb, vb, dense_mask(d))
        elif kind == "window":
            o = softmax_attention(qb, kb, vb, window_mask(d, cfg.window))
        elif kind == "static_sparse":
            o = softmax_attention(qb, kb, vb, static_mask(d, cfg.window, cfg.num_global))
        elif kind == "block_topk":
            o = softmax_attention(qb, kb, vb, block_topk_mask(qb, kb, d, BLK, cfg.topk_blocks))
        elif kind == "caa":
            n_of = [sum(x == d[blk * BLK] for x in d) for blk in range(len(d) // BLK)]
            widths, ks = zip(*[caa_choices(n, cfg.caa_windows, BLK, cfg.caa_c) for n in n_of])
            loc = torch.stack([window_mask(d, w)[i] for i, w in
                               enumerate(w for w in widths for _ in range(BLK))])
            local = softmax_attention(qb, kb, vb, loc)
            glob = softmax_attention(qb, kb, vb, block_topk_mask(qb, kb, d, BLK, list(ks)))
            g = torch.sigmoid(module.gate(vb.reshape(len(d), -1)))[..., None]
            o = g * local + (1 - g) * glob
        else:
            o = dcw_oracle(qb, kb, vb, d, tiers[b].tolist(), cfg, module.alpha,
                           None if scores is None else scores[b])
        outs.append(o)
    return torch.stack(outs)


def real(doc=DOCS):
    return (doc >= 0)[..., None, None].float()


@pytest.mark.parametrize("kind", KINDS)
def test_kind_matches_oracle_forward_and_grads(kind):
    q, k, v = inputs()
    scores = torch.rand(TIERS.shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    out, mod = run(kind, q, k, v, scores=scores if kind == "dcw" else None)
    ref = oracle(kind, mod, q, k, v, scores=scores if kind == "dcw" else None)
    torch.testing.assert_close(out * real(), ref * real(), atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    params = [p for p in mod.parameters()] + ([scores] if kind == "dcw" else [])
    got = torch.autograd.grad((out * real() * w).sum(), [q, k, v] + params)
    exp = torch.autograd.grad((ref * real() * w).sum(), [q, k, v] + params)
    for name, a, b in zip(["q", "k", "v"] + [f"p{i}" for i in range(len(params))], got, exp):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    if kind == "dcw":
        assert mod.alpha.grad is None and got[3].abs() > 0 and got[4].abs().sum() > 0
    if kind == "caa":
        assert all(g.abs().sum() > 0 for g in got[3:])


def test_dcw_requires_tiers():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="ctx.tiers"):
        run("dcw", q, k, v, tiers=None)


def test_dcw_all_core_equals_dense():
    q, k, v = inputs(2)
    out, _ = run("dcw", q, k, v, tiers=torch.zeros_like(TIERS))
    dense, _ = run("dense", q, k, v)
    torch.testing.assert_close(out * real(), dense * real(), atol=1e-5, rtol=1e-5)


def test_dcw_alpha_zero_is_noop_and_alpha_changes_non_core_only():
    q, k, v = inputs(3)
    mod = build_attention(cfg_for("dcw"), 0, H, HKV, D)  # alpha initialised to 0
    assert mod.alpha.item() == 0.0
    ctx = lambda: AttnContext(doc_ids=DOCS, positions=torch.zeros_like(DOCS), tiers=TIERS)  # noqa
    out0 = mod(q, k, v, ctx())
    local = oracle("dcw", mod, q, k, v)  # alpha = 0: the local softmax alone
    torch.testing.assert_close(out0 * real(), local * real(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        mod.alpha.fill_(0.5)
    out1 = mod(q, k, v, ctx())
    core_tok = (TIERS.repeat_interleave(BLK, 1) == 0) | (DOCS < 0)
    assert torch.equal(out1[core_tok], out0[core_tok])
    changed = (out1 - out0).abs().amax((-1, -2)) > 1e-6
    # every non-core real token that sees a summary changes (blocks after the first core block)
    assert changed[~core_tok].float().mean() > 0.7


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [13, 20])
def test_causal_perturbation(kind, p):
    q, k, v = inputs(4)
    out, mod = run(kind, q, k, v)
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    g = torch.Generator().manual_seed(9)
    for x in (q2, k2, v2):
        x[:, p:] = torch.randn(x[:, p:].shape, generator=g)
    out2, _ = run(kind, q2, k2, v2, module=mod)
    assert torch.equal(out[:, :p], out2[:, :p])
    assert not torch.allclose(out[:, p:], out2[:, p:])


@pytest.mark.parametrize("kind", KINDS)
def test_packed_row_equals_documents_alone(kind):
    q, k, v = inputs(5, B=1)
    out, mod = run(kind, q, k, v, doc=DOCS[1:], tiers=TIERS[1:])
    for s, e, doc_len in [(0, 12, 10), (12, 32, 20)]:
        doc = DOCS[1:, s:e] - DOCS[1, s].clamp_min(0)  # the document alone, ids from 0
        qa, ka, va = (x[:, s:e].detach().clone() for x in (q, k, v))
        for x in (qa, ka, va):  # padding content must not matter either
            x[:, doc_len:] = 100.0
        alone, _ = run(kind, qa, ka, va, doc=doc, tiers=TIERS[1:, s // BLK:e // BLK], module=mod)
        torch.testing.assert_close(alone[:, :doc_len], out[:, s:s + doc_len], atol=1e-5, rtol=1e-5)
