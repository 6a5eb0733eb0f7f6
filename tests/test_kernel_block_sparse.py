"""Triton block-sparse attention against the dense torch reference: out, lse, dq, dk, dv.

On CPU the kernels run under TRITON_INTERPRET=1 (fp32 / fp16 only: the interpreter's tl.dot is
wrong for bf16); bf16 and larger tiles are the `gpu`-marked tests. Every gradient check uses a
random dout AND a random dlse, so the LSE-gradient path (used by LSE merging) is exercised.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported below

import pytest  # noqa: E402

from dcwdist.attention import AttentionConfig  # noqa: E402
from dcwdist.attention.dcw import build_dcw_plan  # noqa: E402
from dcwdist.attention.executor import merge_partials  # noqa: E402
from dcwdist.attention.layout import (MODE_CAUSAL, MODE_FAR, MODE_FULL,  # noqa: E402
                                      MODE_WINDOW, BlockLayout)
from dcwdist.attention.layouts import (ROW_CAUSAL, ROW_WINDOW, compact_far_layout,  # noqa: E402
                                       doc_position, local_layout, pad_doc, summary_layout,
                                       topk_layout)
from dcwdist.kernels import _block_sparse_plan  # noqa: E402
from dcwdist.kernels.block_sparse import (block_sparse_attention,  # noqa: E402
                                          block_sparse_attention_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Per tensor (atol, rtol) against an fp64 reference. fp32 on CPU is exact arithmetic up to
# summation order; on GPU fp32 dots run as tf32. fp16: P and dS are rounded to fp16 for the dots.
TOL = {
    torch.float32: {"out": (2e-5, 1e-4), "lse": (2e-5, 1e-5), "grad": (1e-4, 1e-3)}
    if DEV == "cpu" else {"out": (5e-3, 5e-3), "lse": (5e-3, 1e-3), "grad": (2e-2, 2e-2)},
    torch.float16: {"out": (2e-3, 5e-3), "lse": (1e-3, 1e-3), "grad": (1e-2, 1e-2)},
    torch.bfloat16: {"out": (2e-2, 2e-2), "lse": (1e-2, 5e-3), "grad": (6e-2, 5e-2)},
}


def close(name, got, exp, atol, rtol):
    """assert_close with -inf allowed where the reference has it; prints max/mean diff."""
    got, exp = got.double(), exp.double()
    assert torch.equal(torch.isinf(got), torch.isinf(exp)), f"{name}: -inf pattern differs"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    fin = torch.isfinite(exp)
    diff = (got[fin] - exp[fin]).abs()
    bad = diff > atol + rtol * exp[fin].abs()
    if diff.numel() and bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())}/{diff.numel()} off; max diff "
                             f"{diff.max():.3e}, mean diff {diff.mean():.3e} "
                             f"(atol {atol}, rtol {rtol})")


def make_layout(modes_BGQK, q_block, k_block, q_pos=None, k_pos=None, window=0, far=0,
                q_doc=None, k_doc=None):
    """BlockLayout from a dense block table [B, G, NQ, NK] of MODE_* (-1: no entry)."""
    B, G, NQ, NK = modes_BGQK.shape
    flat = modes_BGQK.reshape(B * G * NQ, NK)
    present = flat >= 0
    indptr = torch.zeros(B * G * NQ + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(present.sum(1), 0)
    kv = present.nonzero()[:, 1]
    if q_pos is None:
        q_pos = torch.arange(NQ * q_block).repeat(B, 1)
    if k_pos is None:
        k_pos = torch.arange(NK * k_block).repeat(B, 1)
    return BlockLayout(indptr=indptr, kv_block=kv.to(torch.int32),
                       mode=flat[present].to(torch.int8),
                       batch=B, groups=G, num_q_blocks=NQ, num_k_blocks=NK, q_block=q_block,
                       k_block=k_block, q_pos=q_pos, k_pos=k_pos, window=window, far=far,
                       q_doc=q_doc, k_doc=k_doc)


def random_layout(seed, B, G, NQ, NK, qb, kb, density=0.5, docs=True):
    g = torch.Generator().manual_seed(seed)
    modes = torch.randint(0, 4, (B, G, NQ, NK), generator=g)
    modes[torch.rand(B, G, NQ, NK, generator=g) > density] = -1
    modes[:, :, 0] = -1  # an empty row
    q_pos = torch.randint(0, 4 * NQ * qb, (B, NQ * qb), generator=g).sort(1).values
    k_pos = torch.randint(0, 4 * NK * kb, (B, NK * kb), generator=g)
    q_doc = k_doc = None
    if docs:
        q_doc = torch.randint(0, 2, (B, NQ * qb), generator=g)
        k_doc = torch.randint(-1, 2, (B, NK * kb), generator=g)
    return make_layout(modes, qb, kb, q_pos, k_pos, window=int(3 * kb), far=int(2 * kb),
                       q_doc=q_doc, k_doc=k_doc)


def packed_docs(B, T, lengths, blk):
    """[B, T] doc ids: documents of `lengths` each padded to whole blocks, then -1 padding."""
    rows = []
    for _ in range(B):
        ids = []
        for d, n in enumerate(lengths):
            ids += [d] * n + [-1] * ((-n) % blk)
        rows.append((ids + [-1] * T)[:T])
    return torch.tensor(rows)


# ---- cases: name -> (layout, Tq, Tk, H, Hkv, key gather index or None) ----------------------

def case_local(B, T, blk, H, Hkv, kind=ROW_CAUSAL, window=0, lengths=None):
    doc = (torch.zeros(B, T, dtype=torch.long) if lengths is None
           else packed_docs(B, T, lengths, blk))
    lay = local_layout(doc, blk, torch.full((B, T // blk), kind), window)
    return lay, H, Hkv, None


def case_strided(B, T, blk, H, Hkv, stride, far, lengths):
    doc = packed_docs(B, T, lengths, blk)
    sel = doc_position(pad_doc(doc, blk)) % stride == 0
    rows = torch.ones(B, T // blk, dtype=torch.bool)
    lay, gather = compact_far_layout(doc, blk, sel, rows, far)
    return lay, H, Hkv, gather


def case_summary(B, T, blk, H, Hkv, pool):
    doc = packed_docs(B, T, [T - blk, blk], blk)
    g = torch.Generator().manual_seed(T + blk)
    core = torch.rand(B, T // blk, generator=g) < 0.4
    core[:, 0] = True
    lay, _, _ = summary_layout(doc, blk, core, ~core, pool)
    return lay, H, Hkv, None


def case_topk(B, T, blk, H, Hkv, k):
    doc = torch.zeros(B, T, dtype=torch.long)
    NQ = T // blk
    g = torch.Generator().manual_seed(NQ + k)
    lay = topk_layout(doc, blk, torch.rand(B, Hkv, NQ, NQ, generator=g), k)
    return lay, H, Hkv, None


def case_random(seed, B, G, NQ, NK, qb, kb, H, Hkv, density=0.5, docs=True):
    return random_layout(seed, B, G, NQ, NK, qb, kb, density, docs), H, Hkv, None


def case_all_masked(B, blk, H):
    """Rows with entries whose every pair fails (window 0, FAR beyond reach) and empty rows."""
    NQ = 4
    modes = torch.full((B, 1, NQ, NQ), -1)
    modes[:, 0, 1, 1] = MODE_WINDOW  # window 0 -> nothing
    modes[:, 0, 2, :2] = MODE_FAR  # far beyond the sequence -> nothing
    modes[:, 0, 3, :3] = MODE_FULL
    modes[:, 0, 3, 3] = MODE_CAUSAL
    return make_layout(modes, blk, blk, window=0, far=10_000), H, H, None


CASES = {
    "causal_b32": lambda: case_local(1, 128, 32, 2, 2),
    "causal_b16_gqa": lambda: case_local(1, 128, 16, 4, 2),
    "causal_batch2_mqa": lambda: case_local(2, 128, 32, 2, 1),
    "causal_packed_docs": lambda: case_local(1, 192, 32, 2, 2, lengths=[70, 50, 30]),
    "causal_b64_subtiles": lambda: case_local(1, 128, 64, 2, 1),
    "window_24_b16": lambda: case_local(1, 128, 16, 2, 2, ROW_WINDOW, 24),
    "window_64_b32_docs": lambda: case_local(2, 128, 32, 2, 2, ROW_WINDOW, 64, [40, 60]),
    "window_5_b16": lambda: case_local(1, 96, 16, 2, 1, ROW_WINDOW, 5),
    "strided_far32_b16": lambda: case_strided(1, 256, 16, 2, 2, 8, 32, [256]),
    "strided_far64_b32_docs": lambda: case_strided(2, 256, 32, 2, 1, 8, 64, [100, 90, 40]),
    "strided_far16_b16_gqa": lambda: case_strided(1, 128, 16, 4, 2, 4, 16, [60, 60]),
    "summary_pool2_kb16": lambda: case_summary(1, 256, 32, 2, 2, 2),
    "summary_pool4_kb8_pad": lambda: case_summary(1, 128, 32, 2, 1, 4),
    "topk_G_eq_Hkv": lambda: case_topk(1, 128, 16, 4, 2, 3),
    "topk_G_eq_Hkv_batch2": lambda: case_topk(2, 128, 32, 2, 2, 1),
    "random_q16_k16": lambda: case_random(0, 1, 1, 8, 8, 16, 16, 2, 2),
    "random_q32_k16_G2": lambda: case_random(1, 1, 2, 4, 8, 32, 16, 4, 2),
    "random_q16_k32_batch2": lambda: case_random(2, 2, 1, 8, 4, 16, 32, 2, 1),
    "random_q64_k32_G2_subtiles": lambda: case_random(3, 1, 2, 2, 4, 64, 32, 2, 2),
    "random_q16_k8_pad": lambda: case_random(4, 1, 1, 6, 10, 16, 8, 2, 2),
    "random_q8_k16_pad": lambda: case_random(5, 1, 1, 10, 6, 8, 16, 2, 1),
    "random_dense_nodoc": lambda: case_random(6, 1, 1, 4, 4, 32, 32, 2, 2, 1.0, False),
    "random_sparse_batch2_gqa": lambda: case_random(7, 2, 2, 4, 4, 32, 32, 4, 2, 0.3),
    "all_masked_rows": lambda: case_all_masked(1, 16, 2),
}
FP16_CASES = ["causal_b16_gqa", "window_64_b32_docs", "strided_far64_b32_docs",
              "summary_pool4_kb8_pad", "topk_G_eq_Hkv", "random_q32_k16_G2", "all_masked_rows"]


def inputs(lay, H, Hkv, D, dtype, gather, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = lay.batch
    Tq, T_keys = lay.num_q_blocks * lay.q_block, lay.num_k_blocks * lay.k_block
    Tsrc = int(gather.max()) + 1 if gather is not None else T_keys
    q = torch.randn(B, Tq, H, D, generator=g)
    k = torch.randn(B, max(Tsrc, T_keys), Hkv, D, generator=g)
    v = torch.randn(B, max(Tsrc, T_keys), Hkv, D, generator=g)
    if gather is not None:  # a compact key set gathered from the sequence
        bi = torch.arange(B)[:, None]
        k, v = k[bi, gather], v[bi, gather]
    k, v = k[:, :T_keys], v[:, :T_keys]
    return [x.to(DEV, dtype).requires_grad_() for x in (q, k, v)]


def check(lay, H, Hkv, gather, dtype, D=32, scale=None, deterministic=True):
    lay = lay.to(DEV)
    q, k, v = inputs(lay, H, Hkv, D, dtype, gather)
    out, lse = block_sparse_attention(q, k, v, lay, scale, deterministic)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == (lay.batch, H, q.shape[1])
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = block_sparse_attention_reference(q64, k64, v64, lay, scale)
    tol = TOL[dtype]
    close("out", out, ref, *tol["out"])
    close("lse", lse, ref_lse, *tol["lse"])
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(DEV)
    dlse = torch.randn(lse.shape, generator=g).to(DEV)
    got = torch.autograd.grad((out, lse), (q, k, v), (dout.to(dtype), dlse))
    exp = torch.autograd.grad((ref, ref_lse), (q64, k64, v64), (dout.double(), dlse.double()))
    for name, a, b in zip(("dq", "dk", "dv"), got, exp):
        assert torch.isfinite(a).all(), f"{name}: non-finite"
        close(name, a, b, *tol["grad"])
    return out, lse


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_reference(name):
    lay, H, Hkv, gather = CASES[name]()
    check(lay, H, Hkv, gather, torch.float32)


@pytest.mark.parametrize("name", FP16_CASES)
def test_fp16_matches_reference(name):
    lay, H, Hkv, gather = CASES[name]()
    check(lay, H, Hkv, gather, torch.float16)


@pytest.mark.parametrize("name", ["causal_b16_gqa", "strided_far64_b32_docs",
                                  "random_q64_k32_G2_subtiles", "random_q8_k16_pad",
                                  "all_masked_rows"])
def test_atomic_dq_matches_reference(name):
    lay, H, Hkv, gather = CASES[name]()
    check(lay, H, Hkv, gather, torch.float32, deterministic=False)


SPAN_CASES = [("causal_b16_gqa", 2), ("window_24_b16", 2), ("strided_far16_b16_gqa", 2),
              ("topk_G_eq_Hkv", 2), ("random_q32_k16_G2", 2), ("all_masked_rows", 2),
              ("window_64_b32_docs", 2), ("random_q16_k32_batch2", 2), ("random_q16_k16", 4),
              ("causal_b16_gqa", 4)]


@pytest.mark.parametrize("name,span", SPAN_CASES)
def test_dkdv_tiles_spanning_adjacent_key_blocks_match_reference(name, span):
    """A dK/dV tile over `span` adjacent key blocks walks the union of their columns, each block
    with its own bounds and a missing block masked: the same gradients as the reference."""
    from dcwdist.kernels import block_sparse as bs
    lay, H, Hkv, gather = CASES[name]()
    cfg = (16, span * lay.k_block, 4, 1)
    assert bs._fits(cfg, lay.q_block, lay.k_block, 0, lay.num_k_blocks)
    with bs.force_tiles(dkdv=cfg):  # starts with no tuned tile
        check(lay, H, Hkv, gather, torch.float32)
        chosen = [c for key, c in _block_sparse_plan._TUNED.items() if key[0] == "dkdv"]
    assert chosen == [cfg]


@pytest.mark.parametrize("name", ["causal_b16_gqa", "random_q16_k32_batch2"])
def test_spanning_dkdv_with_atomic_dq_matches_reference(name):
    from dcwdist.kernels import block_sparse as bs
    lay, H, Hkv, gather = CASES[name]()
    with bs.force_tiles(dkdv=(16, 2 * lay.k_block, 4, 1)):
        check(lay, H, Hkv, gather, torch.float32, deterministic=False)


def test_forced_tiles_neither_meet_nor_outlive_the_tuning_around_them(monkeypatch):
    from dcwdist.kernels import block_sparse as bs
    monkeypatch.setattr(_block_sparse_plan, "_TUNED", {})
    lay, H, Hkv, gather = CASES["causal_b16_gqa"]()
    check(lay, H, Hkv, gather, torch.float32)
    before = dict(_block_sparse_plan._TUNED)
    forced = (16, 2 * lay.k_block, 4, 1)
    assert before and forced not in before.values()
    with bs.force_tiles(dkdv=forced):
        check(lay, H, Hkv, gather, torch.float32)  # same keys as before: the forced tile runs
        assert forced in _block_sparse_plan._TUNED.values()
    assert _block_sparse_plan._TUNED == before
    with pytest.raises(ValueError, match="unknown kernel"):
        with bs.force_tiles(bwd=forced):
            pass
    with pytest.raises(ValueError, match="does not fit"):
        with bs.force_tiles(dkdv=(16, 24, 4, 1)):
            check(lay, H, Hkv, gather, torch.float32)


def test_a_tile_tuned_for_one_layout_is_not_run_where_its_span_does_not_fit(monkeypatch):
    """Two layouts of one tuning class (same blocks, length and row buckets) with 4 and 3 key
    blocks: the 4-block one takes a dK/dV tile spanning 2 key blocks, which cannot cover 3.
    The second layout gets its own fitting tile and the reference's gradients (the 3-block
    one used to fail with "span 2 must ... divide the 3 blocks")."""
    from dcwdist.kernels import block_sparse as bs
    monkeypatch.setattr(_block_sparse_plan, "_TUNED", {})
    lays = [make_layout(torch.full((1, 1, 2, nk), MODE_FULL), 32, 16) for nk in (4, 3)]
    check(lays[0], 2, 2, None, torch.float32)
    tuned = {k: c for k, c in _block_sparse_plan._TUNED.items() if k[0] == "dkdv"}
    assert [bs.block_span(c[1], 16) for c in tuned.values()] == [2]
    check(lays[1], 2, 2, None, torch.float32)
    spans = sorted(bs.block_span(c[1], 16) for k, c in _block_sparse_plan._TUNED.items()
                   if k[0] == "dkdv")
    assert spans == [1, 2]


def test_spanned_csr_is_the_union_of_its_blocks_columns():
    """Each spanning column lists every query block that any of its key blocks lists, once;
    entries are unmasked only when all blocks are present and unmasked."""
    from dcwdist.kernels._block_sparse_plan import FLAG_MASK, kernel_plan, spanned_csr
    lay, _, _, _ = CASES["random_q16_k16"]()
    plan = kernel_plan(lay, torch.device("cpu"))
    sp = spanned_csr(plan, "bwd", 2)
    assert spanned_csr(plan, "bwd", 2) is sp  # built once
    t, NK = plan.bwd, plan.num_k_blocks

    def column(csr, c):
        a, b = int(csr.indptr[c]), int(csr.indptr[c + 1])
        return csr.blk[a:b].tolist(), int(csr.split[c]) - a

    for j in range(NK // 2):
        want = sorted(set(column(t, 2 * j)[0]) | set(column(t, 2 * j + 1)[0]))
        got, n_unmasked = column(sp, j)
        assert sorted(got) == want and len(got) == len(set(got))
        both = set(column(t, 2 * j)[0][:column(t, 2 * j)[1]]) & set(
            column(t, 2 * j + 1)[0][:column(t, 2 * j + 1)[1]])
        assert set(got[:n_unmasked]) == both
    with pytest.raises(ValueError, match="divide"):
        spanned_csr(plan, "bwd", 3)
    assert int((sp.flag[: int(sp.split[0])] & FLAG_MASK).sum()) == 0


Q_SPAN_CASES = [("causal_b16_gqa", 2), ("window_24_b16", 2), ("random_q16_k16", 2),
                ("random_q16_k32_batch2", 2), ("window_64_b32_docs", 2), ("topk_G_eq_Hkv", 2),
                ("all_masked_rows", 2), ("random_q16_k16", 4), ("summary_pool4_kb8_pad", 2)]


@pytest.mark.parametrize("name,span", Q_SPAN_CASES)
def test_forward_and_dq_tiles_spanning_adjacent_query_blocks_match_reference(name, span):
    """A forward / dQ tile over `span` adjacent query blocks walks the union of their rows,
    each block with its own bounds (rows of a block without the entry masked, rows with no
    key at all giving out 0 and lse -inf): the same outputs and gradients as the reference."""
    from dcwdist.kernels import block_sparse as bs
    lay, H, Hkv, gather = CASES[name]()
    cfg = (span * lay.q_block, min(lay.k_block, 16) if lay.k_block >= 16 else 16, 4, 1)
    assert bs._fits(cfg, lay.q_block, lay.k_block, lay.num_q_blocks, 0)
    with bs.force_tiles(fwd=cfg, dq=cfg):
        check(lay, H, Hkv, gather, torch.float32)
        chosen = {key[0]: c for key, c in _block_sparse_plan._TUNED.items()}
    assert chosen["fwd"] == cfg and chosen["dq"] == cfg and chosen["dkdv"] != cfg


def test_empty_rows_give_zero_and_minus_inf():
    lay, H, Hkv, _ = case_all_masked(1, 16, 2)
    out, lse = check(lay, H, Hkv, None, torch.float32, scale=0.3)
    assert (out[:, :48] == 0).all() and torch.isinf(lse[:, :, :48]).all()
    assert torch.isfinite(lse[:, :, 48:]).all()


def test_dcw_partials_merged_by_lse_match_one_softmax():
    """Local + buffer + strided partials through the kernel, merged by LSE, = one masked softmax."""
    cfg = AttentionConfig(kind="dcw", block_size=16, window=16, buffer_window=32, stride=8,
                          summary_pool=4)
    doc = packed_docs(1, 192, [120, 60], 16)
    tiers = torch.tensor([[0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 1]])
    plan = build_dcw_plan(cfg, doc, tiers)
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 192, 2, 32, generator=g).to(DEV).requires_grad_()
               for _ in range(3)]
    bi = torch.arange(1)[:, None]
    idx = plan.strided_idx.to(DEV)

    def run(fn):
        parts = [fn(q, k, v, plan.local.to(DEV)), fn(q, k, v, plan.buffer.to(DEV)),
                 fn(q, k[bi, idx], v[bi, idx], plan.strided.to(DEV))]
        return merge_partials(parts)

    out, lse = run(block_sparse_attention)
    ref, ref_lse = run(block_sparse_attention_reference)
    close("out", out, ref, *TOL[torch.float32]["out"])
    close("lse", lse, ref_lse, *TOL[torch.float32]["lse"])
    dout = torch.randn(out.shape, generator=g).to(DEV)
    dlse = torch.randn(lse.shape, generator=g).to(DEV)
    for name, a, b in zip(("dq", "dk", "dv"),
                          torch.autograd.grad((out, lse), (q, k, v), (dout, dlse)),
                          torch.autograd.grad((ref, ref_lse), (q, k, v), (dout, dlse))):
        close(name, a, b, *TOL[torch.float32]["grad"])


def test_shape_errors_are_clear():
    lay, H, Hkv, _ = case_local(1, 128, 32, 2, 2)
    q = torch.randn(1, 120, 2, 32)
    k = torch.randn(1, 128, 2, 32)
    with pytest.raises(ValueError, match="Tq=120"):
        block_sparse_attention(q, k, k, lay)
    with pytest.raises(ValueError, match="Tk=96"):
        block_sparse_attention(k, k[:, :96], k[:, :96], lay)
    with pytest.raises(ValueError, match="H % Hkv"):
        block_sparse_attention(torch.randn(1, 128, 3, 32), k, k, lay)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(k.half(), k, k, lay)
    topk, _, _, _ = case_topk(1, 128, 32, 4, 2, 1)
    with pytest.raises(ValueError, match="groups"):
        block_sparse_attention(torch.randn(1, 128, 3, 32), torch.randn(1, 128, 3, 32),
                               torch.randn(1, 128, 3, 32), topk)


# ---- GPU: bf16 and production tile sizes ------------------------------------------------------

GPU_CASES = {
    "causal_b64_d128": lambda: case_local(2, 1024, 64, 4, 2),
    "causal_b128_d64_docs": lambda: case_local(1, 2048, 128, 4, 4, lengths=[900, 700, 300]),
    "window_b64": lambda: case_local(1, 1024, 64, 4, 1, ROW_WINDOW, 64, [1000]),
    "strided_b64": lambda: case_strided(1, 2048, 64, 4, 2, 8, 64, [1200, 800]),
    "summary_b64_pool4": lambda: case_summary(1, 1024, 64, 4, 2, 4),
    "topk_b64": lambda: case_topk(1, 1024, 64, 4, 2, 4),
    "random_b128": lambda: case_random(11, 2, 2, 8, 8, 128, 128, 4, 2, 0.4),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", [(n, torch.bfloat16) for n in GPU_CASES]
                         + [("causal_b64_d128", torch.float16), ("strided_b64", torch.float16)])
def test_gpu_matches_reference(name, dtype, monkeypatch):
    monkeypatch.setattr(_block_sparse_plan, "AUTOTUNE", False)  # one compile per variant
    lay, H, Hkv, gather = GPU_CASES[name]()
    check(lay, H, Hkv, gather, dtype, D=64 if "d64" in name else 128)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["causal_b64_d128", "strided_b64", "random_b128"])
def test_gpu_atomic_dq_matches_reference(name, monkeypatch):
    monkeypatch.setattr(_block_sparse_plan, "AUTOTUNE", False)
    lay, H, Hkv, gather = GPU_CASES[name]()
    check(lay, H, Hkv, gather, torch.bfloat16, D=128, deterministic=False)


def recording_clock(timed: list):
    """clock(ms_of) -> a tuner timing function that returns ms_of(cfg) and appends cfg to
    `timed`, so a test sees which configs the tuner timed, in order."""
    def clock(ms_of):
        def time_ms(cfg):
            timed.append(cfg)
            return ms_of(cfg)
        return time_ms
    return clock


def test_tuning_a_long_kernel_times_only_the_nearest_classes_three_best(monkeypatch):
    """A 1M / 2M kernel runs for seconds: its tuning starts from the ranking of the longest
    related class already tuned and stops after three configs; a short kernel times all."""
    from dcwdist.kernels._block_sparse_plan import candidate_order, pick_config
    monkeypatch.setattr(_block_sparse_plan, "_TIMINGS", {})
    cfgs = [(64, 64, 4, s) for s in range(6)]
    short = ("dkdv", torch.bfloat16, 64, 64, 64, True, 15, 2)
    timed = []
    clock = recording_clock(timed)

    assert pick_config(short, cfgs, clock(lambda c: 10.0 - c[3])) == cfgs[5]
    assert timed == cfgs  # fast: every config timed, in the given order
    longer = short[:7] + (4,)
    assert candidate_order(longer, cfgs)[:3] == [cfgs[5], cfgs[4], cfgs[3]]
    timed.clear()
    assert pick_config(longer, cfgs, clock(lambda c: 2000.0 + c[3])) == cfgs[3]
    assert timed == [cfgs[5], cfgs[4], cfgs[3]]  # long: three, then stop
    timed.clear()  # the longest tuned class now ranks the next one
    assert candidate_order(short[:7] + (5,), cfgs)[0] == cfgs[3]
    other = ("fwd",) + short[1:]
    assert candidate_order(other, cfgs) == cfgs  # no related class: the given order


def test_tuning_stops_at_the_tile_every_related_class_chose_once_it_runs_long(monkeypatch):
    """Two or more tuned classes that all chose one tile: a new class of that kernel times it
    first and, if one run takes AGREED_RUN_MS, stops there; classes that disagree, or a fast
    run, time the candidates as before."""
    from dcwdist.kernels._block_sparse_plan import (AGREED_RUN_MS, LONG_RUN_MS, NARROW_TO,
                                                    pick_config)
    monkeypatch.setattr(_block_sparse_plan, "_TIMINGS", {})
    cfgs = [(64, 64, 4, s) for s in range(6)]
    key = ("dkdv", torch.bfloat16, 64, 64, 64, True, 15)
    timed = []
    clock = recording_clock(timed)

    fast_at_2 = lambda c: 5.0 + abs(c[3] - 2)  # noqa: E731
    for bucket in (1, 2):  # two short classes, both choosing cfgs[2]
        assert pick_config(key + (bucket,), cfgs, clock(fast_at_2)) == cfgs[2]
    assert len(timed) == 12
    timed.clear()
    assert pick_config(key + (3,), cfgs, clock(lambda c: AGREED_RUN_MS + c[3])) == cfgs[2]
    assert timed == [cfgs[2]]  # long and agreed: one timing
    timed.clear()
    assert pick_config(key + (4,), cfgs, clock(fast_at_2)) == cfgs[2]
    assert len(timed) == 6  # short: every candidate, agreement or not
    timed.clear()
    # a class that chose another tile ends the agreement
    assert pick_config(key + (5,), cfgs, clock(lambda c: 5.0 + abs(c[3] - 4))) == cfgs[4]
    timed.clear()
    pick_config(key + (6,), cfgs, clock(lambda c: AGREED_RUN_MS + c[3]))
    assert len(timed) == 6  # no agreement, under LONG_RUN_MS: every candidate
    timed.clear()
    pick_config(key + (7,), cfgs, clock(lambda c: LONG_RUN_MS + c[3]))
    assert len(timed) == NARROW_TO  # no agreement, very long: the nearest class's best three
