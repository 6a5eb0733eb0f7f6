"""Attention settings: which kind runs, with which implementation, and its pattern sizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KINDS = ("dense", "window", "static_sparse", "block_topk", "caa", "dcw",
         # window family (windows.py)
         "multi_window", "s2attn", "random_global",
         # memory family (memory.py, hyena.py)
         "hierarchical", "compressed_memory", "hyena")
BLOCK_KINDS = ("static_sparse", "block_topk", "caa", "dcw", "multi_window", "s2attn",
               "random_global", "hierarchical", "compressed_memory")
"""Kinds whose pattern is defined on blocks: the packer starts documents at block boundaries."""


@dataclass
class AttentionConfig:
    """Attention pattern of every layer (DESIGN.md, "The attention contract")."""

    kind: Literal[KINDS] = "dense"
    """Pattern: dense causal, sliding window, or one of the block-sparse kinds."""
    impl: Literal["torch", "triton"] = "torch"
    """torch: chunked reference executor; triton: the block-sparse kernel (same semantics)."""
    block_size: int = 64
    """Tokens per block B for block-based kinds (tiers, layouts, kernel tiles)."""
    window: int = 32
    """Sliding window (i - j < window) for `window` and DCW's background tier."""
    buffer_window: int = 64
    """DCW buffer tier's local window."""
    stride: int = 8
    """DCW buffer tier's strided keys: positions = 0 mod stride from the document start."""
    summary_pool: int = 4
    """DCW cross-tier summaries: consecutive core tokens mean-pooled into one summary."""
    num_global: int = 64
    """static_sparse: the first `num_global` tokens of each document are visible to all."""
    topk_blocks: int = 8
    """block_topk: earlier key blocks each query block keeps (besides its diagonal)."""
    caa_windows: list[int] = (256, 512)
    """caa: candidate local windows; one is chosen per input (by its length)."""
    caa_c: float = 1.0
    """caa: global budget k*B = c*sqrt(n) tokens."""
    caa_gate_hidden: int = 64
    """caa: hidden width of the 2-layer sigmoid gate."""
    chunk_size: int = 1024
    """Reference executor: queries processed per chunk (bounds its memory)."""

    # -- window family (windows.py) ------------------------------------------------------------

    # -- memory family (memory.py, hyena.py) ---------------------------------------------------

    def __post_init__(self):
        self.caa_windows = list(self.caa_windows)
        for name in ("block_size", "window", "buffer_window", "stride", "summary_pool",
                     "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"attention.{name} must be >= 1, got {getattr(self, name)}")
        if self.summary_pool > self.block_size or self.block_size % self.summary_pool:
            raise ValueError(
                f"attention.summary_pool ({self.summary_pool}) must divide block_size ({self.block_size})")

    @property
    def block_based(self) -> bool:
        return self.kind in BLOCK_KINDS
