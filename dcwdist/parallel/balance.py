"""Which global tokens each cp rank holds: the one sharding object every CP path indexes through.

A Sharding is a permutation of the T tokens into P equal rank-major slices: rank r holds the
global tokens order[r * Tl : (r + 1) * Tl] (Tl = T / P) in that local order. Tokens move in
contiguous runs of `unit` tokens, each landing at a local offset that is a multiple of `unit`,
so a layout whose blocks divide `unit` keeps every block whole on one rank (global block b is
local block owner(b * blk)[1] // blk of rank owner(b * blk)[0]). CP code reaches other ranks'
tokens only through `index(rank)` and `owner(tok)`; nothing else assumes a closed form.

Schemes (parallel.cp_balance):
  zigzag  2P chunks of C = T / 2P; rank r holds chunks r and 2P - 1 - r. Balances one causal
          document per row. On packed rows a rank's dense work is ~ the sum over its tokens of
          their position within their document, which zigzag leaves unbalanced (up to ~2x
          between ranks on long-tailed packs: benchmarks/cp_balance.py).
  doc     blocks of `unit` = attention.block_size tokens weighted by the attention work of their
          real tokens (block_work: exact allowed query-key pairs of the kind's layouts), summed
          over the batch's rows; heaviest first, each block goes to the least-loaded rank that
          still has room for it (LPT with equal counts; ties to the lower rank), then each rank
          keeps its blocks in ascending order. Every rank computes the same assignment from the
          global doc ids (and, for DCW, the global tiers) -- no communication. Zigzag is kept
          when it is already within ZIGZAG_SLACK of the mean (one document per row, dense).

DCW's work depends on the tiers, which the scorer decides inside the forward; with cp_balance
"doc" the Transformer calls `rebalance` right after the segmenter, which re-deals the blocks by
the tiers' work (the scorer runs on the gathered sequence, so only the embedding lookup is
redone: no activations move). A permutation shared by the batch's rows keeps index(rank) one
[Tl] vector; it balances the rows' summed work, which is what a rank computes.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Optional

import torch

from dcwdist.attention.layouts import doc_position, doc_start, pad_doc

SCHEMES = ("zigzag", "doc")
ZIGZAG_SLACK = 0.02
"""doc scheme: keep zigzag while its busiest rank is within 2% of the mean work."""


@dataclass
class Sharding:
    """Rank-major token permutation of a length-T sequence over `size` cp ranks."""

    order: torch.Tensor
    """[T] int64 global token index of every (rank, local slot), rank-major."""
    size: int
    unit: int
    """Tokens per contiguous run; runs sit at local offsets that are multiples of it."""
    scheme: str = "zigzag"
    _slot: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return self.order.numel()

    @property
    def local_len(self) -> int:
        return self.seq_len // self.size

    def index(self, rank: int) -> torch.Tensor:
        """[Tl] global token indices held by `rank`, in its local order."""
        Tl = self.local_len
        return self.order[rank * Tl:(rank + 1) * Tl]

    @property
    def slot(self) -> torch.Tensor:
        """[T] rank-major slot of every global token (the inverse permutation)."""
        if self._slot is None:
            inv = torch.empty_like(self.order)
            inv[self.order] = torch.arange(self.seq_len, device=self.order.device)
            self._slot = inv
        return self._slot

    def owner(self, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global token indices -> (owner rank, index in the owner's local tokens)."""
        s = self.slot.to(tok.device)[tok]
        return s // self.local_len, s % self.local_len

    def shard(self, x_BT: torch.Tensor, rank: int) -> torch.Tensor:
        """[B, T, ...] -> `rank`'s [B, Tl, ...]."""
        return x_BT[:, self.index(rank).to(x_BT.device)]

    def unshard(self, parts_PBT: torch.Tensor) -> torch.Tensor:
        """Every rank's local tensors [P, B, Tl, ...] -> global [B, T, ...] (differentiable)."""
        B = parts_PBT.shape[1]
        flat = parts_PBT.transpose(0, 1).reshape((B, self.seq_len) + tuple(parts_PBT.shape[3:]))
        return flat[:, self.slot.to(flat.device)]


def zigzag_index(seq_len: int, size: int, rank: int, device=None) -> torch.Tensor:
    """[T / P] global token indices held by `rank` of `size`: chunks rank and 2P - 1 - rank."""
    C = seq_len // (2 * size)
    a = torch.arange(rank * C, (rank + 1) * C, device=device)
    b = torch.arange((2 * size - 1 - rank) * C, (2 * size - rank) * C, device=device)
    return torch.cat([a, b])


def zigzag_sharding(seq_len: int, size: int, device=None) -> Sharding:
    order = torch.cat([zigzag_index(seq_len, size, r, device) for r in range(size)])
    return Sharding(order, size, seq_len // (2 * size), "zigzag")


# -- work per block: allowed query-key pairs of the kind's layouts, exactly ----------------------
def _token_terms(doc_BT: torch.Tensor, blk: int):
    """Padded doc ids, doc position p [B, T'] and real-token mask (int64)."""
    doc = pad_doc(doc_BT, blk)
    return doc, doc_position(doc), (doc >= 0).long()


def _per_block(x_BT: torch.Tensor, blk: int) -> torch.Tensor:
    return x_BT.view(x_BT.shape[0], -1, blk).sum(-1)  # [B, NB]


def dcw_block_pairs(cfg, doc_BT: torch.Tensor, tiers_BN: torch.Tensor) -> torch.Tensor:
    """[B, NB] DCW pairs per block: core p + 1; buffer min(p + 1, bw) + strided keys; background
    min(p + 1, window); non-core + (blk / pool) x the document's core blocks before the block."""
    from dcwdist.attention.context import TIER_BUFFER, TIER_CORE
    blk = cfg.block_size
    doc, p, real = _token_terms(doc_BT, blk)
    bw, w, st = cfg.buffer_window, cfg.window, cfg.stride
    strided = torch.where(p >= bw, torch.div(p - bw, st, rounding_mode="floor") + 1, 0)
    terms = {"core": p + 1, "buffer": (p + 1).clamp(max=bw) + strided,
             "background": (p + 1).clamp(max=w)}
    core, buf = tiers_BN == TIER_CORE, tiers_BN == TIER_BUFFER
    c = {k: _per_block(v * real, blk) for k, v in terms.items()}
    work = torch.where(core, c["core"], torch.where(buf, c["buffer"], c["background"]))
    before = core.long().cumsum(1) - core.long()  # core blocks before b in the row
    start = doc_start(doc)[:, ::blk] // blk  # first block of the block's document
    before = before - before.gather(1, start)
    return work + (~core) * _per_block(real, blk) * before * (blk // cfg.summary_pool)


def caa_block_pairs(cfg, doc_BT: torch.Tensor) -> torch.Tensor:
    """[B, NB] CAA pairs per block: window min(p + 1, width) plus min(k, earlier document
    blocks) whole blocks and the causal diagonal (width, k from the document's length)."""
    from dcwdist.attention.caa import caa_block_choices
    blk = cfg.block_size
    doc, p, real = _token_terms(doc_BT, blk)
    width, k = caa_block_choices(cfg.caa_windows, doc_BT, blk, cfg.caa_c)
    per_tok = lambda x: x.repeat_interleave(blk, 1)  # noqa: E731
    in_blk = p % blk  # documents start at block boundaries (caa is block-based)
    earlier = torch.div(p, blk, rounding_mode="floor")
    pairs = ((p + 1).clamp(max=per_tok(width)) + torch.minimum(earlier, per_tok(k)) * blk
             + in_blk + 1)
    return _per_block(pairs * real, blk)


def block_work(attn_cfg, doc_BT: torch.Tensor, tiers_BN: Optional[torch.Tensor] = None,
               blk: Optional[int] = None) -> torch.Tensor:
    """[NB] int64 attention pairs of every block of `blk` tokens, summed over the rows.

    dcw with tiers and caa count their own layouts; a kind module may define
    `cp_block_work(attn_cfg, doc_BT, blk) -> [NB]`; everything else (and dcw before its tiers
    exist) counts dense causal pairs within the document, sum of (p + 1) over real tokens.
    """
    blk = attn_cfg.block_size if blk is None else blk
    from dcwdist.attention.kinds import ATTENTION_KINDS
    hook = getattr(ATTENTION_KINDS.get(attn_cfg.kind), "cp_block_work", None)
    if hook is not None:  # kinds in their own modules may count their own layouts' pairs
        return hook(attn_cfg, doc_BT, blk)
    if attn_cfg.kind == "dcw" and tiers_BN is not None:
        return dcw_block_pairs(attn_cfg, doc_BT, tiers_BN).sum(0)
    if attn_cfg.kind == "caa":
        return caa_block_pairs(attn_cfg, doc_BT).sum(0)
    _, p, real = _token_terms(doc_BT, blk)
    return _per_block((p + 1) * real, blk).sum(0)


# -- assignment ----------------------------------------------------------------------------------
def rank_loads(work_N: torch.Tensor, sharding: Sharding, unit: int) -> torch.Tensor:
    """[P] summed work of each rank for per-unit work [T / unit] (unit divides sharding.unit)."""
    first = sharding.order[::unit].to(work_N.device)  # first token of every local unit
    return work_N[first // unit].view(sharding.size, -1).sum(1)


def lpt_blocks(work_N: torch.Tensor, size: int) -> torch.Tensor:
    """[P, N / P] blocks of each rank: heaviest first to the least-loaded rank with room."""
    w = work_N.tolist()
    N, cap = len(w), len(w) // size
    heap = [(0, r) for r in range(size)]  # (load, rank): ties go to the lower rank
    owned: list[list[int]] = [[] for _ in range(size)]
    for b in sorted(range(N), key=lambda i: (-w[i], i)):
        load, r = heapq.heappop(heap)
        owned[r].append(b)
        if len(owned[r]) < cap:
            heapq.heappush(heap, (load + w[b], r))
    return torch.tensor([sorted(o) for o in owned], dtype=torch.int64)


def doc_sharding(work_N: torch.Tensor, size: int, blk: int, device=None) -> Sharding:
    """Blocks of `blk` tokens dealt to ranks by their work (lpt_blocks)."""
    blocks = lpt_blocks(work_N.cpu(), size).to(device)  # [P, NB / P]
    order = (blocks[..., None] * blk + torch.arange(blk, device=device)).reshape(-1)
    return Sharding(order, size, blk, "doc")


def make_sharding(doc_BT: torch.Tensor, size: int, scheme: str = "zigzag", attn_cfg=None,
                  tiers_BN: Optional[torch.Tensor] = None) -> Sharding:
    """The sharding of a batch with global doc ids doc_BT [B, T] over `size` ranks.

    "doc" deals attention.block_size blocks by block_work; it falls back to zigzag when the block
    does not divide the zigzag chunk T / 2P, or when zigzag is already balanced.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"parallel.cp_balance must be one of {SCHEMES}, got {scheme!r}")
    T, dev = doc_BT.shape[1], doc_BT.device
    zig = zigzag_sharding(T, size, dev)
    blk = 0 if attn_cfg is None else attn_cfg.block_size
    if scheme == "zigzag" or blk < 1 or zig.unit % blk:
        return zig
    work = block_work(attn_cfg, doc_BT, tiers_BN)
    zig_load = rank_loads(work, zig, blk).double()
    if float(zig_load.max()) <= (1 + ZIGZAG_SLACK) * float(zig_load.mean()):
        return zig
    return doc_sharding(work, size, blk, dev)


def load_spread(loads_P: torch.Tensor) -> float:
    """max / min - 1 of per-rank loads: 0 is perfect balance (inf when a rank has none)."""
    lo, hi = float(loads_P.min()), float(loads_P.max())
    return 0.0 if hi == 0 else (float("inf") if lo == 0 else hi / lo - 1)


def rebalance(ctx, attn_cfg, with_labels: bool):
    """After the scorer (DCW): re-deal this batch's blocks by the tiers' work.

    Updates the CP shard's sharding and ctx's local doc ids / positions / roles in place and
    returns this rank's new (tokens [B, Tl], labels [B, Tl] or None); None when the shard keeps
    its sharding (cp_balance "zigzag", no tiers, or the same assignment).
    """
    shard = ctx.cache.get("cp_shard")
    if (shard is None or shard.balance != "doc" or ctx.tiers is None or shard.tokens is None
            or (with_labels and shard.labels is None)):
        return None
    new = make_sharding(shard.doc_ids, shard.size, "doc", attn_cfg, ctx.tiers)
    if torch.equal(new.order, shard.sharding.order):
        return None
    shard.sharding = new
    r = shard.rank
    ctx.doc_ids, ctx.positions = new.shard(shard.doc_ids, r), new.shard(shard.positions, r)
    ctx.roles = None if shard.roles is None else new.shard(shard.roles, r)
    labels = new.shard(shard.labels, r) if with_labels else None
    return new.shard(shard.tokens, r), labels


def rank_pairs(layouts, sharding: Sharding, n_heads: Optional[int] = None) -> torch.Tensor:
    """[P] allowed query-key pairs of each rank's query tokens under global layouts.

    The FLOPs counter's per-token pair counts (attention.flops.layout_pairs, summed over rows
    and query heads: head h uses group h // (H / G)) restricted to the rank's tokens; x 4 *
    head_dim is the rank's attention FLOPs. n_heads defaults to the largest group count.
    """
    from dcwdist.attention.flops import layout_pairs
    H = max(lay.groups for lay in layouts) if n_heads is None else n_heads
    T = sharding.seq_len
    per_tok = sum(layout_pairs(lay).sum(0)[:, :T].sum(0) * (H // lay.groups) for lay in layouts)
    return torch.stack([per_tok[sharding.index(r).to(per_tok.device)].sum()
                        for r in range(sharding.size)])
