"""Data: sources, tokenizers, packing, memmap shards, deterministic row streams, synthetic DCW
documents, loaders for the long-context sets, and the `dcwdist data` commands."""
from __future__ import annotations

import hashlib
import json
import os

from dcwdist.data_pipelines.config import DataConfig
from dcwdist.data_pipelines.packing import IGNORE, Batch, pack_row
from dcwdist.data_pipelines.stream import SyntheticRows


def build_rows(cfg: DataConfig, seq_len: int, align: int = 1, held_out: bool = False):
    """Rows for `cfg.source` with `.row(i)` / `.batch(start, n)` by global sample index.

    synthetic: SyntheticRows; memmap: MemmapRows over `cfg.path`; files: `cfg.path` is tokenized
    once into shards under `cfg.cache_dir` (keyed by path, file sizes and times, reader and
    tokenizer), then read as memmap.
    """
    if cfg.source == "synthetic":
        return SyntheticRows(cfg, seq_len, align, held_out=held_out)
    from dcwdist.data_pipelines.shards import INDEX, MemmapRows, prepare_shards
    from dcwdist.data_pipelines.sources import local_files
    from dcwdist.data_pipelines.tokenizer import build_tokenizer
    tok = build_tokenizer(cfg.tokenizer)
    path = cfg.path
    if cfg.source == "files":
        stamp = [cfg.format, tok.hash] + [(os.path.abspath(f), os.path.getsize(f),
                                          int(os.path.getmtime(f))) for f in local_files(path)]
        key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
        path = os.path.join(cfg.cache_dir or os.path.expanduser("~/.cache/dcwdist/shards"), key)
        if not os.path.isfile(os.path.join(path, INDEX)):
            prepare_shards(cfg.path, path, tok, seq_len, fmt=cfg.format)
    return MemmapRows(path, seq_len, align, seed=cfg.seed, shuffle=cfg.shuffle,
                      loss_on=cfg.loss_on, overflow=cfg.overflow, held_out=held_out,
                      eval_fraction=cfg.eval_fraction, tokenizer=tok)


__all__ = ["DataConfig", "Batch", "IGNORE", "pack_row", "SyntheticRows", "build_rows"]
