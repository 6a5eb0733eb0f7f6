"""Parallel layout: data-parallel x context-parallel ranks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ParallelConfig:
    """How the world is split; stages may change `cp`."""

    cp: int = 1
    """Context-parallel degree (ranks sharing one sequence); stage.cp overrides it."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl on GPU, gloo on CPU."""
    cp_balance: Literal["zigzag", "doc"] = "doc"
    """Which tokens each cp rank holds: zigzag chunks, or attention blocks dealt by their work
    within their documents (equal per-rank attention FLOPs on packed rows; DCW re-deals by its
    tiers after the scorer; zigzag is kept where it is already balanced). parallel/balance.py."""
    cp_core: Literal["auto", "ring", "qship"] = "auto"
    """How DCW's core and window rows reach other ranks' keys: K/V around the ring, or the
    queries shipped to the keys (O and LSE back); auto = the fewer bytes by the byte model, per
    layer and batch (parallel/qship.py, benchmarks/cp_comm.py)."""

    def __post_init__(self):
        if self.cp < 1:
            raise ValueError(f"parallel.cp must be >= 1, got {self.cp}")
        if self.cp_balance not in ("zigzag", "doc"):
            raise ValueError(f"parallel.cp_balance must be 'zigzag' or 'doc', got "
                             f"{self.cp_balance!r}")
        if self.cp_core not in ("auto", "ring", "qship"):
            raise ValueError(f"parallel.cp_core must be 'auto', 'ring' or 'qship', got "
                             f"{self.cp_core!r}")
