"""attend_layout against dense masked softmax on random layouts; empty rows; LSE merging."""
import pytest
import torch

from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.layout import BlockLayout
from dcwdist.attention.reference import masked_attention


def random_layout(B=2, G=2, NQ=5, NK=6, qb=4, kb=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows_kv, rows_mode, counts = [], [], []
    for _ in range(B * G * NQ):
        n = int(torch.randint(0, NK + 1, (1,), generator=g))  # some rows empty
        kv = torch.randperm(NK, generator=g)[:n].sort().values
        rows_kv.append(kv)
        rows_mode.append(torch.randint(0, 4, (n,), generator=g))
        counts.append(n)
    indptr = torch.zeros(len(counts) + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor(counts), 0)
    q_pos = torch.arange(NQ * qb).repeat(B, 1) * 2
    k_pos = torch.randint(0, NQ * qb * 2, (B, NK * kb), generator=g)
    k_doc = torch.randint(-1, 2, (B, NK * kb), generator=g)
    q_doc = torch.randint(0, 2, (B, NQ * qb), generator=g)
    return BlockLayout(indptr=indptr, kv_block=torch.cat(rows_kv).to(torch.int32),
                       mode=torch.cat(rows_mode).to(torch.int8), batch=B, groups=G,
                       num_q_blocks=NQ, num_k_blocks=NK, q_block=qb, k_block=kb, q_pos=q_pos,
                       k_pos=k_pos, window=5, far=7, q_doc=q_doc, k_doc=k_doc)


def dense_reference(q, k, v, layout):
    """Per layout group: the dense token mask (tests only) through reference.masked_attention."""
    mask = layout.token_mask()  # [B, G, Tq, Tk]
    H, Hkv, G = q.shape[2], k.shape[2], layout.groups
    outs, lses = [], []
    for g in range(G):
        o, l = masked_attention(q[:, :, g * H // G:(g + 1) * H // G],
                                k[:, :, g * Hkv // G:(g + 1) * Hkv // G],
                                v[:, :, g * Hkv // G:(g + 1) * Hkv // G], mask[:, g])
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 1)


@pytest.mark.parametrize("seed,chunk", [(0, 4), (1, 8), (2, 1024)])
def test_attend_layout_matches_dense_mask(seed, chunk):
    lay = random_layout(seed=seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 20, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 18, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 18, 2, 8, generator=g, requires_grad=True)
    out, lse = attend_layout(q, k, v, lay, chunk_size=chunk)
    ref, ref_lse = dense_reference(q, k, v, lay)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.isinf(lse).any()
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-5, rtol=1e-5)
    empty = torch.isinf(lse).transpose(1, 2)  # [B, Tq, H]
    assert (out[empty] == 0).all()
    w = torch.randn_like(out)
    wl = torch.where(fin, torch.randn_like(lse), torch.zeros_like(lse))
    got = torch.autograd.grad((out * w).sum() + (lse.nan_to_num(0, 0, 0) * wl).sum(), (q, k, v))
    fin_ref = torch.where(fin, ref_lse, torch.zeros_like(ref_lse))
    exp = torch.autograd.grad((ref * w).sum() + (fin_ref * wl).sum(), (q, k, v))
    for a, b in zip(got, exp):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_merge_partials_equals_one_softmax_and_empty_rows_have_finite_grads():
    lay = random_layout(seed=3, G=1)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 20, 2, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 18, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 18, 2, 8, generator=g, requires_grad=True)
    mask = lay.token_mask()[:, 0]
    half = torch.rand(mask.shape, generator=g) < 0.5
    parts = [masked_attention(q, k, v, mask & half), masked_attention(q, k, v, mask & ~half)]
    out, lse = merge_partials(parts)
    ref, ref_lse = masked_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isinf(ref_lse).any() and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    # rows empty in both parts: output 0 and no NaN in the gradient (merge_by_lse gives NaN here)
    o2, l2 = merge_partials([attend_layout(q, k, v, lay), attend_layout(q, k, v, lay)])
    grads = torch.autograd.grad(o2.sum() + l2[torch.isfinite(l2)].sum(), (q, k, v))
    assert all(torch.isfinite(x).all() for x in grads)
