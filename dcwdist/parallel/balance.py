"""Which global tokens each cp rank holds: the one sharding object every CP path indexes through.

A Sharding is a permutation of the T tokens into P equal rank-major slices: rank r holds the
global tokens order[r * Tl : (r + 1) * Tl] (Tl = T / P) in that local order. Tokens move in
contiguous runs of `unit` tokens, each landing at a local offset that is a multiple of `unit`,
so any layout whose blocks divide `unit` keeps whole blocks on one rank (block b of the global
sequence is local block owner(b * blk)[1] // blk of its owner). Every CP path goes through
`index(rank)` (a rank's global tokens) and `owner(tok)` (a global token's rank and local slot);
nothing else assumes a closed form.

Schemes (parallel.cp_balance):
  zigzag  2P chunks of C = T / 2P; rank r holds chunks r and 2P - 1 - r. Balances one causal
          document per row; on packed rows the work of a rank is ~ the sum over its tokens of
          their position within their document, which zigzag does not balance.
  doc     blocks of `unit` tokens weighted by their dense causal work within their document
          (sum over the block's real tokens of doc position + 1, summed over the batch rows):
          sorted by weight (ties: lower block first) and dealt to ranks in snake order
          (0..P-1, P-1..0, ...), then each rank's blocks kept in ascending global order. Every
          rank gets T / P tokens and the same assignment from the global doc ids alone (no
          communication). Equal counts and equal position sums balance any per-block cost
          affine in the doc position (dense; DCW in expectation over its tiers). When zigzag
          is already within ZIGZAG_SLACK of the mean (one document per row, or nearly), zigzag
          is kept: contiguous chunks need no per-block bookkeeping.

A permutation shared by the batch's rows keeps index(rank) one [Tl] vector for every row; it
balances the rows' summed work, which is what a rank computes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from dcwdist.attention.layouts import doc_position, pad_doc

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
        """[B, T, ...] -> this rank's [B, Tl, ...]."""
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


def block_work(doc_BT: torch.Tensor, blk: int) -> torch.Tensor:
    """[NB] int64 dense causal key count of every block within its document, summed over rows."""
    doc = pad_doc(doc_BT, blk)
    work = (doc_position(doc) + 1) * (doc >= 0)
    return work.view(doc.shape[0], -1, blk).sum((0, 2))


def rank_loads(work_N: torch.Tensor, sharding: Sharding, unit: int) -> torch.Tensor:
    """[P] summed work of each rank for per-unit work [T / unit] (unit divides sharding.unit)."""
    first = sharding.order[::unit]  # first token of every local unit, rank-major
    return work_N[first // unit].view(sharding.size, -1).sum(1)


def snake_blocks(work_N: torch.Tensor, size: int) -> torch.Tensor:
    """[P, N / P] block indices of each rank: heaviest first in snake order, then ascending."""
    N = work_N.numel()
    by_work = torch.argsort(-work_N, stable=True)
    i = torch.arange(N, device=work_N.device)
    lane = i % size
    rank = torch.where((i // size) % 2 == 0, lane, size - 1 - lane)
    owned = torch.argsort(rank * N + by_work)  # grouped by rank, each group by block index
    return by_work[owned].view(size, N // size)


def doc_sharding(doc_BT: torch.Tensor, size: int, blk: int) -> Sharding:
    """Blocks of `blk` tokens dealt to ranks by their within-document causal work (snake)."""
    T = doc_BT.shape[1]
    blocks = snake_blocks(block_work(doc_BT, blk), size)  # [P, NB / P]
    order = (blocks[..., None] * blk + torch.arange(blk, device=blocks.device)).reshape(T)
    return Sharding(order, size, blk, "doc")


def make_sharding(doc_BT: torch.Tensor, size: int, scheme: str = "zigzag",
                  blk: int = 0) -> Sharding:
    """The sharding of a batch with global doc ids doc_BT [B, T] over `size` ranks.

    scheme "doc" needs `blk` (the attention block) to divide the zigzag chunk T / 2P; it falls
    back to zigzag when that does not hold or when zigzag is already balanced.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"parallel.cp_balance must be one of {SCHEMES}, got {scheme!r}")
    T, dev = doc_BT.shape[1], doc_BT.device
    zig = zigzag_sharding(T, size, dev)
    if scheme == "zigzag" or blk < 1 or zig.unit % blk:
        return zig
    work = block_work(doc_BT, blk)
    zig_load = rank_loads(work, zig, blk).double()
    if float(zig_load.max()) <= (1 + ZIGZAG_SLACK) * float(zig_load.mean()):
        return zig
    return doc_sharding(doc_BT, size, blk)


def load_spread(loads_P: torch.Tensor) -> float:
    """(max - min) / max of per-rank loads: 0 is perfect balance."""
    hi = float(loads_P.max())
    return 0.0 if hi == 0 else (hi - float(loads_P.min())) / hi
