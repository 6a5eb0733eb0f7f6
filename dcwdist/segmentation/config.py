"""Scorer and tiering settings (DESIGN.md "Scores -> tiers", "Learning the scorer")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SegmentationConfig:
    """Instruction-aware scorer and the tier rule; used when attention.kind == dcw."""

    mode: Literal["prefix", "causal"] = "causal"
    """prefix: tiers by per-document quantiles (loss on the answer); causal: decided before
    each block from the previous block's last score (LM loss on every token)."""
    core_ratio: float = 0.2
    """Target share of document blocks in the core tier."""
    buffer_ratio: float = 0.3
    """Target share of document blocks in the buffer tier."""
    tau_core: float = 0.5
    """causal mode: score at or above which the next block is core (within the cap)."""
    tau_buffer: float = 0.3
    """causal mode: score at or above which the next block is buffer (within the cap)."""
    scorer_layers: int = 4
    """Scorer encoder depth."""
    scorer_dim: int = 128
    """Scorer width."""
    scorer_heads: int = 4
    """Scorer attention heads."""
    scorer_window: int = 128
    """Scorer's windowed attention span (keeps it O(n))."""
    phase: Literal["scorer", "joint", "frozen"] = "joint"
    """scorer: train the scorer alone on labels (phase 1); joint: L_task + l1 L_seg + l2 L_eff
    (phase 2); frozen: scorer fixed."""
    lambda_seg: float = 1.0
    """Weight of L_seg (BCE against relevance labels)."""
    lambda_eff: float = 0.0
    """Weight of L_eff (expected attention FLOPs above target)."""
    eff_target: float = 0.3
    """Target attention FLOPs as a fraction of dense."""

    def __post_init__(self):
        if not (0 < self.core_ratio <= 1 and 0 <= self.buffer_ratio <= 1
                and self.core_ratio + self.buffer_ratio <= 1):
            raise ValueError("segmentation.core_ratio and buffer_ratio must be in [0, 1] and "
                             f"sum to <= 1, got {self.core_ratio} + {self.buffer_ratio}")
        if self.tau_buffer > self.tau_core:
            raise ValueError("segmentation.tau_buffer must be <= segmentation.tau_core")
