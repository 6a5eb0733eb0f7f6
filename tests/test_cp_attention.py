"""Context-parallel attention functions (ring dense, DCW) on real gloo groups equal one process.

Full problem built identically on every rank (same seed), sharded zigzag, run, gathered and
compared -- outputs, LSE and every input gradient.
"""
import pytest
import torch

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.dcw import DCWAttention
from dcwdist.attention.executor import attend_layout
from dcwdist.attention.layouts import local_layout
from dcwdist.attention.reference import chunked_local_attention
from dcwdist.parallel.ring import dense_step_layouts, ring_attention
from dcwdist.parallel.zigzag import CPShard, shard_tensor
from tests.cp_helpers import gather_full, spawn

B, T, H, HKV, D = 2, 128, 4, 2, 8


def packed_docs(T: int, blk: int = 1) -> torch.Tensor:
    """Row 0: one document; row 1: three documents and padding (block-aligned when blk > 1)."""
    a = torch.zeros(T, dtype=torch.long)
    b = torch.full((T,), -1, dtype=torch.long)
    cuts = [0, 3 * T // 8, 5 * T // 8, 7 * T // 8]
    if blk > 1:
        cuts = [c // blk * blk for c in cuts]
    for d in range(3):
        b[cuts[d]:cuts[d + 1] - (blk // 2 if blk > 1 and d == 1 else 1)] = d
    return torch.stack([a, b])


def _qkv(dtype, T=T):
    g = torch.Generator().manual_seed(1)
    mk = lambda h: torch.randn(B, T, h, D, generator=g, dtype=dtype)  # noqa: E731
    return mk(H), mk(HKV), mk(HKV), mk(H)


def _local_leaves(tensors, P, r):
    return [shard_tensor(t, P, r).detach().requires_grad_() for t in tensors]


def check_dense_ring(rank, world, group, dtype):
    doc = packed_docs(T)
    q, k, v, g_out = _qkv(dtype)
    real = (doc >= 0)[:, :, None, None]
    g_out = g_out * real
    # single-process reference (fp64 masked softmax)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = chunked_local_attention(qf, kf, vf, doc)
    (ref * g_out).sum().backward()
    shard = CPShard(group, world, rank, T, doc, doc * 0)
    ql, kl, vl = _local_leaves((q, k, v), world, rank)
    out, lse = ring_attention(ql, kl, vl, dense_step_layouts(shard, 64), shard)
    (out * shard_tensor(g_out, world, rank)).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gather_full(out, group) * real, ref * real, **tol)
    real_BHT = doc[:, None].expand(-1, H, -1) >= 0
    lse_full = gather_full(lse.transpose(1, 2), group).transpose(1, 2)
    torch.testing.assert_close(lse_full[real_BHT], ref_lse[real_BHT].float(), **tol)
    for name, loc, full in (("dq", ql, qf), ("dk", kl, kf), ("dv", vl, vf)):
        got = gather_full(loc.grad, group)
        assert got.dtype == dtype
        torch.testing.assert_close(got, full.grad, **tol, msg=lambda m: f"{name}: {m}")


def check_ring_precision(rank, world, group):
    """fp32 ring at cp=world is as close to an fp64 reference as the fp32 single process."""
    doc = packed_docs(T)
    q, k, v, _ = _qkv(torch.float64)
    real = (doc >= 0)[:, :, None, None]
    ref64, _ = chunked_local_attention(q, k, v, doc)
    one, _ = attend_layout(q.float(), k.float(), v.float(),
                           local_layout(doc, 16))
    shard = CPShard(group, world, rank, T, doc, doc * 0)
    ql, kl, vl = (shard_tensor(t.float(), world, rank) for t in (q, k, v))
    out, _ = ring_attention(ql, kl, vl, dense_step_layouts(shard, 16), shard)
    err_cp = ((gather_full(out, group).double() - ref64) * real).abs().max().item()
    err_one = ((one.double() - ref64) * real).abs().max().item()
    assert err_cp <= 4 * err_one + 1e-7, (err_cp, err_one)


def _dcw_setup(dtype, blk=8):
    cfg = AttentionConfig(kind="dcw", block_size=blk, window=6, buffer_window=12, stride=4,
                          summary_pool=2, chunk_size=32)
    doc = packed_docs(T, blk)
    NB = T // blk
    g = torch.Generator().manual_seed(3)
    tiers = torch.randint(0, 3, (B, NB), generator=g)
    tiers[:, 0] = 0
    scores = torch.rand(B, NB, generator=g, dtype=dtype)
    return cfg, doc, tiers, scores


def check_dcw(rank, world, group, dtype):
    cfg, doc, tiers, scores = _dcw_setup(dtype)
    q, k, v, g_out = _qkv(dtype)
    real = (doc >= 0)[:, :, None, None]
    g_out = g_out * real
    mod = DCWAttention(cfg, 0, H, HKV, D).to(dtype)
    with torch.no_grad():
        mod.alpha.fill_(0.7)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    sf = scores.clone().requires_grad_()
    ref = mod(qf, kf, vf, AttnContext(doc_ids=doc, positions=doc * 0, tiers=tiers,
                                      block_scores=sf))
    (ref * g_out).sum().backward()
    ref_alpha = mod.alpha.grad.clone()
    mod.alpha.grad = None
    shard = CPShard(group, world, rank, T, doc, doc * 0)
    ql, kl, vl = _local_leaves((q, k, v), world, rank)
    sl = scores.clone().requires_grad_()
    ctx = AttnContext(doc_ids=shard_tensor(doc, world, rank), positions=doc * 0, tiers=tiers,
                      block_scores=sl, group=group, cache={"cp_shard": shard})
    out = mod(ql, kl, vl, ctx)
    (out * shard_tensor(g_out, world, rank)).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gather_full(out, group) * real, ref * real, **tol)
    for name, loc, full in (("dq", ql, qf), ("dk", kl, kf), ("dv", vl, vf)):
        torch.testing.assert_close(gather_full(loc.grad, group), full.grad, **tol,
                                   msg=lambda m: f"{name}: {m}")
    # scores and alpha: each rank holds a partial gradient; their sum is the single-process one
    for got, want in ((sl.grad, sf.grad), (mod.alpha.grad, ref_alpha)):
        total = got.clone()
        torch.distributed.all_reduce(total, group=group)
        torch.testing.assert_close(total, want, **tol)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_dense_and_dcw_equal_single_process(world):
    checks = [(check_dense_ring, (torch.float64,)), (check_dcw, (torch.float64,))]
    if world == 4:
        checks.append((check_ring_precision, ()))
    spawn(world, checks)
