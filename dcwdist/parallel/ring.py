"""Ring attention over zigzag shards: K/V go around the cp group, partials merge by LSE (fp32).

Shapes: q_BTHD [B, Tl, H, D] (Tl = T / P local tokens); k_BTKD / v_BTKD [B, Tl, Hkv, D];
out [B, Tl, H, D]; lse [B, H, Tl] fp32.

At step s rank r holds the K/V of rank src = r - s (mod P) and runs the executor on
`step_layouts[s]` (BlockLayouts: its query blocks x src's key blocks, with global token indices
as positions and global doc ids, so masks are those of the single-process pattern). While step s
computes, the next K/V is already in flight (dist.batch_isend_irecv). Which key blocks a step
reads is the caller's: dense CP builds causal step layouts here; DCW CP splits its global
pattern by source rank (dcw_cp.py).

Backward: K/V go around the ring again with an fp32 dK/dV accumulator riding beside them; each
step recomputes its partial (out_s, lse_s) and back-propagates the merged output's gradient
through it: with w_s = exp(lse_s - lse), d out_s = w_s dO and d lse_s = w_s (dO . (out_s - O)
+ d lse). After P hops each accumulator is back at its owner. The per-step math is
attend_layout(impl=...) -- the torch reference or the Triton kernel, which share (out, lse).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.layout import MODE_CAUSAL, MODE_FULL, BlockLayout
from dcwdist.parallel.comm import ring_shift
from dcwdist.parallel.zigzag import CPShard


def _merge(acc, part):
    o, l = part
    if acc is None:
        return o.float(), l.float()
    return merge_partials([acc, (o.float(), l.float())])


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, step_layouts, shard: CPShard, scale, impl, chunk):
        P = shard.size
        acc = None
        kv = torch.stack([k, v])
        for s in range(P):
            pending = (ring_shift([kv], shard.group, shard.counter, "ring_kv_fwd")
                       if s < P - 1 else None)
            for lay in step_layouts[s]:
                if lay.nnz:
                    acc = _merge(acc, attend_layout(q, kv[0], kv[1], lay, scale, impl, chunk))
            if pending is not None:
                kv = pending.wait()[0]
        if acc is None:
            B, T, H, _ = q.shape
            acc = (q.new_zeros(q.shape, dtype=torch.float32),
                   q.new_full((B, H, T), float("-inf"), dtype=torch.float32))
        out, lse = acc
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.step_layouts, ctx.shard, ctx.scale, ctx.impl, ctx.chunk = (step_layouts, shard, scale,
                                                                       impl, chunk)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        shard, P = ctx.shard, ctx.shard.size
        dout = dout.float()
        dlse = torch.zeros_like(lse) if dlse is None else dlse.float()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        pending_acc = None
        for s in range(P):
            pending_kv = (ring_shift([kv], shard.group, shard.counter, "ring_kv_bwd")
                          if s < P - 1 else None)
            dkv = torch.zeros_like(kv, dtype=torch.float32)
            for lay in ctx.step_layouts[s]:
                if not lay.nnz:
                    continue
                with torch.enable_grad():
                    qq = q.detach().requires_grad_()
                    kk, vv = kv[0].detach().requires_grad_(), kv[1].detach().requires_grad_()
                    o_s, l_s = attend_layout(qq, kk, vv, lay, ctx.scale, ctx.impl, ctx.chunk)
                    ok = torch.isfinite(l_s) & torch.isfinite(lse)
                    w = torch.where(ok, torch.exp(l_s.float() - torch.where(ok, lse, 0.0)), 0.0)
                    w_T = w.transpose(1, 2)[..., None]  # [B, T, H, 1]
                    g_out = (dout * w_T).to(o_s.dtype)
                    g_lse = w * (((dout * (o_s.float() - out)).sum(-1)).transpose(1, 2) + dlse)
                    gq, gk, gv = torch.autograd.grad((o_s, l_s), (qq, kk, vv), (g_out, g_lse),
                                                     allow_unused=True)
                for acc, g in ((dq, gq), (dkv[0], gk), (dkv[1], gv)):
                    if g is not None:
                        acc += g.float()
            if pending_acc is not None:
                dkv += pending_acc.wait()[0]
            pending_acc = ring_shift([dkv], shard.group, shard.counter, "ring_dkv_bwd")
            if pending_kv is not None:
                kv = pending_kv.wait()[0]
        dkv = pending_acc.wait()[0]
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype),
                None, None, None, None, None)


def ring_attention(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor,
                   step_layouts: Sequence[Sequence[BlockLayout]], shard: CPShard,
                   softmax_scale: Optional[float] = None, impl: str = "torch",
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over every key the step layouts allow, K/V passed around `shard.group`.

    step_layouts[s]: layouts of (local queries x keys of rank (r - s) mod P); returns
    (out [B, Tl, H, D], lse [B, H, Tl] fp32), both differentiable.
    """
    if len(step_layouts) != shard.size:
        raise ValueError(f"ring_attention needs one layout list per step ({shard.size}), "
                         f"got {len(step_layouts)}")
    scale = q_BTHD.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _RingAttention.apply(q_BTHD, k_BTKD, v_BTKD, list(step_layouts), shard, scale, impl,
                                chunk_size)


def dense_step_layouts(shard: CPShard, block_size: int) -> list[list[BlockLayout]]:
    """Causal, document-aware layouts of every ring step (global token index as position).

    Blocks are gcd(chunk, block_size) tokens so each zigzag chunk is whole blocks; a key block
    is read when it can hold a key at or before the query block's last token (FULL when all of
    it is, CAUSAL on the diagonal); the document test is the layout's q_doc / k_doc.
    """
    P, r, C = shard.size, shard.rank, shard.chunk
    blk = math.gcd(C, block_size)
    B = shard.doc_ids.shape[0]
    q_idx = shard.index()
    nq = q_idx.numel() // blk
    q_first, q_last = q_idx[::blk], q_idx[blk - 1::blk]
    out = []
    for s in range(P):
        src = (r - s) % P
        k_idx = shard.index(src)
        k_first, k_last = k_idx[::blk], k_idx[blk - 1::blk]
        read = k_first[None, :] <= q_last[:, None]  # [nq, nk]
        full = k_last[None, :] <= q_first[:, None]
        rows, cols = read.nonzero(as_tuple=True)  # row-major: CSR order
        mode = torch.where(full[rows, cols], MODE_FULL, MODE_CAUSAL)
        counts = read.sum(1).repeat(B)
        indptr = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
        out.append([BlockLayout(
            indptr=indptr, kv_block=cols.to(torch.int32).repeat(B),
            mode=mode.to(torch.int8).repeat(B), batch=B, groups=1, num_q_blocks=nq,
            num_k_blocks=nq, q_block=blk, k_block=blk,
            q_pos=q_idx.expand(B, -1), k_pos=k_idx.expand(B, -1),
            q_doc=shard.doc_ids[:, q_idx], k_doc=shard.doc_ids[:, k_idx])])
    return out


def dense_cp_attention(cfg, q_BTHD, k_BTKD, v_BTKD, ctx) -> torch.Tensor:
    """`dense` attention of the local zigzag shard (ctx.group set): ring over the cp group."""
    shard: CPShard = ctx.cache["cp_shard"]
    key = ("cp_dense_layouts", cfg.block_size)
    if key not in ctx.cache:
        ctx.cache[key] = dense_step_layouts(shard, cfg.block_size)
    out, _ = ring_attention(q_BTHD, k_BTKD, v_BTKD, ctx.cache[key], shard, None, cfg.impl,
                            cfg.chunk_size)
    return out
