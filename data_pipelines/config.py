"""Where training rows come from and how they are cut."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Training data: the synthetic DCW generator (files and memmap shards plug in here)."""

    source: Literal["synthetic"] = "synthetic"
    """Row source."""
    tokenizer: str = "byte"
    """Tokenizer name (byte) or a tokenizer.json path."""
    seed: int = 1234
    """Seed of the data stream (independent of the model seed)."""
    min_doc_len: int = 200
    """Shortest synthetic document, in tokens."""
    max_doc_len: int = 0
    """Longest synthetic document; 0 means the stage's sequence length."""
    num_facts: int = 4
    """Key facts planted per document (one is asked about)."""
    specificity: Literal["specific", "keyed", "vague"] = "specific"
    """How precisely the instruction names its key section."""
    loss_on: Literal["all", "answer"] = "all"
    """Next-token loss on every token, or only on answer tokens (prefix setting)."""
    eval_rows: int = 4
    """Held-out rows for the evaluation table."""

    def __post_init__(self):
        if self.min_doc_len < 16:
            raise ValueError(f"data.min_doc_len must be >= 16, got {self.min_doc_len}")
        if self.max_doc_len and self.max_doc_len < self.min_doc_len:
            raise ValueError("data.max_doc_len must be 0 or >= data.min_doc_len")
