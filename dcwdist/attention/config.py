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
    dcw_background_windows: list[int] = ()
    """DCW background tier as multi-window heads: kv-head groups with these windows (e.g.
    [32, 128, 512]); empty: one `window` for every head. cp = 1 only for now."""
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
    window_schedule: list[int] = ()
    """window / random_global / dcw (background tier): explicit per-layer windows, one per layer
    (empty: window_growth)."""
    window_growth: Literal["none", "linear", "geometric"] = "none"
    """window / random_global / dcw (background tier): per-layer windows from `window` (layer 0)
    to `window_max` (last)."""
    window_max: int = 0
    """The last layer's window under window_growth (>= window)."""
    head_windows: list[int] = (64, 512, 4096)
    """multi_window: one window per kv-head group (len must divide n_kv_heads); seed 004."""
    s2_group: int = 2048
    """s2attn: LongLoRA group size in tokens (multiple of 2 * block_size); half the heads shift."""
    random_blocks: int = 3
    """random_global: random key blocks per query block (before its window, same document)."""
    random_seed: int = 0
    """random_global: the draw is a function of (random_seed, layer, block index in the document)."""

    # -- memory family (memory.py, hyena.py) ---------------------------------------------------
    segment_size: int = 512
    """hierarchical / compressed_memory: tokens per segment from each document's start (x block)."""
    segment_pool: int = 16
    """hierarchical: tokens mean-pooled into one level-1 unit (divides segment_size)."""
    hier_levels: int = 2
    """hierarchical: pooling levels 1..3; level l pools segment_pool * hier_factor**(l-1) tokens."""
    hier_factor: int = 8
    """hierarchical: pool growth from one level to the next coarser one."""
    hier_near: int = 2
    """hierarchical: cells (max(segment_size, pool) tokens) a level reads before the next one."""
    memory_slots: int = 16
    """compressed_memory: slots each segment is compressed into."""
    compressor: Literal["mean", "learned"] = "mean"
    """compressed_memory: mean of segment_size / memory_slots tokens, or learned pooling queries."""
    memory_budget: int = 2048
    """compressed_memory: most recent slots a token reads; older slots are dropped (FIFO)."""
    memory_window: int = 0
    """compressed_memory: local window inside the segment (0: the whole segment, causal)."""
    hyena_filter_hidden: int = 64
    """hyena: hidden width of the implicit filter MLP."""
    hyena_decay_len: int = 4096
    """hyena: slowest filter half-life in tokens (half-lives spread from 1 token to this)."""

    def __post_init__(self):
        self.caa_windows = list(self.caa_windows)
        for name in ("block_size", "window", "buffer_window", "stride", "summary_pool",
                     "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"attention.{name} must be >= 1, got {getattr(self, name)}")
        self.dcw_background_windows = list(self.dcw_background_windows)
        if any(w < 1 for w in self.dcw_background_windows):
            raise ValueError("attention.dcw_background_windows must be >= 1, got "
                             f"{self.dcw_background_windows}")
        if self.summary_pool > self.block_size or self.block_size % self.summary_pool:
            raise ValueError(
                f"attention.summary_pool ({self.summary_pool}) must divide block_size ({self.block_size})")
        # window family
        self.window_schedule, self.head_windows = list(self.window_schedule), list(self.head_windows)
        if min(self.window_schedule + self.head_windows + [1]) < 1 or not self.head_windows:
            raise ValueError("attention.window_schedule / head_windows need windows >= 1 (head_windows "
                             f"non-empty); got {self.window_schedule}, {self.head_windows}")
        if self.window_growth not in ("none", "linear", "geometric"):
            raise ValueError(f"attention.window_growth must be none|linear|geometric, "
                             f"got {self.window_growth!r}")
        per_layer = bool(self.window_schedule) or self.window_growth != "none"
        if per_layer and self.kind not in ("window", "random_global", "dcw"):
            raise ValueError("attention.window_schedule / window_growth apply to kind window, "
                             f"random_global or dcw (its background tier), not {self.kind}")
        if per_layer and self.dcw_background_windows:
            raise ValueError("attention.dcw_background_windows and a per-layer window "
                             "(window_schedule / window_growth) are exclusive: set one")
        if self.window_schedule and self.window_growth != "none":
            raise ValueError("attention.window_schedule and window_growth are exclusive: set one")
        if self.window_growth != "none" and self.window_max < self.window:
            raise ValueError(f"attention.window_max ({self.window_max}) must be >= window "
                             f"({self.window}) with window_growth={self.window_growth}")
        if self.kind == "s2attn" and self.s2_group % (2 * self.block_size):
            raise ValueError(f"attention.s2_group ({self.s2_group}) must be a multiple of "
                             f"2 * block_size ({2 * self.block_size})")
        if min(self.random_blocks, self.random_seed, self.num_global) < 0:
            raise ValueError("attention.random_blocks, random_seed and num_global must be >= 0")
        # memory family
        segmented = self.kind in ("hierarchical", "compressed_memory")
        if segmented and self.segment_size % self.block_size:
            raise ValueError(f"attention.segment_size ({self.segment_size}) must be a multiple "
                             f"of block_size ({self.block_size})")
        if not 1 <= self.hier_levels <= 3:
            raise ValueError(f"attention.hier_levels must be 1, 2 or 3, got {self.hier_levels}")
        for name in ("segment_pool", "hier_factor", "hier_near", "memory_slots", "memory_budget",
                     "hyena_filter_hidden", "hyena_decay_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"attention.{name} must be >= 1, got {getattr(self, name)}")
        pools = [self.segment_pool * self.hier_factor ** i for i in range(self.hier_levels)]
        if self.kind == "hierarchical" and (self.segment_size % self.segment_pool or any(
                p % self.segment_size and self.segment_size % p for p in pools)):
            raise ValueError(f"attention.segment_pool: level pools {pools} must each divide "
                             f"segment_size ({self.segment_size}) or be a multiple of it, "
                             "level 1 dividing it")
        if self.kind == "compressed_memory" and self.segment_size % self.memory_slots:
            raise ValueError(f"attention.memory_slots ({self.memory_slots}) must divide "
                             f"segment_size ({self.segment_size})")

    @property
    def block_based(self) -> bool:
        return self.kind in BLOCK_KINDS
