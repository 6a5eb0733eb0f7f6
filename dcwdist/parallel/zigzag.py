"""Zigzag sequence sharding for context parallelism.

The sequence of T tokens is cut into 2P chunks of C = T / 2P; cp rank r holds chunks r and
2P - 1 - r (in that order), so every rank gets the same causal work. Every Batch field is
sharded the same way; positions are the global ones (RoPE reads them, nothing is recomputed).

CPShard travels in ctx.cache["cp_shard"] beside the local AttnContext: the group, this rank and
the *global* per-token metadata (doc ids, positions, roles: int tensors, 8 bytes a token) that
layouts and the scorer need. Activations are never held globally.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
import torch.distributed as dist

from dcwdist.attention.context import AttnContext
from dcwdist.parallel.comm import CommCounter, all_gather
from dcwdist.parallel.dims import ParallelLayoutError

CP_KINDS = ("dense", "dcw")
"""Kinds of kinds.py with a CP path; kinds in their own modules set `cp_supported = True`."""


def cp_kinds() -> tuple[str, ...]:
    from dcwdist.attention.kinds import ATTENTION_KINDS
    return CP_KINDS + tuple(k for k, m in ATTENTION_KINDS.items()
                            if getattr(m, "cp_supported", False) and k not in CP_KINDS)
"""attention.kind values with a context-parallel path."""


def zigzag_index(seq_len: int, size: int, rank: int, device=None) -> torch.Tensor:
    """[T / P] global token indices held by `rank` of `size`: chunks rank and 2P - 1 - rank."""
    C = seq_len // (2 * size)
    a = torch.arange(rank * C, (rank + 1) * C, device=device)
    b = torch.arange((2 * size - 1 - rank) * C, (2 * size - rank) * C, device=device)
    return torch.cat([a, b])


def zigzag_owner(chunk: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global chunk index -> (owner rank, which of its two chunks: 0 or 1)."""
    second = chunk >= size
    return torch.where(second, 2 * size - 1 - chunk, chunk), second.long()


def check_shardable(seq_len: int, size: int, align: int = 1) -> None:
    if seq_len % (2 * size * align):
        raise ParallelLayoutError(
            f"sequence length {seq_len} does not split into 2*cp={2 * size} zigzag chunks of "
            f"whole {align}-token blocks; use a multiple of {2 * size * align}")


@dataclass
class CPShard:
    """This rank's place in the zigzag layout plus the sequence's global int metadata."""

    group: Any
    size: int
    rank: int
    seq_len: int
    doc_ids: torch.Tensor
    """[B, T] global document ids (-1 padding)."""
    positions: torch.Tensor
    """[B, T] global positions within the document."""
    roles: Optional[torch.Tensor] = None
    """[B, T] global roles."""
    counter: Optional[CommCounter] = None
    """Counts the bytes this rank sends (tests, benchmarks); None in training."""

    @property
    def chunk(self) -> int:
        return self.seq_len // (2 * self.size)

    def index(self, rank: Optional[int] = None) -> torch.Tensor:
        r = self.rank if rank is None else rank
        return zigzag_index(self.seq_len, self.size, r, self.doc_ids.device)

    def gather_sequence(self, x_BT: torch.Tensor, label: str = "sequence") -> torch.Tensor:
        """Local [B, T/P, ...] -> global [B, T, ...] on every rank (differentiable)."""
        parts = all_gather(x_BT, self.group, self.counter, label)  # [P, B, T/P, ...]
        order = torch.cat([self.index(r) for r in range(self.size)])
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        flat = parts.transpose(0, 1).reshape((x_BT.shape[0], self.seq_len) + tuple(x_BT.shape[2:]))
        return flat[:, inv]


def shard_tensor(x_BT: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    return x_BT[:, zigzag_index(x_BT.shape[1], size, rank, x_BT.device)]


def shard_batch(batch, size: int, rank: int):
    """Every [B, T] field of a Batch, zigzag-sharded for `rank`."""
    return type(batch)(**{f.name: shard_tensor(getattr(batch, f.name), size, rank)
                          for f in fields(batch)})


def unshard(x_local: torch.Tensor, shard: CPShard) -> torch.Tensor:
    """Inverse of the sharding for evaluation: this rank's [B, T/P, ...] -> global [B, T, ...]."""
    return shard.gather_sequence(x_local, "unshard")


def cp_context(batch, kind: str, group, align: int = 1,
               counter: Optional[CommCounter] = None):
    """(this rank's Batch, its AttnContext) for a full-sequence Batch under context parallelism.

    ctx.group selects the attention modules' CP path; ctx.cache["cp_shard"] holds the global
    metadata; ctx.cache["relevance"] stays global (the scorer runs on the whole sequence).
    """
    if kind not in cp_kinds():
        raise ValueError(f"context parallelism supports attention.kind in {cp_kinds()}; "
                         f"got {kind!r}")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    check_shardable(batch.tokens.shape[1], size, align)
    local = shard_batch(batch, size, rank)
    shard = CPShard(group, size, rank, batch.tokens.shape[1], batch.doc_ids, batch.positions,
                    batch.roles, counter)
    ctx = AttnContext(doc_ids=local.doc_ids, positions=local.positions, roles=local.roles,
                      group=group, cache={"relevance": batch.relevance, "cp_shard": shard})
    return local, ctx
