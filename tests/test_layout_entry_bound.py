"""BlockLayout.entry_bound: one layout whose entries carry their own window / far.

The layout merges rows read with MODE_WINDOW window 3, rows with MODE_WINDOW window 9, rows
mixing MODE_FAR far 5 with a window-3 diagonal block, and MODE_FULL / MODE_CAUSAL rows whose
entry_bound is junk (ignored); the layout's own window / far (7 / 100) are used by no entry, so
any path that falls back to them fails. Two documents per batch row, padding between them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported below

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dcwdist.attention.executor import attend_layout  # noqa: E402
from dcwdist.attention.flops import layout_pairs  # noqa: E402
from dcwdist.attention.layout import (MODE_CAUSAL, MODE_FAR, MODE_FULL,  # noqa: E402
                                      MODE_WINDOW, BlockLayout)
from dcwdist.kernels._block_sparse_plan import kernel_plan  # noqa: E402
from dcwdist.kernels.block_sparse import block_sparse_attention_reference  # noqa: E402
from dcwdist.parallel.balance import zigzag_sharding  # noqa: E402
from dcwdist.parallel.dcw_cp import select_rows, split_by_source  # noqa: E402
from dcwdist.parallel.qship import rows_over_source  # noqa: E402
from dcwdist.parallel.zigzag import CPShard  # noqa: E402
from tests.kernel_helpers import KERNEL_DEV, fp32_kernel_tol  # noqa: E402

BLK, T, B, G, H, HKV, D = 8, 96, 2, 2, 4, 2, 16
NB = T // BLK
LENGTHS = ([50, 40], [30, 60])  # per batch row; each document padded to whole blocks
W_SHORT, W_LONG, FAR = 3, 9, 5
DEFAULT_WINDOW, DEFAULT_FAR = 7, 100  # the layout's own window / far: no entry means them
JUNK = 1234  # entry_bound of FULL / CAUSAL entries: must be ignored
# fp32 kernel (CPU interpreter) vs fp64 reference: test_kernel_block_sparse.TOL[float32] on CPU
TOL32 = {"out": (2e-5, 1e-4), "lse": (2e-5, 1e-5), "grad": (1e-4, 1e-3)}


def docs_and_positions():
    """doc [B, T] (-1 padding) and position within the document [B, T]."""
    doc = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    for b, lengths in enumerate(LENGTHS):
        start = 0
        for d, n in enumerate(lengths):
            pad = (-n) % BLK
            doc[b, start:start + n] = d
            pos[b, start:start + n + pad] = torch.arange(n + pad)
            start += n + pad
        assert start == T
    return doc, pos


def mixed_row(b, g, qb):
    """[(key block, MODE_*, bound)] of row (b, g, qb): four row kinds, cycling with g."""
    if b == 1 and qb == 5:
        return []  # an empty row
    kind = (qb + g) % 4
    if kind == 0:
        return [(k, MODE_WINDOW, W_SHORT) for k in (qb - 1, qb) if k >= 0]
    if kind == 1:
        return [(k, MODE_WINDOW, W_LONG) for k in (qb - 2, qb - 1, qb) if k >= 0]
    if kind == 2:
        return [(k, MODE_FAR, FAR) for k in range(qb)] + [(qb, MODE_WINDOW, W_SHORT)]
    return ([(0, MODE_FULL, JUNK)] if qb > 0 else []) + [(qb, MODE_CAUSAL, -JUNK)]


def uniform_row(b, g, qb):
    """mixed_row with one window (W_LONG) and one far (FAR) for every entry."""
    return [(k, m, W_LONG if m == MODE_WINDOW else FAR if m == MODE_FAR else w)
            for k, m, w in mixed_row(b, g, qb)]


def build(row_fn, with_bound=True, window=DEFAULT_WINDOW, far=DEFAULT_FAR) -> BlockLayout:
    doc, pos = docs_and_positions()
    ents = [e for b in range(B) for g in range(G) for qb in range(NB) for e in row_fn(b, g, qb)]
    counts = [len(row_fn(b, g, qb)) for b in range(B) for g in range(G) for qb in range(NB)]
    kv, mode, bound = (torch.tensor(x) for x in zip(*ents))
    return BlockLayout(
        indptr=F.pad(torch.cumsum(torch.tensor(counts), 0), (1, 0)),
        kv_block=kv.to(torch.int32), mode=mode.to(torch.int8), batch=B, groups=G,
        num_q_blocks=NB, num_k_blocks=NB, q_block=BLK, k_block=BLK, q_pos=pos, k_pos=pos,
        window=window, far=far, q_doc=doc, k_doc=doc,
        entry_bound=bound.to(torch.int32) if with_bound else None)


def brute_force_mask(row_fn, window=None, far=None) -> torch.Tensor:
    """[B, G, T, T] token by token from the row specs (window / far: override every entry's)."""
    doc, pos = (x.tolist() for x in docs_and_positions())
    mask = torch.zeros(B, G, T, T, dtype=torch.bool)
    for b in range(B):
        for g in range(G):
            for qb in range(NB):
                for kb, mode, bound in row_fn(b, g, qb):
                    for i in range(qb * BLK, (qb + 1) * BLK):
                        for j in range(kb * BLK, (kb + 1) * BLK):
                            if doc[b][j] < 0 or doc[b][i] != doc[b][j]:
                                continue
                            d = pos[b][i] - pos[b][j]
                            w = bound if window is None else window
                            f = bound if far is None else far
                            mask[b, g, i, j] = {MODE_FULL: True, MODE_CAUSAL: d >= 0,
                                                MODE_WINDOW: 0 <= d < w,
                                                MODE_FAR: d >= f}[mode]
    return mask


def qkv(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, H, D), (B, T, HKV, D), (B, T, HKV, D)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def close(name, got, exp, atol, rtol):
    """assert_close allowing -inf where the reference has it."""
    got, exp = got.double(), exp.double()
    assert torch.equal(torch.isinf(got), torch.isinf(exp)), f"{name}: -inf pattern differs"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    fin = torch.isfinite(exp)
    torch.testing.assert_close(got[fin], exp[fin], atol=atol, rtol=rtol, msg=name)


def run_and_grad(fn, q, k, v, seed=1):
    out, lse = fn(q, k, v)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g).to(out)  # out's dtype and device
    dlse = torch.randn(lse.shape, generator=g).to(lse)
    return (out, lse, *torch.autograd.grad((out, lse), (q, k, v), (dout, dlse)))


def reference(lay):
    """Dense masked fp64 reference (layout.token_mask) of out, lse, dq, dk, dv."""
    q, k, v = qkv(torch.float64)
    return run_and_grad(lambda *x: block_sparse_attention_reference(*x, lay), q, k, v)


@pytest.fixture(scope="module")
def lay():
    return build(mixed_row)


@pytest.fixture(scope="module")
def ref(lay):
    return reference(lay)


# ---- the contract -----------------------------------------------------------------------------

def test_token_mask_applies_each_entrys_own_window_and_far(lay):
    mask = lay.token_mask()
    assert torch.equal(mask, brute_force_mask(mixed_row))
    # both windows really occur, and the layout's own window / far would give another mask
    assert torch.equal(dataclasses.replace(lay, entry_bound=None).token_mask(),
                       brute_force_mask(mixed_row, DEFAULT_WINDOW, DEFAULT_FAR))
    assert not torch.equal(mask, brute_force_mask(mixed_row, W_SHORT, FAR))
    assert not torch.equal(mask, brute_force_mask(mixed_row, W_LONG, FAR))


def test_transpose_and_to_carry_entry_bound_with_mode(lay):
    fwd = {}
    rows = torch.repeat_interleave(torch.arange(B * G * NB), lay.indptr.diff())
    for r, kb, m, w in zip(rows.tolist(), lay.kv_block.tolist(), lay.mode.tolist(),
                           lay.entry_bound.tolist()):
        fwd[(r // NB, r % NB, kb)] = (m, w)
    tr = lay.transpose()
    cols = torch.repeat_interleave(torch.arange(B * G * NB), tr.indptr.diff())
    got = {(c // NB, qb, c % NB): (m, w) for c, qb, m, w in zip(
        cols.tolist(), tr.q_block_idx.tolist(), tr.mode.tolist(), tr.bound.tolist())}
    assert got == fwd
    assert lay.transpose().bound.dtype == torch.int32
    assert dataclasses.replace(lay, entry_bound=None).transpose().bound is None
    assert torch.equal(lay.to("cpu").entry_bound, lay.entry_bound)
    with pytest.raises(ValueError, match="entry_bound"):
        dataclasses.replace(lay, entry_bound=lay.entry_bound[1:])


@pytest.mark.parametrize("chunk", [16, 1024])
def test_torch_executor_equals_dense_reference_in_fp64(lay, ref, chunk):
    q, k, v = qkv(torch.float64)
    got = run_and_grad(lambda *x: attend_layout(*x, lay, impl="torch", chunk_size=chunk),
                       q, k, v)
    assert torch.isinf(ref[1]).any() and torch.isfinite(ref[1]).any()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        close(name, a, b, 1e-10, 1e-10)


def test_triton_kernel_equals_dense_reference(lay, ref):
    q, k, v = [x.detach().to(KERNEL_DEV).requires_grad_() for x in qkv(torch.float32)]
    got = run_and_grad(lambda *x: attend_layout(*x, lay.to(KERNEL_DEV), impl="triton"), q, k, v)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).all() or name == "lse", f"{name}: non-finite"
        tol = TOL32["grad" if name.startswith("d") else name]
        close(name, a.cpu(), b, *fp32_kernel_tol(*tol, grad=name.startswith("d")))


def test_kernel_plan_bounds_are_the_entrys_window_and_far(lay):
    plan = kernel_plan(lay, torch.device("cpu"))
    for csr in (plan.fwd, plan.bwd):  # WINDOW: [0, window); FAR: [far, inf)
        pairs = set(zip(csr.lo.tolist(), csr.hi.tolist()))
        assert {(0, W_SHORT), (0, W_LONG), (FAR, 1 << 30)} <= pairs
        assert not any(DEFAULT_WINDOW in p or DEFAULT_FAR in p or JUNK in p for p in pairs)


def test_layout_pairs_count_the_token_mask(lay):
    want = lay.token_mask().sum(-1)
    assert torch.equal(layout_pairs(lay), want)
    assert torch.equal(layout_pairs(lay, entries_per_chunk=7), want)


def test_no_entry_bound_means_layout_window_and_far_for_every_entry():
    plain = build(uniform_row, with_bound=False, window=W_LONG, far=FAR)
    filled = build(uniform_row, with_bound=True, window=W_LONG, far=FAR)
    assert plain.entry_bound is None
    mask = plain.token_mask()
    assert torch.equal(mask, brute_force_mask(uniform_row))
    assert torch.equal(mask, filled.token_mask())
    assert torch.equal(layout_pairs(plain), layout_pairs(filled))
    q, k, v = qkv(torch.float64)
    a = attend_layout(q, k, v, plain, chunk_size=16)
    b = attend_layout(q, k, v, filled, chunk_size=16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    p0, p1 = kernel_plan(plain, torch.device("cpu")), kernel_plan(filled, torch.device("cpu"))
    for c0, c1 in ((p0.fwd, p1.fwd), (p0.bwd, p1.bwd)):
        for f in ("blk", "lo", "hi", "flag", "split"):
            assert torch.equal(getattr(c0, f), getattr(c1, f)), f


def test_cp_sub_layouts_keep_each_entrys_bound(lay):
    """select_rows / split_by_source / rows_over_source give the global mask's slices."""
    full = lay.token_mask()
    doc, pos = docs_and_positions()
    P = 2
    sharding = zigzag_sharding(T, P)
    for r in range(P):
        shard = CPShard(None, P, r, T, doc, pos, sharding=sharding)
        qi = shard.index()
        assert torch.equal(select_rows(lay, shard).token_mask(), full[:, :, qi])
        for s, step in enumerate(split_by_source(lay, shard)):
            ki = shard.index((r - s) % P)
            assert step.entry_bound is not None
            assert torch.equal(step.token_mask(), full[:, :, qi][:, :, :, ki])
        q_blocks = qi[::BLK] // BLK
        b_idx = torch.arange(B).repeat_interleave(q_blocks.numel())
        for src in range(P):
            flat = rows_over_source(lay, b_idx, q_blocks.repeat(B), sharding, src)
            ki, Tl = sharding.index(src), T // P
            want = torch.zeros(G, B * Tl, B * Tl, dtype=torch.bool)
            for b in range(B):
                want[:, b * Tl:(b + 1) * Tl, b * Tl:(b + 1) * Tl] = full[b][:, qi][:, :, ki]
            assert torch.equal(flat.token_mask()[0], want)
