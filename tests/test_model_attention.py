"""Model-level contract for the foundation kinds: window = dense under a window mask,
causality, and packed rows equal documents run alone."""
import pytest
import torch

from dcwdist.attention import AttentionConfig, AttnContext
from dcwdist.attention.kinds import DenseAttention, WindowAttention
from dcwdist.model import ModelConfig, Transformer


def brute_force(q, k, v, doc_ids, window=None):
    """Token-by-token masked softmax, written independently of dcwdist.attention."""
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(T):
            keys = [j for j in range(i + 1) if doc_ids[b, j] == doc_ids[b, i]
                    and (window is None or i - j < window)]
            for h in range(H):
                s = torch.stack([q[b, i, h] @ k[b, j, h // rep] for j in keys]) * D ** -0.5
                p = torch.softmax(s, 0)
                out[b, i, h] = sum(p[n] * v[b, j, h // rep] for n, j in enumerate(keys))
    return out


def packed_ctx(B=2, T=24):
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 10:] = 1
    if B > 1:
        doc[1, 5:17] = 1
        doc[1, 17:] = 2
    pos = torch.zeros_like(doc)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = 0 if doc[b, t] != doc[b, t - 1] else pos[b, t - 1] + 1
    return AttnContext(doc_ids=doc, positions=pos)


@pytest.mark.parametrize("kind, window", [("dense", None), ("window", 4)])
def test_kind_equals_brute_force_masked_softmax_on_packed_rows(kind, window):
    ctx = packed_ctx()
    q = torch.randn(2, 24, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 24, 2, 8, dtype=torch.float64)
    v = torch.randn(2, 24, 2, 8, dtype=torch.float64)
    cfg = AttentionConfig(kind=kind, window=window or 32, chunk_size=7)
    mod = (DenseAttention if kind == "dense" else WindowAttention)(cfg, 0, 4, 2, 8)
    torch.testing.assert_close(mod(q, k, v, ctx), brute_force(q, k, v, ctx.doc_ids, window),
                               rtol=1e-10, atol=1e-10)


def test_window_at_least_sequence_length_equals_dense():
    ctx = packed_ctx()
    q, k, v = (torch.randn(2, 24, 2, 8, dtype=torch.float64) for _ in range(3))
    dense = DenseAttention(AttentionConfig(kind="dense"), 0, 2, 2, 8)(q, k, v, ctx)
    wide = WindowAttention(AttentionConfig(kind="window", window=24, chunk_size=5), 0, 2, 2, 8)
    torch.testing.assert_close(wide(q, k, v, ctx), dense, rtol=1e-10, atol=1e-10)


def tiny_model(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    return Transformer(cfg, AttentionConfig(kind=kind, window=5, chunk_size=8)).double()


@pytest.mark.parametrize("kind", ["dense", "window"])
def test_perturbing_tokens_after_p_changes_nothing_before_p(kind):
    model = tiny_model(kind)
    ctx = packed_ctx(1, 24)
    tokens = torch.randint(0, 64, (1, 24))
    p = 13
    changed = tokens.clone()
    changed[:, p:] = torch.randint(0, 64, (1, 24 - p))
    a = model(tokens, ctx)
    b = model(changed, ctx)
    torch.testing.assert_close(a[:, :p], b[:, :p], rtol=0, atol=0)
    assert (a[:, p:] - b[:, p:]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["dense", "window"])
def test_packed_row_equals_each_document_alone(kind):
    model = tiny_model(kind)
    ctx = packed_ctx(1, 24)
    tokens = torch.randint(0, 64, (1, 24))
    packed = model(tokens, ctx)
    for d in (0, 1):
        sel = ctx.doc_ids[0] == d
        alone = model(tokens[:, sel], AttnContext(doc_ids=torch.zeros(1, int(sel.sum()), dtype=torch.long),
                                                  positions=ctx.positions[:, sel]))
        torch.testing.assert_close(packed[:, sel], alone, rtol=1e-10, atol=1e-10)
