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
    tau_core: float = 0.2
    """causal mode: score at or above which the next block is core (within the cap). Low on
    purpose: relevant tokens are rare, so a BCE-trained scorer rarely outputs high scores."""
    tau_buffer: float = 0.1
    """causal mode: score at or above which the next block is buffer (within the cap)."""
    scorer: Literal["learned", "oracle"] = "learned"
    """learned: the instruction-aware scorer; oracle: scores are the relevance labels
    themselves (the upper bound of a perfect scorer; needs labelled data, also at eval)."""
    scorer_layers: int = 4
    """Scorer encoder depth."""
    scorer_dim: int = 128
    """Scorer width."""
    scorer_heads: int = 4
    """Scorer attention heads."""
    scorer_window: int = 128
    """Scorer's windowed attention span (keeps it O(n))."""
    scorer_checkpointing: bool = True
    """Recompute each scorer encoder layer in backward (training): the scorer keeps one [T,
    scorer_dim] input per layer instead of ~20 (about 20 GiB at 1M tokens), for one more
    forward of a model ~1% of the main one's FLOPs."""
    answer_core: bool = False
    """causal mode: blocks holding an instruction or answer token are core (full-prefix
    attention), outside the running cap, as prefix mode always does. Generation decodes answer
    tokens with dense attention over the cache, so this makes training see what decoding does.
    The quality study turns it on: on CPU it let DCW retrieve facts 256-2048 tokens away at 2k
    (trial 8 in benchmarks/results/quality.md, two seeds); the GPU trial 9 did not confirm it.
    Off by default: on the CPU demo (80 steps, loss on every token) it raised the eval loss
    from 1.31 to 1.46. false: those blocks are tiered by score like any other."""
    cap_slack: float = 1.0
    """causal mode: blocks of headroom the running cap allows above ratio * prefix blocks."""
    summary_source: Literal["tier", "content"] = "tier"
    """Which blocks' pooled summaries later non-core blocks read (DCW's cross-tier residual).
    tier: the core-tier blocks (as before). content: causal mode only: the core-tier blocks plus
    the blocks whose OWN content the scorer finds relevant, judged at each block's last token
    (a second scorer output, trained on "a relevant token lies in this block"; admitted at
    tau_core under the core tier's running cap), so a fact block can serve later blocks'
    summaries even though its own tier was decided before it was seen. Causal-safe: only
    strictly later blocks read a block's summary."""
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
        for name in ("scorer_layers", "scorer_dim", "scorer_heads", "scorer_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"segmentation.{name} must be >= 1, got {getattr(self, name)}")
        if self.scorer_dim % self.scorer_heads or (self.scorer_dim // self.scorer_heads) % 2:
            raise ValueError(f"segmentation.scorer_dim ({self.scorer_dim}) must split into "
                             f"scorer_heads ({self.scorer_heads}) heads of even width")
        if self.summary_source == "content" and self.mode != "causal":
            raise ValueError("segmentation.summary_source=content needs segmentation.mode=causal "
                             f"(got mode={self.mode}; prefix mode already scores blocks by their "
                             "own content)")
        if self.cap_slack < 0:
            raise ValueError(f"segmentation.cap_slack must be >= 0, got {self.cap_slack}")
        if min(self.lambda_seg, self.lambda_eff) < 0 or not 0 < self.eff_target <= 1:
            raise ValueError("segmentation.lambda_seg/lambda_eff must be >= 0 and eff_target "
                             f"in (0, 1], got {self.lambda_seg}, {self.lambda_eff}, "
                             f"{self.eff_target}")
