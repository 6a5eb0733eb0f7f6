"""Sequence sharding for context parallelism: CPShard and cp_context.

Which tokens a cp rank holds is a Sharding (balance.py): zigzag by default (2P chunks of
C = T / 2P; rank r holds chunks r and 2P - 1 - r, which balances one causal document), or the
document-balanced block deal of parallel.cp_balance = "doc" for packed rows. Every Batch field
is sharded the same way; positions are the global ones (RoPE reads them, nothing is recomputed).

CPShard travels in ctx.cache["cp_shard"] beside the local AttnContext: the group, this rank, the
sharding and the *global* per-token metadata (doc ids, positions, roles; tokens and labels when
built by cp_context, for `rebalance`: int tensors, 8 bytes a token each) that layouts and the
scorer need. Activations are never held globally.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
import torch.distributed as dist

from dcwdist.attention.context import AttnContext
from dcwdist.parallel.balance import Sharding, make_sharding, zigzag_index, zigzag_sharding
from dcwdist.parallel.comm import CommCounter, all_gather
from dcwdist.parallel.dims import ParallelLayoutError

__all__ = ["CP_KINDS", "CPShard", "cp_context", "cp_kinds", "check_shardable", "shard_batch",
           "shard_tensor", "unshard", "zigzag_index"]

CP_KINDS = ("dense", "dcw", "caa")
"""Kinds of kinds.py with a CP path; kinds in their own modules set `cp_supported = True`."""


def cp_kinds() -> tuple[str, ...]:
    from dcwdist.attention.kinds import ATTENTION_KINDS
    return CP_KINDS + tuple(k for k, m in ATTENTION_KINDS.items()
                            if getattr(m, "cp_supported", False) and k not in CP_KINDS)
"""attention.kind values with a context-parallel path."""


def check_shardable(seq_len: int, size: int, align: int = 1) -> None:
    if seq_len % (2 * size * align):
        raise ParallelLayoutError(
            f"sequence length {seq_len} does not split into 2*cp={2 * size} zigzag chunks of "
            f"whole {align}-token blocks; use a multiple of {2 * size * align}")


@dataclass
class CPShard:
    """This rank's place in the sharding plus the sequence's global int metadata."""

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
    sharding: Optional[Sharding] = None
    """Which tokens each rank holds; None means zigzag."""
    tokens: Optional[torch.Tensor] = None
    """[B, T] global tokens (cp_context), so `rebalance` can re-deal them after the scorer."""
    labels: Optional[torch.Tensor] = None
    """[B, T] global labels (cp_context)."""
    balance: str = "zigzag"
    """parallel.cp_balance this shard was built with ("doc": rebalance after the scorer)."""
    core: str = "auto"
    """parallel.cp_core: DCW's core/window keys by "ring", "qship" (queries shipped) or "auto"."""

    def __post_init__(self):
        if self.sharding is None:
            self.sharding = zigzag_sharding(self.seq_len, self.size, self.doc_ids.device)

    @property
    def unit(self) -> int:
        """Tokens of the sharding's contiguous runs (layout blocks must divide it)."""
        return self.sharding.unit

    def index(self, rank: Optional[int] = None) -> torch.Tensor:
        """[T / P] global token indices held by `rank` (default: this rank), in local order."""
        return self.sharding.index(self.rank if rank is None else rank).to(self.doc_ids.device)

    def owner(self, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global token indices -> (owner rank, index in the owner's local tokens)."""
        return self.sharding.owner(tok)

    def gather_sequence(self, x_BT: torch.Tensor, label: str = "sequence") -> torch.Tensor:
        """Local [B, T/P, ...] -> global [B, T, ...] on every rank (differentiable)."""
        return self.sharding.unshard(all_gather(x_BT, self.group, self.counter, label))


def shard_tensor(x_BT: torch.Tensor, size: int, rank: int,
                 sharding: Optional[Sharding] = None) -> torch.Tensor:
    """`rank`'s [B, T/P, ...] of a global tensor (zigzag unless `sharding` is given)."""
    if sharding is None:
        return x_BT[:, zigzag_index(x_BT.shape[1], size, rank, x_BT.device)]
    return sharding.shard(x_BT, rank)


def shard_batch(batch, size: int, rank: int, sharding: Optional[Sharding] = None):
    """Every [B, T] field of a Batch, sharded for `rank` (zigzag unless `sharding` is given)."""
    return type(batch)(**{f.name: shard_tensor(getattr(batch, f.name), size, rank, sharding)
                          for f in fields(batch)})


def unshard(x_local: torch.Tensor, shard: CPShard) -> torch.Tensor:
    """Inverse of the sharding for evaluation: this rank's [B, T/P, ...] -> global [B, T, ...]."""
    return shard.gather_sequence(x_local, "unshard")


def cp_context(batch, kind: str, group, align: int = 1,
               counter: Optional[CommCounter] = None, balance: str = "zigzag",
               attn_cfg=None, core: str = "auto"):
    """(this rank's Batch, its AttnContext) for a full-sequence Batch under context parallelism.

    ctx.group selects the attention modules' CP path; ctx.cache["cp_shard"] holds the global
    metadata and the sharding; ctx.cache["relevance"] stays global (the scorer runs on the whole
    sequence). balance="doc" (parallel.cp_balance) deals attn_cfg.block_size blocks by their
    attention work (balance.py) instead of zigzag; DCW re-deals them once its tiers exist.
    core (parallel.cp_core) picks how DCW's core/window rows reach other ranks' keys.
    """
    if kind not in cp_kinds():
        raise ValueError(f"context parallelism supports attention.kind in {cp_kinds()}; "
                         f"got {kind!r}")
    if balance == "doc" and attn_cfg is None:
        raise ValueError("cp_context(balance='doc') needs attn_cfg (its block size and kind)")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    check_shardable(batch.tokens.shape[1], size, align)
    sharding = make_sharding(batch.doc_ids, size, balance, attn_cfg)
    local = shard_batch(batch, size, rank, sharding)
    shard = CPShard(group, size, rank, batch.tokens.shape[1], batch.doc_ids, batch.positions,
                    batch.roles, counter, sharding, batch.tokens, batch.labels, balance, core)
    ctx = AttnContext(doc_ids=local.doc_ids, positions=local.positions, roles=local.roles,
                      group=group, cache={"relevance": batch.relevance, "cp_shard": shard})
    return local, ctx
