"""Memory family: hierarchical segment pooling and compressed memory slots.

Shapes: q_BTHD [B, T, H, D] post-RoPE; k_BTKD / v_BTKD [B, T, Hkv, D]; blocks of blk tokens;
pooled units [B, U, C, Hkv, D] (C slots per unit) flattened to compact key sets [B, U*C, Hkv, D].

**Segments.** Each document (starting at a block boundary, as the packer guarantees for block
kinds) is cut into segments of S = `segment_size` tokens counted from its start (S is a multiple
of blk, so a segment is whole blocks; the last one may be short). Query token i of segment s
reads, in ONE softmax over disjoint key sets merged by LSE (`merge_partials`):
  local   keys j <= i of its own segment (compressed_memory with memory_window = w > 0: and
          i - j < w) -- a local layout over the full sequence with segments as its "documents";
  pooled  units of EARLIER segments of its document -- layouts over compact unit sets, whole
          compact key blocks per query block (MODE_FULL, or MODE_WINDOW for the budget).

**hierarchical** (levels l = 1..L, L = hier_levels). Level l pools p_l = segment_pool *
hier_factor**(l-1) tokens into one unit (mean of K, mean of V); units sit in cells of
c_l = max(S, p_l) tokens; both are aligned to the document start (unit u = document tokens
[u p_l, (u+1) p_l)). For a query of segment s (document-relative start t0 = s * S):
    e_0 = t0,   e_l = max(0, floor((e_{l-1} - hier_near * c_l) / c_{l+1}) * c_{l+1})  (l < L),
    e_L = 0,    level l shows exactly its units inside [e_l, e_{l-1}).
So level 1 covers the nearest >= hier_near earlier segments, level 2 the next >= hier_near
cells, ..., level L everything older: fine near, coarse far, every earlier token of the document
counted once (the bands tile [0, t0)). A visible unit ends at or before e_{l-1} <= t0, so all its
tokens are in the past and in earlier segments (and it is complete). Keys per query: <= S local
+ sum_{l<L} (hier_near .. hier_near + c_{l+1}/c_l - 1) cells of c_l / p_l units + e_{L-1} / p_L;
with the defaults (S 512, pools 16 / 128, near 2): <= 512 + 64 + (t0 - 1024) / 128, at 1M
tokens ~8.8k keys (~1/115 of dense); hier_levels=3 (pools 16 / 128 / 1024) makes the far part
t0 / 1024 (+ 8..12 level-2 units).

**compressed_memory.** Each segment becomes M = memory_slots slots: `compressor: mean` -- slot m
is the mean K / V of the segment's tokens [m S/M, (m+1) S/M); `learned` -- slot m pools the whole
segment with softmax_j(<w_m, k_j> / sqrt(D)) over its tokens (attention pooling; w [M, Hkv, D]
learned per layer). A query of segment s reads the slots of segments s' < s of its document,
only the most recent `memory_budget` of them (slot order: segment, then m): older slots are
DROPPED (FIFO), not merged (merging old memory into coarser units is what `hierarchical` does).
In the layout: MODE_WINDOW over slot numbers, q_pos = s*M - 1, k_pos = s'*M + m, window = budget.
The budget bounds what a token reads (<= budget + S keys at any length; KV kept in streaming
inference); a training forward still computes every segment's slots (T*M/S of them).

**Kernel.** Every part is a BlockLayout, so impl=triton runs all of them with the block-sparse
kernel (pooling itself is torch). Compact key blocks: hierarchical -- one cell (c_l / p_l units;
1 unit for levels with p_l >= S, padded into a 16-key tile on GPU); compressed_memory -- one
segment's M slots (use M < 16 or a multiple of 16 for the kernel).

**Context parallel**: dcwdist/parallel/memory_cp.py (ring for the local part, gathered units).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.layout import MODE_FULL, MODE_WINDOW, BlockLayout
from dcwdist.attention.layouts import (ROW_CAUSAL, ROW_WINDOW, doc_position, local_layout,
                                       pad_doc, ranges_to_csr)

_TINY = 1e-30


@dataclass
class PooledSet:
    """One compact key set of pooled units and the layout that reads it."""

    layout: BlockLayout
    """Query blocks x compact slots (unit-major, C slots per unit)."""
    unit_BT: torch.Tensor
    """[B, Tpad] unit of each token (-1: in none); units are contiguous token ranges."""
    num_units: int
    """U."""
    size: int
    """Tokens of a complete unit (only complete units are ever visible)."""
    channels: int
    """C slots per unit: 1 (mean pooling) or memory_slots (learned queries)."""
    name: str
    """Label of the set (CP collective labels)."""


@dataclass
class MemoryPlan:
    """Layouts of one forward, built from the doc ids once and shared by every layer."""

    local: BlockLayout
    """Own segment (causal or windowed) over the full sequence."""
    sets: list
    """PooledSet per level (hierarchical) or the one memory set (compressed_memory)."""


# -- layout pieces --------------------------------------------------------------------------------
def segment_ids(doc: torch.Tensor, S: int) -> torch.Tensor:
    """[B, T] id of each token's segment, distinct between neighbours (-1: padding)."""
    real = doc >= 0
    start = real & (doc_position(doc) % S == 0)
    return torch.where(real, torch.cumsum(start.long(), 1), -1)


def cell_units(doc: torch.Tensor, pool: int, cell: int):
    """Units of `pool` tokens in cells of `cell` tokens, aligned to each document's start.

    Returns (unit [B, T]: cell_index * (cell // pool) + unit within cell, -1 off documents;
    cell index [B, T] of every token; number of cells NC (max over rows)).
    """
    real = doc >= 0
    dpos = doc_position(doc)
    first = real & (dpos % cell == 0)
    cell_idx = torch.cumsum(first.long(), 1) - 1
    unit = torch.where(real, cell_idx * (cell // pool) + (dpos % cell) // pool, -1)
    return unit, cell_idx, max(1, int(first.sum(1).max()))


def unit_stats(unit_BT: torch.Tensor, U: int, doc: Optional[torch.Tensor] = None):
    """(first token [B, U], token count [B, U], document [B, U] or None) of every unit."""
    B, T = unit_BT.shape
    idx = torch.where(unit_BT >= 0, unit_BT, U)
    t = torch.arange(T, device=unit_BT.device).expand(B, T)
    count = torch.zeros(B, U + 1, dtype=torch.long, device=idx.device).scatter_add_(
        1, idx, (unit_BT >= 0).long())
    first = torch.full((B, U + 1), T, dtype=torch.long, device=idx.device).scatter_reduce_(
        1, idx, t, "amin")
    udoc = None
    if doc is not None:
        udoc = torch.full((B, U + 1), -1, dtype=torch.long, device=idx.device).scatter_reduce_(
            1, idx, doc, "amax")[:, :U]
    return first[:, :U], count[:, :U], udoc


def _query_blocks(doc: torch.Tensor, blk: int, S: int):
    """Per query block: (document-relative segment s, its document's first token, has a real
    token), each [B, NQ]."""
    B, T = doc.shape
    NQ = T // blk
    first = torch.arange(NQ, device=doc.device) * blk
    dpos = doc_position(doc)[:, first]
    live = (doc.view(B, NQ, blk) >= 0).any(-1)
    return dpos // S, first - dpos, live


def _compact_layout(doc, lo, hi, live, mode, U, C, kb, k_pos, k_doc, q_pos, window=0):
    """Rows [B, NQ] reading compact key blocks lo..hi (kb slots each) of a U*C slot set."""
    B, NQ = lo.shape
    hi = torch.where(live, hi, lo - 1)  # blocks without a real token read nothing
    indptr, kv, _ = ranges_to_csr(lo.reshape(-1), hi.reshape(-1))
    return BlockLayout(indptr=indptr, kv_block=kv.to(torch.int32),
                       mode=torch.full_like(kv, mode, dtype=torch.int8), batch=B, groups=1,
                       num_q_blocks=NQ, num_k_blocks=U * C // kb, q_block=doc.shape[1] // NQ,
                       k_block=kb, q_pos=q_pos, k_pos=k_pos, window=window, q_doc=doc,
                       k_doc=k_doc)


def hier_pools(cfg: AttentionConfig) -> list[tuple[int, int]]:
    """(pool p_l, cell c_l) of every level."""
    pools = [cfg.segment_pool * cfg.hier_factor ** i for i in range(cfg.hier_levels)]
    return [(p, max(cfg.segment_size, p)) for p in pools]


def hierarchical_plan(cfg: AttentionConfig, doc_BT: torch.Tensor) -> MemoryPlan:
    blk, S = cfg.block_size, cfg.segment_size
    doc = pad_doc(doc_BT, blk)
    B, T = doc.shape
    local = local_layout(segment_ids(doc, S), blk)  # segment ids as "documents"
    s, start, live = _query_blocks(doc, blk, S)
    levels = hier_pools(cfg)
    bounds = [s * S]  # e_0 .. e_L per query block
    for i, (_, c) in enumerate(levels[:-1]):
        x = bounds[-1] - cfg.hier_near * c
        nxt = levels[i + 1][1]
        bounds.append(torch.where(x > 0, torch.div(x, nxt, rounding_mode="floor") * nxt, 0))
    bounds.append(torch.zeros_like(s))
    pos = torch.arange(T, device=doc.device).expand(B, T)
    sets = []
    for i, (p, c) in enumerate(levels):
        unit, cell_idx, NC = cell_units(doc, p, c)
        kb = c // p
        U = NC * kb
        first, count, udoc = unit_stats(unit, U, doc)
        k_doc = torch.where(count == p, udoc, -1)
        base = cell_idx.gather(1, start)  # the document's first cell
        lo, hi = base + bounds[i + 1] // c, base + bounds[i] // c - 1
        lay = _compact_layout(doc, lo, hi, live, MODE_FULL, U, 1, kb, first.clamp_max(T - 1),
                              k_doc, pos)
        sets.append(PooledSet(lay, unit, U, p, 1, f"hier{i + 1}"))
    return MemoryPlan(local, sets)


def memory_plan(cfg: AttentionConfig, doc_BT: torch.Tensor) -> MemoryPlan:
    blk, S, M = cfg.block_size, cfg.segment_size, cfg.memory_slots
    doc = pad_doc(doc_BT, blk)
    seg = segment_ids(doc, S)
    if cfg.memory_window > 0:
        local = local_layout(seg, blk, torch.full_like(seg[:, ::blk], ROW_WINDOW),
                             cfg.memory_window)
    else:
        local = local_layout(seg, blk, torch.full_like(seg[:, ::blk], ROW_CAUSAL))
    learned = cfg.compressor == "learned"
    size, C = (S, M) if learned else (S // M, 1)
    unit, cell_idx, NC = cell_units(doc, size, S)
    U = NC * M // C
    first, count, udoc = unit_stats(unit, U, doc)
    dpos = doc_position(doc)
    seg_of_unit = dpos.gather(1, first.clamp_max(doc.shape[1] - 1)) // S  # [B, U]
    m_of_slot = torch.arange(U * C, device=doc.device) % M
    k_pos = seg_of_unit.repeat_interleave(C, 1) * M + m_of_slot
    k_doc = torch.where(count == size, udoc, -1).repeat_interleave(C, 1)
    s, start, live = _query_blocks(doc, blk, S)
    base = cell_idx.gather(1, start)
    keep = -(-cfg.memory_budget // M)  # segments that can hold a kept slot
    lo, hi = base + (s - keep).clamp_min(0), base + s - 1
    q_pos = (dpos // S) * M - 1
    lay = _compact_layout(doc, lo, hi, live, MODE_WINDOW, U, C, M, k_pos, k_doc, q_pos,
                          window=cfg.memory_budget)
    return MemoryPlan(local, [PooledSet(lay, unit, U, size, C, "memory")])


# -- pooling --------------------------------------------------------------------------------------
def pool_units(x_BTKE: torch.Tensor, unit_BT: torch.Tensor, U: int, size: int,
               queries_CKD: Optional[torch.Tensor] = None):
    """Pool each unit's tokens: (avg [B, U, C, K, E] in x's dtype, lse [B, U, C, K] fp32+).

    Units are contiguous ranges of at most `size` tokens. queries None: mean (C = 1, equal
    weights, lse = log count); else weights softmax_j(<w_c, k_j> / sqrt(D)) with k_j the first
    D features of x_j. lse lets partial pools of one unit (CP: the unit's tokens on several
    ranks) merge exactly; empty units give avg 0, lse -inf.
    """
    B, T, K, E = x_BTKE.shape
    acc = torch.promote_types(x_BTKE.dtype, torch.float32)
    first, count, _ = unit_stats(unit_BT, U)
    j = torch.arange(size, device=x_BTKE.device)
    tok = (first[:, :, None] + j).clamp_max(T - 1)  # [B, U, L]
    ok = j < count[:, :, None]
    bi = torch.arange(B, device=x_BTKE.device)[:, None, None]
    xg = x_BTKE[bi, tok].to(acc)  # [B, U, L, K, E]
    if queries_CKD is None:
        logits = xg.new_zeros(B, U, size, 1, K)
    else:
        D = queries_CKD.shape[-1]
        logits = torch.einsum("bulkd,ckd->bulck", xg[..., :D], queries_CKD.to(acc)) * D ** -0.5
    logits = logits.masked_fill(~ok[..., None, None], float("-inf"))
    m = logits.detach().amax(2, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(logits - m)  # [B, U, L, C, K]
    l = w.sum(2)
    avg = torch.einsum("bulck,bulke->bucke", w, xg) / l.clamp_min(_TINY)[..., None]
    lse = torch.where(l > 0, m[:, :, 0] + torch.log(l.clamp_min(_TINY)),
                      torch.full_like(l, float("-inf")))
    return avg.to(x_BTKE.dtype), lse


# -- modules --------------------------------------------------------------------------------------
class _SegmentMemory(nn.Module):
    """Own segment + pooled earlier segments, one softmax; subclasses say how they pool."""

    cp_supported = True
    build_plan = None  # staticmethod (cfg, doc_ids) -> MemoryPlan

    def __init__(self, cfg: AttentionConfig, layer_idx: int, n_heads: int, n_kv_heads: int,
                 head_dim: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def queries(self) -> Optional[torch.Tensor]:
        """Learned pooling queries [C, Hkv, D], or None for mean pooling."""
        return None

    @classmethod
    def plan(cls, cfg: AttentionConfig, ctx: AttnContext, doc_ids=None) -> MemoryPlan:
        """The forward's plan from ctx.cache (built by the first layer)."""
        key = (cfg.kind + "_plan", cfg.block_size, cfg.segment_size, cfg.segment_pool,
               cfg.hier_levels, cfg.hier_factor, cfg.hier_near, cfg.memory_slots,
               cfg.compressor, cfg.memory_budget, cfg.memory_window)
        if key not in ctx.cache:
            ctx.cache[key] = cls.build_plan(cfg, ctx.doc_ids if doc_ids is None else doc_ids)
        return ctx.cache[key]

    @classmethod
    def flop_layouts(cls, cfg: AttentionConfig, ctx: AttnContext) -> dict:
        """Own-segment keys ("local") and pooled units ("cross"); pooling FLOPs not counted."""
        plan = cls.plan(cfg, ctx)
        return {"local": [plan.local], "cross": [s.layout for s in plan.sets]}

    def forward(self, q_BTHD, k_BTKD, v_BTKD, ctx: AttnContext):
        if ctx.group is not None:  # context parallel: this rank's shard
            from dcwdist.parallel.memory_cp import memory_cp_attention
            return memory_cp_attention(self, q_BTHD, k_BTKD, v_BTKD, ctx)
        cfg, plan = self.cfg, self.plan(self.cfg, ctx)
        T, D = q_BTHD.shape[1], q_BTHD.shape[3]

        def run(k, v, lay):
            return attend_layout(q_BTHD, k, v, lay, None, cfg.impl, cfg.chunk_size)
        parts = [run(k_BTKD, v_BTKD, plan.local)]
        x = torch.cat([k_BTKD, v_BTKD], -1)  # [B, T, Hkv, 2D]: K and V pooled alike
        for s in plan.sets:
            avg, _ = pool_units(x, s.unit_BT[:, :T], s.num_units, s.size, self.queries())
            kv = avg.flatten(1, 2)  # [B, U*C, Hkv, 2D]
            parts.append(run(kv[..., :D], kv[..., D:], s.layout))
        out, _ = merge_partials(parts)
        return out


class HierarchicalAttention(_SegmentMemory):
    """Own segment causally + a pyramid of mean-pooled earlier segments (see module docstring)."""

    build_plan = staticmethod(hierarchical_plan)


class CompressedMemoryAttention(_SegmentMemory):
    """Own segment causally + memory_slots slots per earlier segment, FIFO within a budget."""

    build_plan = staticmethod(memory_plan)

    def __init__(self, cfg: AttentionConfig, layer_idx: int, n_heads: int, n_kv_heads: int,
                 head_dim: int):
        super().__init__(cfg, layer_idx, n_heads, n_kv_heads, head_dim)
        if cfg.compressor == "learned":
            # Stored flat (1-D): Transformer.reset_parameters re-draws every >= 2-D weight at
            # init_std (0.02), which would make all slots of a segment near-identical.
            self.slot_queries = nn.Parameter(
                torch.randn(cfg.memory_slots * n_kv_heads * head_dim))

    def queries(self):
        if self.cfg.compressor != "learned":
            return None
        return self.slot_queries.view(self.cfg.memory_slots, self.n_kv_heads, self.head_dim)


KINDS: dict = {"hierarchical": HierarchicalAttention,
               "compressed_memory": CompressedMemoryAttention}
"""attention.kind -> module class, merged into kinds.ATTENTION_KINDS."""
