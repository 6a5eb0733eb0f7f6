"""Deterministic row streams: row k of a stream depends only on (seed, k, seq_len).

That makes the data position a single global sample index: resume, a changed data-parallel
degree, or a new stage simply continue from it.
"""
from __future__ import annotations

import math

import numpy as np

from dcwdist.data_pipelines.config import DataConfig
from dcwdist.data_pipelines.packing import Batch, encode_example, pack_row
from dcwdist.data_pipelines.synthetic import make_example
from dcwdist.data_pipelines.tokenizer import build_tokenizer

EVAL_SEED_OFFSET = 10_000_019  # held-out rows come from a disjoint seed


class SyntheticRows:
    """Rows of packed synthetic examples for one sequence length."""

    def __init__(self, cfg: DataConfig, seq_len: int, align: int = 1, held_out: bool = False):
        self.cfg = cfg
        self.seq_len = seq_len
        self.align = align
        self.tok = build_tokenizer(cfg.tokenizer)
        self.seed = cfg.seed + (EVAL_SEED_OFFSET if held_out else 0)
        overhead = 96  # instruction + answer + specials, roughly
        self.max_chars = max(16, min(cfg.max_doc_len or seq_len, seq_len) - overhead)
        self.min_chars = min(cfg.min_doc_len, self.max_chars)

    def row(self, index: int) -> Batch:
        rng = np.random.default_rng([self.seed, self.seq_len, index])
        segments, used, slot = [], 0, 0
        while True:
            room = self.seq_len - used - 96
            if room < self.min_chars:
                break
            hi = min(self.max_chars, room)
            if self.cfg.doc_len_dist == "loguniform":
                n_chars = int(round(math.exp(rng.uniform(math.log(self.min_chars),
                                                         math.log(hi)))))
            else:
                n_chars = int(rng.integers(self.min_chars, hi + 1))
            # The generator overshoots its target by up to a few sentences: shrink and retry.
            for _ in range(16):
                ex = make_example(self.seed, index * 1000 + slot, n_chars, self.cfg.num_facts,
                                  self.cfg.specificity, style=self.cfg.generator,
                                  hops=self.cfg.hops)
                seg = encode_example(self.tok, ex)
                over = used + len(seg) - self.seq_len
                if over <= 0 or n_chars <= 16:
                    break
                n_chars = max(16, n_chars - over - 16)
            if used + len(seg) > self.seq_len:
                break
            segments.append(seg)
            used += len(seg) + (-len(seg)) % self.align
            slot += 1
        if not segments:
            raise ValueError(f"sequence length {self.seq_len} is too short for one document "
                             f"(data.min_doc_len={self.cfg.min_doc_len})")
        return pack_row(segments, self.seq_len, self.align, self.tok.pad_id, self.cfg.loss_on)

    def batch(self, start: int, batch_size: int) -> Batch:
        """Rows start .. start + batch_size - 1, stacked."""
        return Batch.stack([self.row(start + i) for i in range(batch_size)])
