"""Block-sparse flash attention driven by a BlockLayout (Triton), and its pure-torch reference.

Shapes: q_BTHD [B, Tq, H, D]; k_BSKD / v_BSKD [B, Tk, Hkv, D] (Tk: the key set the layout
indexes -- the sequence or a compact set); out [B, Tq, H, D] in q's dtype; lse [B, H, Tq] fp32.
H % Hkv == 0 (GQA); the layout's G groups divide Hkv (G = 1 or Hkv): query head h uses group
h // (H // G). Tq must be num_q_blocks * q_block and Tk num_k_blocks * k_block (pad first).

Both outputs are differentiable: backward takes dout and dlse (dS_ij gets + P_ij * dlse_i), so
partial softmaxes over disjoint key sets merged by LSE (executor.merge_partials) get exact
gradients. Rows with no visible key give out 0, lse -inf and zero (finite) gradients.
fp16 / bf16 / fp32 inputs, fp32 accumulation (fp32 dots run as tf32 on GPU tensor cores).
Forward and dQ walk the layout's CSR; dK/dV walk its transpose, one writer per dK/dV tile, no
atomics. A tile wider than a layout block spans adjacent blocks (query blocks in the forward
and dQ, key blocks in dK/dV) and walks the union of their rows (_block_sparse_plan.spanned_csr).
Kernels are in _block_sparse_triton.py; plan preparation and tuning in _block_sparse_plan.py.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from dcwdist.attention.layout import BlockLayout
from dcwdist.kernels import _block_sparse_plan
from dcwdist.kernels import _block_sparse_triton as _k
from dcwdist.kernels._block_sparse_plan import (KernelPlan, kernel_plan, launch_tuned,
                                                spanned_csr, sub_tiles)

__all__ = ["block_sparse_attention", "block_sparse_attention_reference", "force_tiles"]

_LOG2E = 1.4426950408889634
_TINY = 1e-30

# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first that fits the layout blocks is used when
# not tuning (interpreter); on GPU every fitting one is timed once per problem class.
# Registers and spills: `python benchmarks/kernel_registers.py` (ptxas -v, sm_90a, triton 3.7).
# At D=128 the first dK/dV tiles spill a little (0-48 bytes). The *_SMALL_D lists join at head
# dim <= 64 (the 100M and 1B models, 64-token layout blocks): 4-warp 64x64 tiles and 3 stages,
# no spills at D=64. A tile wider than a layout block spans adjacent blocks (block_span), so
# with 64-token blocks the 128-query forward / dQ tiles and the 32x128 / 64x128 dK/dV tiles
# apply too (193-203 registers at D=64 for dK/dV, no spills); before, a 64-block layout had
# only 64-row tiles, each loaded tile of the other side serving half the rows it serves in
# FlashAttention-2 (128 queries forward, 128 keys in dK/dV). Tiles under 32 rows only serve
# layout blocks under 32 tokens.
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3),
                (128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 2)]
_DQ_CONFIGS = [(128, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 3), (64, 32, 4, 2),
               (32, 32, 4, 2), (16, 16, 4, 2)]
_DKDV_CONFIGS = [(32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 2),
                 (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 2)]
_FWD_CONFIGS_SMALL_D = [(64, 64, 4, 2), (64, 64, 8, 3), (64, 32, 4, 3)]
_DQ_CONFIGS_SMALL_D = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3)]
_DKDV_CONFIGS_SMALL_D = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3),
                         (64, 32, 4, 3)]
_TABLES = {"fwd": (_FWD_CONFIGS, _FWD_CONFIGS_SMALL_D), "dq": (_DQ_CONFIGS, _DQ_CONFIGS_SMALL_D),
           "dkdv": (_DKDV_CONFIGS, _DKDV_CONFIGS_SMALL_D)}
_CPU_CONFIGS = [(32, 32, 4, 1), (16, 16, 4, 1)]
# kernel name -> the one tile to run, instead of the table (tests of a given tile on any device;
# benchmarks timing one tile); `force_tiles` sets it for a block of code.
_FORCED: dict = {}


@contextlib.contextmanager
def force_tiles(**tiles):
    """Run the named kernels ("fwd", "dq", "dkdv") with the given (BLOCK_M, BLOCK_N, num_warps,
    num_stages) tile inside the block, e.g. `with force_tiles(dkdv=(32, 128, 8, 2)): ...`. A tile
    that does not fit the layout's blocks raises ValueError at launch. The block starts with no
    tuned tiles, and the tiles chosen inside it are dropped at its end (the tuning from before
    comes back), so a forced tile neither meets an earlier choice nor outlives the block."""
    unknown = set(tiles) - set(_TABLES)
    if unknown:
        raise ValueError(f"force_tiles: unknown kernel(s) {sorted(unknown)}; "
                         f"allowed: {sorted(_TABLES)}")
    tuned = _block_sparse_plan._TUNED
    old_forced, old_tuned = dict(_FORCED), dict(tuned)
    _FORCED.update({k: tuple(v) for k, v in tiles.items()})
    tuned.clear()
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(old_forced)
        tuned.clear()
        tuned.update(old_tuned)


def block_sparse_attention(q_BTHD: torch.Tensor, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor,
                           layout: BlockLayout, scale: Optional[float] = None,
                           deterministic: bool = True, kept=None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over the keys `layout` allows: (out [B,Tq,H,D], lse [B,H,Tq] fp32).

    deterministic=False adds dQ with fp32 atomics inside the dK/dV pass (one backward pass
    instead of two; run-to-run bits of dQ may differ). kept (model.activations.KeptOutputs):
    a checkpointed first forward keeps (out, lse) there and the recompute in backward reuses
    them: only the autograd node is rebuilt, the forward kernel does not run again.
    """
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
    _check(q_BTHD, k_BSKD, v_BSKD, layout)
    slot, given = kept.recall() if kept is not None else (None, None)
    out, lse = _BlockSparseAttention.apply(q_BTHD, k_BSKD, v_BSKD, layout, scale, deterministic,
                                           given)
    if slot is not None:
        kept.keep(slot, out, lse)
    return out, lse


def block_sparse_attention_reference(q_BTHD, k_BSKD, v_BSKD, layout: BlockLayout,
                                     scale: Optional[float] = None):
    """Dense masked softmax over layout.token_mask() in fp32 (fp64 stays fp64); same contract."""
    B, Tq, H, D = q_BTHD.shape
    Hkv = k_BSKD.shape[2]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.promote_types(q_BTHD.dtype, torch.float32)
    mask_BHQK = layout.to(q_BTHD.device).token_mask().repeat_interleave(H // layout.groups, 1)
    k = k_BSKD.to(acc).repeat_interleave(H // Hkv, 2)
    v = v_BSKD.to(acc).repeat_interleave(H // Hkv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q_BTHD.to(acc), k) * scale
    s = s.masked_fill(~mask_BHQK, float("-inf"))
    # Max-shifted by hand so empty rows give out 0, lse -inf and finite gradients.
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = torch.einsum("bhqk,bkhd->bqhd", p / l.clamp_min(_TINY), v)
    lse = torch.where(l > 0, m + torch.log(l.clamp_min(_TINY)), torch.full_like(l, float("-inf")))
    return out.to(q_BTHD.dtype), lse[..., 0]


def _check(q, k, v, layout: BlockLayout) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be [B={B}, Tk, Hkv, D={D}]; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16,
                                                              torch.float32):
        raise ValueError(f"q, k, v must share one dtype of fp16/bf16/fp32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {D}")
    G = layout.groups
    if H % Hkv or Hkv % G:
        raise ValueError(f"need H % Hkv == 0 and Hkv % layout.groups == 0; got H={H}, "
                         f"Hkv={Hkv}, G={G}")
    if layout.batch != B:
        raise ValueError(f"layout.batch={layout.batch} but q has batch {B}")
    if Tq != layout.num_q_blocks * layout.q_block:
        raise ValueError(f"Tq={Tq} must equal layout.num_q_blocks * q_block = "
                         f"{layout.num_q_blocks} * {layout.q_block}: pad queries to whole blocks")
    if Tk != layout.num_k_blocks * layout.k_block:
        raise ValueError(f"Tk={Tk} must equal layout.num_k_blocks * k_block = "
                         f"{layout.num_k_blocks} * {layout.k_block}: pad keys to whole blocks")
    for name, blk in (("q_block", layout.q_block), ("k_block", layout.k_block)):
        if blk % 16 and blk > 16:
            raise ValueError(f"layout.{name}={blk}: must be below 16 or a multiple of 16")


def block_span(tile: int, block: int) -> int:
    """Adjacent layout blocks one tile spans: tile // block when the tile is wider than a block
    of >= 16 tokens, else 1 (the tile fits in a block, or pads a block under 16 tokens)."""
    return tile // block if tile > block >= 16 else 1


def _fits(cfg, q_block: int, k_block: int, num_q_blocks: int = 0, num_k_blocks: int = 0
          ) -> bool:
    """cfg's tiles fit the layout blocks. num_q_blocks > 0 (forward, dQ) lets the query tile,
    num_k_blocks > 0 (dK/dV) the key tile, span whole adjacent blocks when their count divides
    the blocks of a row group."""
    bm, bn = cfg[0], cfg[1]
    ok_m = q_block % bm == 0 or (q_block < 16 and bm == 16)
    ok_n = k_block % bn == 0 or (k_block < 16 and bn == 16)
    span_m, span_n = block_span(bm, q_block), block_span(bn, k_block)
    if num_q_blocks and span_m > 1:
        ok_m = bm % q_block == 0 and num_q_blocks % span_m == 0
    if num_k_blocks and span_n > 1:
        ok_n = bn % k_block == 0 and num_k_blocks % span_n == 0
    return ok_m and ok_n


def _configs(kernel: str, plan: KernelPlan, head_dim: int):
    """Fitting candidates of kernel "fwd" / "dq" (query tiles may span blocks) or "dkdv" (key
    tiles may)."""
    nq = plan.num_q_blocks if kernel != "dkdv" else 0
    nk = plan.num_k_blocks if kernel == "dkdv" else 0
    if kernel in _FORCED:
        cfg = _FORCED[kernel]
        if not _fits(cfg, plan.q_block, plan.k_block, nq, nk):
            raise ValueError(f"forced {kernel} tile {cfg} does not fit {plan.q_block}-query / "
                             f"{plan.k_block}-key blocks ({plan.num_q_blocks} x "
                             f"{plan.num_k_blocks})")
        return [cfg]
    if plan.interpret:
        return [c for c in _CPU_CONFIGS if _fits(c, plan.q_block, plan.k_block, nq, nk)][:1]
    table, small_d = _TABLES[kernel]
    if head_dim <= 64:
        table = table + small_d
    small = min(plan.q_block, plan.k_block) < 32
    return [c for c in table if _fits(c, plan.q_block, plan.k_block, nq, nk)
            and (small or min(c[0], c[1]) >= 32)]


def _csr_for(plan: KernelPlan, side: str, tile: int, block: int):
    """(CSR, span) a tile of `tile` rows walks: the plan's own, or a spanning one."""
    span = block_span(tile, block)
    base = plan.fwd if side == "fwd" else plan.bwd
    return (base if span == 1 else spanned_csr(plan, side, span)), span


def _lastdim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _tune_key(name, q, plan: KernelPlan, csr):
    """The problem class a tuned config serves: besides dtype, head dim and blocks, the length
    (log2, capped at 32k) and the CSR's mean entries per non-empty row (log4), the work of one
    program: at 1M tokens rows are ~30x longer than at 32k, and the best tile differs."""
    bucket = min(int(math.log2(max(q.shape[1], 1))), 15)
    return (name, q.dtype, q.shape[-1], plan.q_block, plan.k_block, plan.has_doc, bucket,
            csr.row_bucket)


def _forward(q, k, v, plan: KernelPlan, scale: float):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = plan.groups
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)

    def args(cfg):  # a query tile spanning several layout blocks walks a spanning CSR
        c, span = _csr_for(plan, "fwd", cfg[0], plan.q_block)
        return (q, k, v, out, lse, c.order, c.indptr, c.split, c.blk, c.lo, c.hi,
                plan.q_pos, plan.k_pos, plan.q_doc, plan.k_doc,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                H, Tq, Tk, G, plan.num_q_blocks // span, H // G, H // Hkv, scale * _LOG2E)

    consts = dict(Q_BLOCK=plan.q_block, K_BLOCK=plan.k_block, HEAD_DIM=D, HAS_DOC=plan.has_doc)
    launch_tuned(_k._fwd_kernel, _tune_key("fwd", q, plan, plan.fwd),
                 _configs("fwd", plan, D), _query_grid(B * H, plan), args, consts)
    return out, lse


def _query_grid(heads: int, plan: KernelPlan):
    def grid(cfg):
        span = block_span(cfg[0], plan.q_block)
        return (heads * (plan.num_q_blocks // span) * sub_tiles(plan.q_block, cfg[0]),)
    return grid


def _backward(q, k, v, out, lse, dout, dlse, plan: KernelPlan, scale: float,
              deterministic: bool):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = plan.groups
    delta = torch.empty_like(lse)
    dlse = torch.zeros_like(lse) if dlse is None else dlse.float().contiguous()
    pre = 32 if plan.interpret else 128
    _k._bwd_preprocess[(triton_cdiv(Tq, pre), B * H)](
        out, dout, dlse, delta, *out.stride()[:3], *dout.stride()[:3], H, Tq,
        BLOCK=pre, HEAD_DIM=D)
    # Same strides as q / k / v: the kernels address gradients with their inputs' strides.
    dq = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)
    dk = torch.empty_strided(k.shape, k.stride(), dtype=k.dtype, device=k.device)
    dv = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
    consts = dict(Q_BLOCK=plan.q_block, K_BLOCK=plan.k_block, HEAD_DIM=D, HAS_DOC=plan.has_doc)
    common = (plan.q_pos, plan.k_pos, plan.q_doc, plan.k_doc,
              *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    dq_acc = dq  # read by the dK/dV kernel only when it adds dQ atomically
    if deterministic:
        def dq_args(cfg):
            c, span = _csr_for(plan, "fwd", cfg[0], plan.q_block)
            return (q, k, v, dout, dq, lse, delta, c.order, c.indptr, c.split, c.blk, c.lo,
                    c.hi, *common, H, Tq, Tk, G, plan.num_q_blocks // span, H // G, H // Hkv,
                    scale * _LOG2E, scale)

        launch_tuned(_k._bwd_dq_kernel, _tune_key("dq", q, plan, plan.fwd),
                     _configs("dq", plan, D), _query_grid(B * H, plan), dq_args,
                     consts)
    else:
        dq_acc = torch.empty_strided(q.shape, q.stride(), dtype=torch.float32, device=q.device)

    def grid(cfg):
        span = block_span(cfg[1], plan.k_block)
        return (B * Hkv * (plan.num_k_blocks // span) * sub_tiles(plan.k_block, cfg[1]),)

    def args(cfg):  # a key tile spanning several layout blocks walks a spanning CSR
        t, span = _csr_for(plan, "bwd", cfg[1], plan.k_block)
        return (q, k, v, dout, dk, dv, dq_acc, lse, delta, t.order, t.indptr, t.split, t.blk,
                t.lo, t.hi, *common, H, Tq, Tk, G, plan.num_k_blocks // span, Hkv // G,
                H // Hkv, scale * _LOG2E, scale)

    launch_tuned(_k._bwd_dkdv_kernel,
                 _tune_key("dkdv" if deterministic else "dkdv_atomic_dq", q, plan, plan.bwd),
                 _configs("dkdv", plan, D), grid, args,
                 dict(consts, ATOMIC_DQ=not deterministic),
                 before=None if deterministic else dq_acc.zero_)
    if not deterministic:
        dq.copy_(dq_acc)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, deterministic, given):
        q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
        plan = kernel_plan(layout, q.device)
        # given: (out, lse) of this call's first forward (a checkpoint's recompute)
        out, lse = _forward(q, k, v, plan, scale) if given is None else given
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.deterministic = plan, scale, deterministic
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dout = _lastdim_contig(dout.to(out.dtype))
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.plan, ctx.scale,
                               ctx.deterministic)
        return dq, dk, dv, None, None, None, None
