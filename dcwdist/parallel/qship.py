"""Query shipping: attention over other ranks' keys by sending them the queries, not the K/V.

Shapes: q_BTHD [B, Tl, H, D] this rank's queries (Tl = T / P); k_BTKD / v_BTKD [B, Tl, Hkv, D];
out [B, Tl, H, D]; lse [B, H, Tl] (fp32; fp64 for fp64 inputs). A *row* is one query block
(b, local block) of blk tokens: shipped rows are [N, blk, H, D], their lse [N, blk, H].

The ring (ring.py) brings every rank's whole K/V to every rank, although under DCW only core
rows read the whole document prefix; window and buffer rows read a halo at most. Here rank r
sends every other rank p exactly those of its query blocks that read at least one of p's keys
under the global layouts; p attends them over its local K/V and sends back (out, lse); r merges
them with its own local partial by LSE (merge_rows). Every rank holds the global layouts and the
sharding, so p rebuilds the sub-layout of every incoming row itself (rows_over_source): only
q, out and lse travel, one all_to_all_single each (comm.all_to_all).

Backward (_QShip, the mirrored exchange): dO and dLSE of the returned rows go to the rank that
computed them, which recomputes its served partials and back-propagates (dK/dV stay there); the
served rows' dQ goes back to their owner and is summed into dq (a block shipped to several ranks
gets a dQ from each).

Bytes sent by rank r per call (labels as CommCounter records them). n[r, p] = query blocks of r
(over the batch rows) that read keys of p, p != r (ship_counts); S = blk * H query vectors per
block; b = element size of q; L = max(4, b) bytes per lse value (fp32, fp64 for fp64 inputs):
  qship_q_fwd      sum_p n[r, p] * S * D * b          Q out
  qship_olse_fwd   sum_p n[p, r] * S * (D * b + L)    O + LSE of the rows r served, back
  qship_dolse_bwd  sum_p n[r, p] * S * (D * b + L)    dO + dLSE to the computing ranks
  qship_dq_bwd     sum_p n[p, r] * S * D * b          dQ of the served rows, back to the owners
The ring (ring.ring_bytes), the same on every rank, K = B * Tl * Hkv * D:
  ring_kv_fwd (P - 1) * 2K * b,   ring_kv_bwd (P - 1) * 2K * b,   ring_dkv_bwd P * 2K * 4
parallel.cp_core = "auto" (choose_core) takes qship when the busiest rank's qship fwd + bwd
bytes are below the ring's fwd + bwd (ties: ring). The counts come from the global layouts, so
every rank makes the same choice without communicating. GQA (H >> Hkv) and prefixes read from
every rank favour the ring; many KV heads and rows that stay local favour shipping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.layout import BlockLayout
from dcwdist.parallel.balance import Sharding
from dcwdist.parallel.comm import all_to_all
from dcwdist.parallel.ring import ring_bytes

CORE_MODES = ("auto", "ring", "qship")
_TINY = 1e-30


# -- which rows go where (every rank computes the same from the global layouts) ----------------
def block_hits(layouts: Sequence[BlockLayout], sharding: Sharding,
               chunk: int = 1 << 22) -> torch.Tensor:
    """[B, NQ, P] bool: global query block (b, qb) reads >= 1 key block of rank p in any of the
    layouts (any head group). O(nnz) over the global layouts, in chunks of entries."""
    lay0, P = layouts[0], sharding.size
    B, NQ, dev = lay0.batch, lay0.num_q_blocks, lay0.indptr.device
    hit = torch.zeros(B * NQ * P, dtype=torch.bool, device=dev)
    for lay in layouts:
        if (lay.batch, lay.num_q_blocks, lay.q_block) != (B, NQ, lay0.q_block):
            raise ValueError("query shipping needs layouts over the same query blocks")
        k_owner = sharding.owner(torch.arange(lay.num_k_blocks, device=dev) * lay.k_block)[0]
        for s in range(0, lay.nnz, chunk):
            e = torch.arange(s, min(s + chunk, lay.nnz), device=dev)
            row = torch.searchsorted(lay.indptr, e, right=True) - 1  # (b * G + g) * NQ + qb
            q_row = row // (lay.groups * NQ) * NQ + row % NQ  # b * NQ + qb
            hit[q_row * P + k_owner[lay.kv_block[e].long()]] = True
    return hit.view(B, NQ, P)


def ship_counts(hit_BNP: torch.Tensor, sharding: Sharding, blk: int) -> torch.Tensor:
    """[P, P] int64 n[r, p]: query blocks of rank r that read keys of rank p (diagonal 0)."""
    P, NQ = sharding.size, hit_BNP.shape[1]
    q_owner = sharding.owner(torch.arange(NQ, device=hit_BNP.device) * blk)[0]
    counts = torch.zeros(P, P, dtype=torch.int64, device=hit_BNP.device)
    counts.index_add_(0, q_owner, hit_BNP.sum(0).long())
    return counts.fill_diagonal_(0).cpu()


def qship_bytes(counts: torch.Tensor, rank: int, blk: int, n_heads: int, head_dim: int,
                elem: int) -> dict:
    """Bytes `rank` sends per qship_attention call (module docstring), by CommCounter label."""
    S, L = blk * n_heads, max(4, elem)
    out_rows, in_rows = int(counts[rank].sum()), int(counts[:, rank].sum())
    return {"qship_q_fwd": out_rows * S * head_dim * elem,
            "qship_olse_fwd": in_rows * S * (head_dim * elem + L),
            "qship_dolse_bwd": out_rows * S * (head_dim * elem + L),
            "qship_dq_bwd": in_rows * S * head_dim * elem}


def core_bytes(counts: torch.Tensor, B: int, T: int, blk: int, n_heads: int, n_kv: int,
               head_dim: int, elem: int) -> tuple[dict, list[dict]]:
    """(ring bytes of every rank, [qship bytes of rank r for r in range(P)])."""
    P = counts.shape[0]
    return (ring_bytes(B, T, P, n_kv, head_dim, elem),
            [qship_bytes(counts, r, blk, n_heads, head_dim, elem) for r in range(P)])


def choose_core(mode: str, ring: dict, qship: list[dict]) -> str:
    """parallel.cp_core: "ring" / "qship" as given; "auto" = the fewer fwd + bwd bytes on the
    busiest rank (the ring's are the same on every rank); equal -> ring."""
    if mode not in CORE_MODES:
        raise ValueError(f"parallel.cp_core must be one of {CORE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "qship" if max(sum(b.values()) for b in qship) < sum(ring.values()) else "ring"


def rows_over_source(layout: BlockLayout, b: torch.Tensor, qb: torch.Tensor,
                     sharding: Sharding, src: int) -> BlockLayout:
    """Global query blocks (b[i], qb[i]) of `layout` over the keys rank `src` holds, as one flat
    batch: query block i is row i (per head group, g-major) and key block b * NKl + k is src's
    local block k of batch row b (src's K/V reshaped to [1, B * Tl, Hkv, D])."""
    G, NQ, qblk, kblk, dev = (layout.groups, layout.num_q_blocks, layout.q_block,
                              layout.k_block, layout.indptr.device)
    N = b.numel()
    rows = ((b[None] * G + torch.arange(G, device=dev)[:, None]) * NQ + qb[None]).reshape(-1)
    new_row, entry = layout.row_entries(rows)
    owner, local_tok = sharding.owner(layout.kv_block[entry].long() * kblk)
    mine = owner.to(dev) == src
    new_row, entry = new_row[mine], entry[mine]
    k_idx = sharding.index(src).to(dev)
    NKl = k_idx.numel() // kblk
    kv = b[new_row % N] * NKl + local_tok.to(dev)[mine] // kblk
    tok = (qb[:, None] * qblk + torch.arange(qblk, device=dev)).reshape(-1)
    bt = b.repeat_interleave(qblk)
    q_side = lambda x: None if x is None else x[bt, tok][None]  # noqa: E731
    k_side = lambda x: None if x is None else x[:, k_idx].reshape(1, -1)  # noqa: E731
    return BlockLayout(
        indptr=F.pad(torch.cumsum(torch.bincount(new_row, minlength=G * N), 0), (1, 0)),
        kv_block=kv.to(torch.int32), mode=layout.mode[entry], batch=1, groups=G,
        num_q_blocks=N, num_k_blocks=layout.batch * NKl, q_block=qblk, k_block=kblk,
        q_pos=q_side(layout.q_pos), k_pos=k_side(layout.k_pos), window=layout.window,
        far=layout.far, q_doc=q_side(layout.q_doc), k_doc=k_side(layout.k_doc),
        entry_bound=None if layout.entry_bound is None else layout.entry_bound[entry])


@dataclass
class QShipPlan:
    """This rank's part of query shipping for one softmax over a set of global layouts."""

    block: int
    """Query block (row) size in tokens."""
    counts: torch.Tensor
    """[P, P] int64 n[r, p] (ship_counts): what every rank ships where."""
    local: list
    """This rank's rows over its own keys, flat batch (row b * NQl + local block)."""
    send_rows: torch.Tensor
    """[N_out] int64 local rows shipped (b * NQl + local block), grouped by destination rank."""
    send_splits: list
    """[P] rows shipped to each rank."""
    serve: list
    """Incoming rows (by requester rank, then (b, block)) over this rank's keys, flat batch."""
    recv_splits: list
    """[P] rows received from each rank."""


def qship_plan(layouts: Sequence[BlockLayout], sharding: Sharding, rank: int,
               hit_BNP: Optional[torch.Tensor] = None) -> QShipPlan:
    """Send lists, served sub-layouts and local layouts of `rank` (blocks divide the unit)."""
    blk, P, B = layouts[0].q_block, sharding.size, layouts[0].batch
    if sharding.unit % blk or any(sharding.unit % lay.k_block for lay in layouts):
        raise ValueError(f"layout blocks must divide the cp sharding unit ({sharding.unit})")
    hit = block_hits(layouts, sharding) if hit_BNP is None else hit_BNP
    dev = hit.device
    q_blocks = [sharding.index(p).to(dev)[::blk] // blk for p in range(P)]  # rank p, local order
    NQl = q_blocks[rank].numel()
    none = torch.zeros(0, 2, dtype=torch.long, device=dev)
    # rank r -> p: r's blocks reading p's keys, in (b, local block) order; p computes the same
    to = [hit[:, q_blocks[rank], p].nonzero() if p != rank else none for p in range(P)]
    frm = [hit[:, q_blocks[p], rank].nonzero() if p != rank else none for p in range(P)]
    in_b = torch.cat([nz[:, 0] for nz in frm])
    in_qb = torch.cat([q_blocks[p][nz[:, 1]] for p, nz in enumerate(frm)])
    all_b = torch.arange(B, device=dev).repeat_interleave(NQl)
    return QShipPlan(
        block=blk, counts=ship_counts(hit, sharding, blk),
        local=[rows_over_source(lay, all_b, q_blocks[rank].repeat(B), sharding, rank)
               for lay in layouts],
        send_rows=torch.cat([nz[:, 0] * NQl + nz[:, 1] for nz in to]),
        send_splits=[nz.shape[0] for nz in to],
        serve=[rows_over_source(lay, in_b, in_qb, sharding, rank) for lay in layouts],
        recv_splits=[nz.shape[0] for nz in frm])


# -- compute and exchange -----------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attend_rows(q_NbHD, k_BTKD, v_BTKD, layouts, scale, impl, chunk):
    """Rows [N, blk, H, D] over local K/V with flat-batch layouts -> (out [N, blk, H, D],
    lse [N, blk, H]); their partials over disjoint keys merged."""
    N, blk, H, D = q_NbHD.shape
    if N == 0:
        return q_NbHD.new_zeros(q_NbHD.shape), q_NbHD.new_zeros((0, blk, H),
                                                                dtype=_acc(q_NbHD.dtype))
    q = q_NbHD.reshape(1, N * blk, H, D)
    k, v = (x.reshape(1, -1, *x.shape[2:]) for x in (k_BTKD, v_BTKD))
    out, lse = merge_partials([attend_layout(q, k, v, lay, scale, impl, chunk) for lay in layouts])
    return out.view(N, blk, H, D), lse[0].transpose(0, 1).reshape(N, blk, H)


def merge_rows(o_RbHD, lse_RbH, o_NbHD, lse_NbH, rows_N):
    """One softmax per row: base partials [R, blk, ...] plus extra partials of rows rows_N
    (repeats allowed), merged by LSE with scatter ops (memory O(R + N), not O(P R))."""
    R, acc = o_RbHD.shape[0], lse_RbH.dtype
    tgt = torch.cat([torch.arange(R, device=rows_N.device), rows_N])
    lse = torch.cat([lse_RbH, lse_NbH.to(acc)])
    o = torch.cat([o_RbHD, o_NbHD.to(o_RbHD.dtype)]).to(acc)
    idx = tgt.view(-1, *[1] * (lse.dim() - 1)).expand_as(lse)
    m = torch.full_like(lse_RbH, float("-inf")).scatter_reduce(0, idx, lse.detach(), "amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty rows: w = 0, finite grads
    w = torch.exp(lse - m[tgt])
    total = torch.zeros_like(lse_RbH).index_add(0, tgt, w)
    out = torch.zeros_like(o[:R]).index_add(0, tgt, o * w[..., None])
    out = out / total.clamp_min(_TINY)[..., None]
    lse_out = torch.where(total > 0, m + torch.log(total.clamp_min(_TINY)),
                          torch.full_like(total, float("-inf")))
    return out.to(o_RbHD.dtype), lse_out


def _out(x, plan: QShipPlan, shard, label):
    """Rows from their owners to the ranks whose keys they read (plan.send_rows order)."""
    return all_to_all(x, plan.send_splits, plan.recv_splits, shard.group, shard.counter, label)


def _back(x, plan: QShipPlan, shard, label):
    """Served rows back to their owners (the mirror of _out)."""
    return all_to_all(x, plan.recv_splits, plan.send_splits, shard.group, shard.counter, label)


class _QShip(torch.autograd.Function):
    """Q out, (O, LSE) back; backward: (dO, dLSE) out, dQ back, dK/dV stay where computed."""

    @staticmethod
    def forward(ctx, q, k, v, plan: QShipPlan, shard, scale, impl, chunk):
        H, D = q.shape[2:]
        rows = q.reshape(-1, plan.block, H, D)[plan.send_rows]
        q_in = _out(rows, plan, shard, "qship_q_fwd")
        o_in, lse_in = attend_rows(q_in, k, v, plan.serve, scale, impl, chunk)
        o_back, lse_back = [_back(x, plan, shard, "qship_olse_fwd") for x in (o_in, lse_in)]
        ctx.save_for_backward(q_in, k, v)
        ctx.plan, ctx.shard, ctx.args, ctx.q_shape = plan, shard, (scale, impl, chunk), q.shape
        return o_back, lse_back

    @staticmethod
    def backward(ctx, d_o, d_lse):
        q_in, k, v = ctx.saved_tensors
        plan, shard = ctx.plan, ctx.shard
        g_o, g_lse = [_out(x, plan, shard, "qship_dolse_bwd") for x in (d_o, d_lse)]
        grads = [None, None, None]
        if q_in.shape[0]:  # recompute the served partials (only q, k, v were kept)
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in (q_in, k, v)]
                o, lse = attend_rows(*leaves, plan.serve, *ctx.args)
                grads = list(torch.autograd.grad((o, lse), leaves, (g_o, g_lse),
                                                 allow_unused=True))
        dq_in, dk, dv = (torch.zeros_like(x) if g is None else g
                         for g, x in zip(grads, (q_in, k, v)))
        dq_rows = _back(dq_in, plan, shard, "qship_dq_bwd")
        H, D = ctx.q_shape[2:]
        dq = torch.zeros(ctx.q_shape, dtype=_acc(dq_rows.dtype), device=dq_rows.device)
        dq.view(-1, plan.block, H, D).index_add_(0, plan.send_rows, dq_rows.to(dq.dtype))
        return dq.to(dq_rows.dtype), dk, dv, None, None, None, None, None


def qship_attention(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor,
                    plan: QShipPlan, shard, softmax_scale: Optional[float] = None,
                    impl: str = "torch", chunk_size: int = 1024
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over every key of plan's layouts, other ranks' keys reached by shipping queries.

    shard: the CPShard (group, counter). Returns (out [B, Tl, H, D], lse [B, H, Tl]), both
    differentiable; the same result as ring_attention over split_by_source of the layouts.
    """
    B, Tl, H, D = q_BTHD.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    o_loc, lse_loc = attend_rows(q_BTHD.reshape(-1, plan.block, H, D), k_BTKD, v_BTKD,
                                 plan.local, scale, impl, chunk_size)
    o_back, lse_back = _QShip.apply(q_BTHD, k_BTKD, v_BTKD, plan, shard, scale, impl,
                                    chunk_size)
    out, lse = merge_rows(o_loc, lse_loc, o_back, lse_back, plan.send_rows)
    return out.reshape(B, Tl, H, D), lse.reshape(B, Tl, H).permute(0, 2, 1)
