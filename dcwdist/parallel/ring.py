"""Ring attention over cp shards: K/V go around the cp group, partials merge by LSE (fp32).

Shapes: q_BTHD [B, Tl, H, D] (Tl = T / P local tokens); k_BTKD / v_BTKD [B, Tl, Hkv, D];
out [B, Tl, H, D]; lse [B, H, Tl] fp32.

The ring does not care which tokens a rank holds (zigzag or the document-balanced deal of
balance.py): the step layouts carry global token indices and doc ids, taken through
shard.index(rank). Every rank's K/V visit every rank, so the bytes are the same for any
sharding; the sharding decides how much each rank computes.

At step s rank r holds the K/V of rank src = r - s (mod P) and runs the executor on
`step_layouts[s]` (BlockLayouts: its query blocks x src's key blocks, with global token indices
as positions and global doc ids, so masks are those of the single-process pattern). While step s
computes, the next K/V is already in flight (dist.batch_isend_irecv). Which key blocks a step
reads is the caller's: dense CP builds causal step layouts here; DCW and CAA CP split their
global patterns by source rank (dcw_cp.py, caa_cp.py); ring_attention_multi runs several
independent softmaxes (CAA's local and global branches) on one trip of K/V.

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
from dcwdist.attention.layouts import doc_start
from dcwdist.parallel.comm import ring_shift
from dcwdist.parallel.zigzag import CPShard


def _merge(acc, part):
    o, l = part
    if acc is None:
        return o.float(), l.float()
    return merge_partials([acc, (o.float(), l.float())])


class _RingAttention(torch.autograd.Function):
    """K/V around the ring once for n_out independent softmaxes (outputs stacked on dim 0)."""

    @staticmethod
    def forward(ctx, q, k, v, step_layouts, n_out, shard: CPShard, scale, impl, chunk):
        P = shard.size
        acc = [None] * n_out
        kv = torch.stack([k, v])
        for s in range(P):
            pending = (ring_shift([kv], shard.group, shard.counter, "ring_kv_fwd")
                       if s < P - 1 else None)
            for slot, lay in step_layouts[s]:
                if lay.nnz:
                    acc[slot] = _merge(acc[slot],
                                       attend_layout(q, kv[0], kv[1], lay, scale, impl, chunk))
            if pending is not None:
                kv = pending.wait()[0]
        B, T, H, _ = q.shape
        empty = (q.new_zeros(q.shape, dtype=torch.float32),
                 q.new_full((B, H, T), float("-inf"), dtype=torch.float32))
        out = torch.stack([(a or empty)[0] for a in acc])  # [n_out, B, T, H, D]
        lse = torch.stack([(a or empty)[1] for a in acc])  # [n_out, B, H, T]
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
            for slot, lay in ctx.step_layouts[s]:
                if not lay.nnz:
                    continue
                O, L, dO = out[slot], lse[slot], dout[slot]
                with torch.enable_grad():
                    qq = q.detach().requires_grad_()
                    kk, vv = kv[0].detach().requires_grad_(), kv[1].detach().requires_grad_()
                    o_s, l_s = attend_layout(qq, kk, vv, lay, ctx.scale, ctx.impl, ctx.chunk)
                    ok = torch.isfinite(l_s) & torch.isfinite(L)
                    w = torch.where(ok, torch.exp(l_s.float() - torch.where(ok, L, 0.0)), 0.0)
                    w_T = w.transpose(1, 2)[..., None]  # [B, T, H, 1]
                    g_out = (dO * w_T).to(o_s.dtype)
                    g_lse = w * (((dO * (o_s.float() - O)).sum(-1)).transpose(1, 2) + dlse[slot])
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
                None, None, None, None, None, None)


def ring_bytes(B: int, T: int, P: int, n_kv: int, head_dim: int, elem: int) -> dict:
    """Bytes one rank sends per ring_attention call, K = B * (T / P) * n_kv * head_dim: K/V
    (elem bytes) (P - 1) hops forward and again backward, the fp32 dK/dV accumulator P hops."""
    kv = 2 * B * (T // P) * n_kv * head_dim
    return {"ring_kv_fwd": (P - 1) * kv * elem, "ring_kv_bwd": (P - 1) * kv * elem,
            "ring_dkv_bwd": P * kv * 4}


def ring_attention_multi(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor,
                         outputs: Sequence[Sequence[Sequence[BlockLayout]]], shard: CPShard,
                         softmax_scale: Optional[float] = None, impl: str = "torch",
                         chunk_size: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Several independent softmaxes over one trip of K/V around `shard.group`.

    outputs[i][s]: the layouts of softmax i at ring step s (local queries x keys of rank
    (r - s) mod P). Returns [(out [B, Tl, H, D], lse [B, H, Tl] fp32)] per output, all
    differentiable; bytes are those of one ring_attention (CAA's local and global branches).
    """
    for steps in outputs:
        if len(steps) != shard.size:
            raise ValueError(f"ring_attention needs one layout list per step ({shard.size}), "
                             f"got {len(steps)}")
    scale = q_BTHD.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    step_layouts = [[(i, lay) for i, steps in enumerate(outputs) for lay in steps[s]]
                    for s in range(shard.size)]
    out, lse = _RingAttention.apply(q_BTHD, k_BTKD, v_BTKD, step_layouts, len(outputs), shard,
                                    scale, impl, chunk_size)
    return [(out[i], lse[i]) for i in range(len(outputs))]


def ring_attention(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor,
                   step_layouts: Sequence[Sequence[BlockLayout]], shard: CPShard,
                   softmax_scale: Optional[float] = None, impl: str = "torch",
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over every key the step layouts allow, K/V passed around `shard.group`.

    step_layouts[s]: layouts of (local queries x keys of rank (r - s) mod P); returns
    (out [B, Tl, H, D], lse [B, H, Tl] fp32), both differentiable.
    """
    return ring_attention_multi(q_BTHD, k_BTKD, v_BTKD, [step_layouts], shard, softmax_scale,
                                impl, chunk_size)[0]


def dense_step_layouts(shard: CPShard, block_size: int) -> list[list[BlockLayout]]:
    """Causal, document-aware layouts of every ring step (global token index as position).

    Blocks are gcd(shard.unit, block_size) tokens so each block lies in one contiguous run of the
    sharding. Query block q of row b reads key block k when k can hold a key of q's documents:
    k starts at or before q's last token and ends at or after the start of the document of q's
    first token (FULL when k ends before q starts, CAUSAL otherwise); blocks without a real
    token read and are read by nothing. The token test is the layout's q_doc / k_doc.
    """
    P, r = shard.size, shard.rank
    blk = math.gcd(shard.unit, block_size)
    doc = shard.doc_ids
    B = doc.shape[0]
    q_idx = shard.index()
    nq = q_idx.numel() // blk
    q_first, q_last = q_idx[::blk], q_idx[blk - 1::blk]
    q_from = doc_start(doc)[:, q_first]  # [B, nq] first key q's documents can read
    q_live = (doc[:, q_idx] >= 0).view(B, nq, blk).any(-1)
    out = []
    for s in range(P):
        src = (r - s) % P
        k_idx = shard.index(src)
        k_first, k_last = k_idx[::blk], k_idx[blk - 1::blk]
        k_live = (doc[:, k_idx] >= 0).view(B, -1, blk).any(-1)
        read = ((k_first[None, None, :] <= q_last[None, :, None])
                & (k_last[None, None, :] >= q_from[:, :, None])
                & q_live[:, :, None] & k_live[:, None, :])  # [B, nq, nk]
        rows, cols = read.view(B * nq, -1).nonzero(as_tuple=True)  # row-major: CSR order
        full = k_last[cols] <= q_first[rows % nq]
        mode = torch.where(full, MODE_FULL, MODE_CAUSAL)
        indptr = torch.nn.functional.pad(torch.cumsum(read.view(B * nq, -1).sum(1), 0), (1, 0))
        out.append([BlockLayout(
            indptr=indptr, kv_block=cols.to(torch.int32), mode=mode.to(torch.int8), batch=B,
            groups=1, num_q_blocks=nq, num_k_blocks=k_idx.numel() // blk, q_block=blk,
            k_block=blk, q_pos=q_idx.expand(B, -1), k_pos=k_idx.expand(B, -1),
            q_doc=doc[:, q_idx], k_doc=doc[:, k_idx])])
    return out


def dense_cp_attention(cfg, q_BTHD, k_BTKD, v_BTKD, ctx) -> torch.Tensor:
    """`dense` attention of this rank's shard (ctx.group set): ring over the cp group."""
    shard: CPShard = ctx.cache["cp_shard"]
    key = ("cp_dense_layouts", cfg.block_size)
    hit = ctx.cache.get(key)
    if hit is None or hit[0] is not shard.sharding:
        hit = ctx.cache[key] = (shard.sharding, dense_step_layouts(shard, cfg.block_size))
    out, _ = ring_attention(q_BTHD, k_BTKD, v_BTKD, hit[1], shard, None, cfg.impl,
                            cfg.chunk_size)
    return out
