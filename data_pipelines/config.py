"""Where training rows come from and how they are cut."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Training data: the synthetic DCW generator, prepared memmap shards, or local files."""

    source: Literal["synthetic", "memmap", "files"] = "synthetic"
    """Row source: synthetic generator, a shard folder (`dcwdist data prepare`), or local files."""
    path: str = ""
    """memmap: the shard folder; files: a local json/jsonl/parquet/text/tsv file or folder."""
    format: Literal["records", "cuad", "legalbench", "scrolls", "leval",
                    "natural_questions"] = "records"
    """How `files` are read: our record schema or one of the long-context sets' layouts."""
    cache_dir: str = ""
    """Parent of the shards tokenized from `files` (one <hash> folder each); empty: ~/.cache."""
    shuffle: bool = True
    """Shuffle memmap/files rows per epoch by `seed` (False: corpus order)."""
    overflow: Literal["split", "truncate"] = "split"
    """Plain documents longer than a row: split into row-sized pieces, or keep the first row."""
    eval_fraction: float = 0.01
    """memmap/files: fraction of documents (the last ones) held out for evaluation rows."""
    generator: Literal["basic", "rich", "copy"] = "basic"
    """Synthetic documents: basic fact sentences, rich (clauses, value tables, genres), or copy
    (a random 8-32 character code in filler, answered by repeating it: a first stage of these
    teaches copying from context; see data_pipelines/synthetic.py copy_example)."""
    hops: int = 1
    """Synthetic questions: 1 = single hop; 2..4 = chains of cross-references."""
    tokenizer: str = "byte"
    """Tokenizer name (byte) or a tokenizer.json path."""
    seed: int = 1234
    """Seed of the data stream (independent of the model seed)."""
    min_doc_len: int = 200
    """Shortest synthetic document, in tokens."""
    max_doc_len: int = 0
    """Longest synthetic document; 0 means the stage's sequence length."""
    doc_len_dist: Literal["uniform", "loguniform"] = "uniform"
    """How synthetic document lengths are drawn between min_doc_len and the room left in the
    row. loguniform makes short documents common: about twice the questions per 8k row, and
    fact-to-answer distances spread over every scale up to the row length."""
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
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 1 <= self.hops <= 4:
            raise ValueError(f"data.hops must be in 1..4, got {self.hops}")
