"""Window family: per-layer windows, multi-window heads, LongLoRA S²-Attn, BigBird random + global.

Shapes: q_BTHD [B, T, H, D] post-RoPE; k_BTKD / v_BTKD [B, T, Hkv, D]; blocks of blk tokens,
NQ = T / blk. For query token i, keys j <= i of the same document (p = position in the document):

  window         i - j < w_l, the window of layer l (`layer_window`: window_schedule[l], or
                 window_growth from `window` at layer 0 to `window_max` at the last layer)
  multi_window   kv-head group g of len(head_windows) equal groups (and the query heads that read
                 it): i - j < head_windows[g] (seed 004's hierarchical window; o_proj mixes groups)
  s2attn         heads [0, H/2): same group of s2_group tokens, p // s2_group; heads [H/2, H): same
                 shifted group, (p + s2_group/2) // s2_group (LongLoRA; the first group is half)
  random_global  i - j < w_l, or j in one of `random_blocks` whole key blocks drawn before block(i)'s
                 window and after the global blocks, or p(j) < num_global (BigBird, causal): three
                 disjoint key sets in one softmax (LSE merge). A global query sees its whole prefix
                 already: every earlier key of a global token is global.

Every kind is a *plan*: per head group (equal split of the kv heads), layouts over the full key
sequence plus (layout, gather index) pairs over compact key sets. Plans are built once per
forward from doc ids (ctx.cache) and run by attend_layout (impl torch | triton); under context
parallelism the same global plan becomes ring steps (parallel/windows_cp.py). The random draw is a
function of (random_seed, layer, block index within the document) only: every step, CP rank and
packing of a document draws the same blocks for a layer, and packed rows equal documents alone.

`KINDS` registers "window" too: this per-layer-capable, CP-capable class supersedes
kinds.WindowAttention (same pattern when window_schedule / window_growth are unset).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.kinds import AttentionKind
from dcwdist.attention.layout import MODE_CAUSAL, MODE_FULL, MODE_WINDOW, BlockLayout
from dcwdist.attention.layouts import (ROW_WINDOW, compact_far_layout, doc_position, doc_start,
                                       local_layout, pad_doc, ranges_to_csr)
from dcwdist.attention.reference import chunked_local_attention

PER_LAYER_KINDS = ("window", "random_global")
"""Kinds whose `window` follows window_schedule / window_growth."""


# -- per-layer windows --------------------------------------------------------------------------
def layer_window(cfg: AttentionConfig, layer_idx: int, n_layers: Optional[int] = None) -> int:
    """The window of layer `layer_idx` (0-based) of a model with `n_layers` layers.

    window_schedule[l] when given; else window_growth: linear w + (w_max - w) * l / (L - 1) or
    geometric w * (w_max / w) ** (l / (L - 1)), rounded; `none`: `window` for every layer.
    """
    sched = cfg.window_schedule
    if sched:
        if n_layers is not None and len(sched) != n_layers:
            raise ValueError(f"attention.window_schedule has {len(sched)} entries but the model "
                             f"has {n_layers} layers")
        if layer_idx >= len(sched):
            raise ValueError(f"attention.window_schedule has {len(sched)} entries: no window "
                             f"for layer {layer_idx}")
        return int(sched[layer_idx])
    if cfg.window_growth == "none" or layer_idx == 0:
        return cfg.window
    if n_layers is None:
        raise ValueError("attention.window_growth needs the model depth: "
                         "build_attention(..., n_layers=N)")
    f = layer_idx / max(1, n_layers - 1)
    w, w_max = cfg.window, cfg.window_max
    grown = w + (w_max - w) * f if cfg.window_growth == "linear" else w * (w_max / w) ** f
    return int(round(grown))


# -- layouts ------------------------------------------------------------------------------------
def _bounds(doc_BT: torch.Tensor, blk: int):
    """Padded doc ids, query block index [NQ], document start token [B, NQ], live [B, NQ]."""
    doc = pad_doc(doc_BT, blk)
    B, T = doc.shape
    NQ = T // blk
    start = doc_start(doc)[:, ::blk]
    live = (doc.view(B, NQ, blk) >= 0).any(-1)
    return doc, torch.arange(NQ, device=doc.device), start, live


def _layout(doc, blk, indptr, kv, mode, window=0) -> BlockLayout:
    B, T = doc.shape
    pos = torch.arange(T, device=doc.device).expand(B, T)
    return BlockLayout(indptr=indptr, kv_block=kv.to(torch.int32), mode=mode.to(torch.int8),
                       batch=B, groups=1, num_q_blocks=T // blk, num_k_blocks=T // blk,
                       q_block=blk, k_block=blk, q_pos=pos, k_pos=pos, window=window,
                       q_doc=doc, k_doc=doc)


def check_block_aligned(doc_BT: torch.Tensor, blk: int, kind: str) -> None:
    """Block patterns need every document to start at a block boundary (the packer does it)."""
    new = doc_BT >= 0
    new[:, 1:] &= doc_BT[:, 1:] != doc_BT[:, :-1]
    off = torch.arange(doc_BT.shape[1], device=doc_BT.device) % blk != 0
    if bool((new & off).any()):
        t = int((new & off).nonzero()[0, 1])
        raise ValueError(f"attention.kind={kind} needs documents starting at block boundaries "
                         f"(block_size={blk}); a document starts at token {t}")


def window_layout(doc_BT: torch.Tensor, blk: int, window: int) -> BlockLayout:
    rows = torch.full_like(pad_doc(doc_BT, blk)[:, ::blk], ROW_WINDOW)
    return local_layout(doc_BT, blk, rows, window)


def group_layout(doc_BT: torch.Tensor, blk: int, group: int, shift: int) -> BlockLayout:
    """Causal attention inside groups of `group` tokens that start at document positions
    m * group - shift (shift 0: plain groups; group / 2: S²-Attn's shifted half). group and shift
    are multiples of blk and documents start at block boundaries, so groups are whole blocks."""
    doc, qb, start, live = _bounds(doc_BT, blk)
    rel = qb * blk - start  # document position of each block's first token
    lo_tok = start + ((rel + shift) // group * group - shift).clamp_min(0)
    hi = torch.where(live, qb, -1)
    indptr, kv, rows = ranges_to_csr((lo_tok // blk).reshape(-1), hi.reshape(-1))
    mode = torch.where(kv == rows % qb.numel(), MODE_CAUSAL, MODE_FULL)
    return _layout(doc, blk, indptr, kv, mode)


_STRIPE = 256


def _uniform_rows(seed: int, layer_idx: int, rows: int, r: int) -> torch.Tensor:
    """[rows, r] fp64 uniforms; stripes of 256 rows come from generators seeded by (seed, layer,
    stripe), so row i is the same whatever `rows` is asked for."""
    parts = []
    for s in range(-(-rows // _STRIPE)):
        g = torch.Generator().manual_seed(((seed * 1_000_003 + layer_idx) * 1_000_003 + s) % 2**63)
        parts.append(torch.rand(_STRIPE, r, generator=g, dtype=torch.float64))
    return torch.cat(parts)[:rows] if parts else torch.zeros(0, r, dtype=torch.float64)


def random_block_offsets(seed: int, layer_idx: int, rel_BN: torch.Tensor, n_BN: torch.Tensor,
                         r: int) -> torch.Tensor:
    """[B, NQ, r] sorted distinct offsets in [0, n) (-1: unused) for query blocks with document
    block index rel and n candidate blocks: all of them when n <= r, else one uniform draw in each
    of r equal strata of [0, n) (O(NQ * r), never NQ^2)."""
    k = torch.arange(r, device=n_BN.device)
    if r == 0 or rel_BN.numel() == 0:
        return torch.zeros(*n_BN.shape, r, dtype=torch.long, device=n_BN.device)
    u = _uniform_rows(seed, layer_idx, int(rel_BN.max()) + 1, r).to(n_BN.device)[rel_BN]
    n = n_BN[..., None]
    lo, hi = k * n // r, (k + 1) * n // r
    pick = torch.minimum(lo + (u * (hi - lo)).long(), hi - 1)
    return torch.where(n >= r, pick, torch.where(k < n, k, -1))


def random_window_layout(doc_BT: torch.Tensor, blk: int, window: int, num_global: int,
                         num_random: int, seed: int, layer_idx: int) -> BlockLayout:
    """Window blocks (MODE_WINDOW) plus `num_random` random FULL blocks per query block, drawn from
    its document's blocks after the global ones (ceil(num_global / blk)) and before the first block
    its window touches, so the random, window and global key sets are disjoint."""
    doc, qb, start, live = _bounds(doc_BT, blk)
    NQ = qb.numel()
    first = start // blk
    lo_w = torch.maximum(start, qb * blk - window + 1) // blk  # first block of the window
    skip = -(-num_global // blk)
    n = (lo_w - first - skip).clamp_min(0)
    off = random_block_offsets(seed, layer_idx, qb - first, n, num_random)
    rand = torch.where(off >= 0, (first + skip)[..., None] + off, NQ)
    span = (window - 1 + blk - 1) // blk + 1  # most blocks a window row reads
    win = qb[:, None] - torch.arange(span - 1, -1, -1, device=qb.device)  # [NQ, span] ascending
    win = torch.where(win >= lo_w[..., None], win, NQ)
    cand = torch.cat([rand, win], -1)  # [B, NQ, r + span], in block order; NQ: no entry
    mode = torch.cat([torch.full_like(rand, MODE_FULL), torch.full_like(win, MODE_WINDOW)], -1)
    valid = (cand < NQ) & live[..., None]
    indptr = F.pad(torch.cumsum(valid.sum(-1).reshape(-1), 0), (1, 0))
    return _layout(doc, blk, indptr, cand[valid], mode[valid], window)


def embed_group(layout: BlockLayout, g: int, G: int) -> BlockLayout:
    """A groups=1 layout as group g of a G-group layout whose other groups read nothing: the
    FLOP counter's view of a kind that runs H / G heads per layout."""
    B, NQ = layout.batch, layout.num_q_blocks
    counts = torch.zeros(B, G, NQ, dtype=torch.int64, device=layout.indptr.device)
    counts[:, g] = (layout.indptr[1:] - layout.indptr[:-1]).view(B, NQ)
    return dataclasses.replace(layout, indptr=F.pad(torch.cumsum(counts.view(-1), 0), (1, 0)),
                               groups=G)


# -- plans and their execution ------------------------------------------------------------------
@dataclass
class HeadGroupPlan:
    """The layouts of one head group: one softmax over their disjoint key sets."""

    seq: list
    """BlockLayouts over the full key sequence."""
    compact: list = field(default_factory=list)
    """(BlockLayout, gather index [B, S]) over compact key sets gathered from the sequence."""


def _run_group(cfg: AttentionConfig, hg: HeadGroupPlan, q, k, v):
    run = lambda kk, vv, lay: attend_layout(q, kk, vv, lay, None, cfg.impl, cfg.chunk_size)  # noqa: E731
    parts = [run(k, v, lay) for lay in hg.seq]
    bi = torch.arange(q.shape[0], device=q.device)[:, None]
    parts += [run(k[bi, idx], v[bi, idx], lay) for lay, idx in hg.compact]
    return parts[0][0] if len(parts) == 1 else merge_partials(parts)[0]


class _WindowFamily(AttentionKind):
    """Shared forward: build (or fetch) the plan, split the heads, run each group."""

    @property
    def n_layers(self) -> Optional[int]:
        return self.__dict__.get("_n_layers")

    @n_layers.setter
    def n_layers(self, n: Optional[int]) -> None:  # build_attention sets the model depth
        self.__dict__["_n_layers"] = n
        if type(self).kind in PER_LAYER_KINDS:
            layer_window(self.cfg, self.layer_idx, n)  # a bad schedule fails at build time

    @property
    def window(self) -> int:
        """This layer's window."""
        return layer_window(self.cfg, self.layer_idx, self.n_layers)

    def plan_key(self) -> tuple:
        return type(self).plan_key_of(self.cfg, self.layer_idx, self.window)

    def forward(self, q_BTHD, k_BTKD, v_BTKD, ctx: AttnContext):
        cfg, T = self.cfg, q_BTHD.shape[1]
        if ctx.group is not None:
            from dcwdist.parallel.windows_cp import windows_cp_attention
            return windows_cp_attention(self, q_BTHD, k_BTKD, v_BTKD, ctx)
        blk = cfg.block_size
        key = ("windows",) + self.plan_key() + (blk,)
        if key not in ctx.cache:
            ctx.cache[key] = self.plan(cfg, ctx.doc_ids, blk, self.layer_idx, self.window)
        q, k, v = q_BTHD, k_BTKD, v_BTKD
        if T % blk:  # the kernel needs whole blocks
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, (-T) % blk)) for x in (q, k, v))
        out = self.run_heads(ctx.cache[key], q, k, v, lambda hg, *x: _run_group(cfg, hg, *x))
        return out[:, :T]

    def run_heads(self, plan: list, q, k, v, run_group):
        """Head group g: query heads [g H/n, (g+1) H/n), kv heads [g Hkv/n, (g+1) Hkv/n)."""
        n, H, Hkv = len(plan), q.shape[2], k.shape[2]
        if Hkv % n:
            raise ValueError(f"attention.kind={self.cfg.kind}: n_kv_heads={Hkv} does not split "
                             f"into {n} head groups")
        hq, hk = H // n, Hkv // n
        outs = [run_group(hg, q[:, :, g * hq:(g + 1) * hq], k[:, :, g * hk:(g + 1) * hk],
                          v[:, :, g * hk:(g + 1) * hk]) for g, hg in enumerate(plan)]
        return outs[0] if n == 1 else torch.cat(outs, 2)

    @classmethod
    def flop_layouts(cls, cfg: AttentionConfig, ctx: AttnContext) -> dict:
        """Layer 0's layouts (the other layers differ only in their window / random draw: pass
        a cfg with that layer's window for them); head groups embedded as layout groups."""
        plan = cls.plan(cfg, ctx.doc_ids, cfg.block_size, 0, layer_window(cfg, 0))
        n = len(plan)
        out = []
        for g, hg in enumerate(plan):
            lays = hg.seq + [lay for lay, _ in hg.compact]
            out += lays if n == 1 else [embed_group(lay, g, n) for lay in lays]
        return {"local": out}


class LayerWindowAttention(_WindowFamily):
    """Causal sliding window i - j < w_l within each document; w_l per layer."""

    kind, cp_supported = "window", True

    def forward(self, q_BTHD, k_BTKD, v_BTKD, ctx: AttnContext):
        if ctx.group is None and self.cfg.impl == "torch":  # kinds.WindowAttention's exact path
            return chunked_local_attention(q_BTHD, k_BTKD, v_BTKD, ctx.doc_ids, self.window,
                                           self.cfg.chunk_size)[0]
        return super().forward(q_BTHD, k_BTKD, v_BTKD, ctx)

    @staticmethod
    def plan_key_of(cfg, layer_idx, window):
        return ("window", window)

    @staticmethod
    def plan(cfg, doc_BT, blk, layer_idx, window):
        return [HeadGroupPlan([window_layout(doc_BT, blk, window)])]


class MultiWindowAttention(_WindowFamily):
    """kv-head group g attends within head_windows[g] (seed 004's hierarchical sliding window)."""

    kind, cp_supported = "multi_window", True

    def __init__(self, cfg, layer_idx, n_heads, n_kv_heads, head_dim):
        super().__init__(cfg, layer_idx, n_heads, n_kv_heads, head_dim)
        if n_kv_heads % len(cfg.head_windows):
            raise ValueError(f"attention.kind=multi_window: n_kv_heads={n_kv_heads} is not "
                             f"divisible by len(head_windows)={len(cfg.head_windows)}")

    @staticmethod
    def plan_key_of(cfg, layer_idx, window):
        return ("multi_window", tuple(cfg.head_windows))

    @staticmethod
    def plan(cfg, doc_BT, blk, layer_idx, window):
        return [HeadGroupPlan([window_layout(doc_BT, blk, w)]) for w in cfg.head_windows]


class S2Attention(_WindowFamily):
    """LongLoRA S²-Attn: causal group attention, half of the heads on groups shifted by half."""

    kind, cp_supported = "s2attn", True

    def __init__(self, cfg, layer_idx, n_heads, n_kv_heads, head_dim):
        super().__init__(cfg, layer_idx, n_heads, n_kv_heads, head_dim)
        if n_kv_heads % 2:
            raise ValueError(f"attention.kind=s2attn splits the kv heads in halves: n_kv_heads="
                             f"{n_kv_heads} must be even")

    @staticmethod
    def plan_key_of(cfg, layer_idx, window):
        return ("s2attn", cfg.s2_group)

    @staticmethod
    def plan(cfg, doc_BT, blk, layer_idx, window):
        g = cfg.s2_group
        if g % (2 * blk):
            raise ValueError(f"attention.s2_group ({g}) must be a multiple of 2 * block_size "
                             f"({2 * blk})")
        check_block_aligned(doc_BT, blk, "s2attn")
        return [HeadGroupPlan([group_layout(doc_BT, blk, g, 0)]),
                HeadGroupPlan([group_layout(doc_BT, blk, g, g // 2)])]


class RandomGlobalAttention(_WindowFamily):
    """BigBird, causal: window w_l + random earlier blocks + the document's first num_global tokens."""

    kind, cp_supported = "random_global", True

    @staticmethod
    def plan_key_of(cfg, layer_idx, window):
        return ("random_global", window, cfg.num_global, cfg.random_blocks, cfg.random_seed,
                layer_idx)

    @staticmethod
    def plan(cfg, doc_BT, blk, layer_idx, window):
        check_block_aligned(doc_BT, blk, "random_global")
        local = random_window_layout(doc_BT, blk, window, cfg.num_global, cfg.random_blocks,
                                     cfg.random_seed, layer_idx)
        if cfg.num_global == 0:
            return [HeadGroupPlan([local])]
        doc = pad_doc(doc_BT, blk)
        rows = torch.ones_like(doc[:, ::blk], dtype=torch.bool)
        glob, idx = compact_far_layout(doc_BT, blk, doc_position(doc) < cfg.num_global, rows,
                                       window)
        return [HeadGroupPlan([local], [(glob, idx)])]


def cp_block(cfg: AttentionConfig, unit: int) -> int:
    """Layout block under CP: whole blocks per sharding unit (window: gcd, as dense CP does)."""
    if cfg.kind == "window":
        return math.gcd(unit, cfg.block_size)
    if unit % cfg.block_size:
        raise ValueError(f"attention.kind={cfg.kind} under CP needs sharding units ({unit} tokens) "
                         f"of whole blocks (block_size={cfg.block_size})")
    return cfg.block_size


KINDS: dict = {"window": LayerWindowAttention, "multi_window": MultiWindowAttention,
               "s2attn": S2Attention, "random_global": RandomGlobalAttention}
"""attention.kind -> module class, merged into kinds.ATTENTION_KINDS."""
