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

    def __post_init__(self):
        if self.cp < 1:
            raise ValueError(f"parallel.cp must be >= 1, got {self.cp}")
