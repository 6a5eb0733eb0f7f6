"""ParallelDims: the one owner of the (dp x cp) layout and its process groups.

Ranks are laid out cp-fastest: rank = dp_rank * cp + cp_rank, so the ranks sharing one sequence
are neighbours (on one host when cp <= GPUs per host). Built once, passed explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist


class ParallelLayoutError(ValueError):
    """The world cannot be split as asked."""


@dataclass
class ParallelDims:
    world_size: int
    cp: int
    rank: int = 0
    dp_group: Any = field(default=None, repr=False)
    """Ranks holding different rows with the same cp index (None: single process)."""
    cp_group: Any = field(default=None, repr=False)
    """Ranks sharing this rank's sequence (None when cp == 1)."""

    def __post_init__(self):
        if self.cp < 1 or self.world_size % self.cp:
            raise ParallelLayoutError(
                f"world size {self.world_size} is not divisible by the context-parallel degree "
                f"cp={self.cp}")

    @property
    def dp(self) -> int:
        return self.world_size // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @classmethod
    def build(cls, world_size: int, cp: int, rank: int = 0) -> "ParallelDims":
        """Validate and, when torch.distributed is up, create the dp and cp groups.

        Every rank must call this with the same arguments (new_group is collective).
        """
        dims = cls(world_size=world_size, cp=cp, rank=rank)
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            for d in range(dims.dp):
                g = dist.new_group(list(range(d * cp, (d + 1) * cp)))
                if d == dims.dp_rank:
                    dims.cp_group = g if cp > 1 else None
            for c in range(cp):
                g = dist.new_group(list(range(c, world_size, cp)))
                if c == dims.cp_rank:
                    dims.dp_group = g
        return dims

    def world_group(self) -> Optional[Any]:
        return dist.group.WORLD if self.world_size > 1 else None
