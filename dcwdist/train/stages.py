"""Progressive lengthening: a recipe lists stages of growing sequence length."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dcwdist.model.rope import RopeConfig


@dataclass
class StageConfig:
    """One stage of training at a fixed sequence length."""

    seq_len: int = 4096
    """Tokens per row in this stage."""
    steps: int = 100
    """Optimizer steps in this stage."""
    batch_tokens: int = 0
    """Tokens per optimizer step (all ranks together); 0 means one row per data-parallel rank."""
    micro_batch_size: int = 1
    """Rows per forward/backward on one rank (the rest is gradient accumulation)."""
    cp: int = 0
    """Context-parallel degree for this stage; 0 keeps parallel.cp."""
    rope: Optional[RopeConfig] = None
    """RoPE settings for this stage (e.g. YaRN factor 4 at 4x the length); null keeps the model's."""
    attention: dict = field(default_factory=dict)
    """Attention fields changed in this stage (e.g. {window: 64}); the kind cannot change."""
    data: dict = field(default_factory=dict)
    """Data fields changed in this stage (e.g. {loss_on: all, max_doc_len: 128}); the source
    cannot change."""
    name: str = ""
    """Label in logs; defaults to the sequence length (e.g. 16k)."""

    def __post_init__(self):
        if self.seq_len < 1 or self.steps < 0:
            raise ValueError(f"stage needs seq_len >= 1 and steps >= 0, got {self.seq_len}, {self.steps}")
        if self.batch_tokens and self.batch_tokens % self.seq_len:
            raise ValueError(f"stage batch_tokens ({self.batch_tokens}) must be a multiple of "
                             f"seq_len ({self.seq_len})")
        if self.micro_batch_size < 1:
            raise ValueError("stage micro_batch_size must be >= 1")

    @property
    def label(self) -> str:
        return self.name or human_len(self.seq_len)

    def rows_per_step(self, dp: int) -> int:
        """Rows per optimizer step over all data-parallel ranks."""
        return max(dp, self.batch_tokens // self.seq_len) if self.batch_tokens else dp


def human_len(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
