"""Pre-tokenized memmap shards: `prepare_shards` writes them, `MemmapRows` packs rows from them.

A shard folder holds index.json (counts, tokenizer name and hash, shard list) and per shard
`shard_NNNNN.{tokens,roles,relevance}.bin` (flat token / ROLE_* / {0,1} arrays) plus
`shard_NNNNN.offsets.npy` (int64 document offsets, num_docs + 1). Whole documents are stored;
rows are planned at load time for the stage's sequence length and block alignment, so one
prepared corpus serves every progressive stage.

Rows are a pure function of the global sample index i: epoch i // R, row perm_epoch[i % R]
(R rows per epoch, permutation seeded by (seed, epoch)). A data-parallel rank reads a disjoint,
contiguous slice of each global batch (`rank_slice`), so resuming with another dp degree continues
at the same data position.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from dcwdist.attention.context import ROLE_ANSWER
from dcwdist.data_pipelines.packing import (Batch, Segment, encode_example, encode_text,
                                            fit_segment, pack_row)
from dcwdist.data_pipelines.sources import DataError, local_files
from dcwdist.data_pipelines.tokenizer import build_tokenizer

INDEX = "index.json"
FORMAT = "dcwdist-shards-v1"
_FILES = (("tokens", None), ("roles", np.uint8), ("relevance", np.uint8))


def _append(shard_files: dict, seg: Segment, dtype) -> None:
    shard_files["tokens"].write(np.asarray(seg.tokens, dtype=dtype).tobytes())
    shard_files["roles"].write(np.asarray(seg.roles, dtype=np.uint8).tobytes())
    shard_files["relevance"].write((np.asarray(seg.relevance) > 0.5).astype(np.uint8).tobytes())


def prepare_shards(src: str, out: str, tokenizer="byte", seq_len: int = 4096, *,
                   fmt: str = "records", shard_tokens: int = 1 << 26,
                   progress: bool = True) -> dict:
    """Tokenize the local source `src` (read as `fmt`, see loaders.FORMATS) into shards at `out`.

    `seq_len` is recorded with the number of rows it packs to and the count of documents longer
    than it; documents are stored whole. Written into a temporary folder and renamed, so a
    folder with an index.json is always complete. Returns the index.
    """
    from tqdm import tqdm

    from dcwdist.data_pipelines.loaders import iter_source
    local_files(src)  # a missing path fails here, before any output is started
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".shards-", dir=parent)
    shards, lengths, examples, files, offsets = [], [], [], None, []

    def close():
        for fh in files.values():
            fh.close()
        name = shards[-1]["name"]
        np.save(os.path.join(tmp, f"{name}.offsets.npy"), np.asarray(offsets, dtype=np.int64))
        shards[-1].update(num_docs=len(offsets) - 1, num_tokens=int(offsets[-1]))

    try:
        bar = tqdm(iter_source(src, fmt), unit="doc", disable=not progress,
                   desc=f"tokenizing {os.path.basename(os.path.normpath(src))}")
        for item in bar:
            seg = encode_text(tok, item) if isinstance(item, str) else encode_example(tok, item)
            if files is None or (offsets[-1] and offsets[-1] + len(seg) > shard_tokens):
                if files is not None:
                    close()
                shards.append({"name": f"shard_{len(shards):05d}"})
                files = {k: open(os.path.join(tmp, f"{shards[-1]['name']}.{k}.bin"), "wb")
                         for k, _ in _FILES}
                offsets = [0]
            _append(files, seg, dtype)
            offsets.append(offsets[-1] + len(seg))
            lengths.append(len(seg))
            examples.append(not isinstance(item, str))
            bar.set_postfix(tokens=sum(s.get("num_tokens", 0) for s in shards) + offsets[-1],
                            refresh=False)
        if files is None:
            raise DataError(f"{src}: no documents")
        close()
        index = {
            "format": FORMAT, "source": os.path.abspath(src), "reader": fmt,
            "tokenizer": {"name": tok.name, "hash": tok.hash, "vocab_size": tok.vocab_size,
                          "pad_id": tok.pad_id},
            "dtype": np.dtype(dtype).name, "num_docs": len(lengths),
            "num_tokens": int(sum(lengths)), "seq_len": seq_len,
            "num_rows": len(_plan(_pieces(lengths, examples, seq_len), seq_len, 1)),
            "docs_longer_than_seq_len": sum(n > seq_len for n in lengths), "shards": shards}
        with open(os.path.join(tmp, INDEX), "w") as fh:
            json.dump(index, fh, indent=1)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _pieces(lengths, examples, seq_len: int) -> list:
    """Pieces (doc, start, end, truncate) as MemmapRows plans them with overflow="split"."""
    out = []
    for d, (n, ex) in enumerate(zip(lengths, examples)):
        if n <= seq_len or ex:
            out.append((d, 0, n, n > seq_len))
        else:
            out += [(d, x, min(x + seq_len, n), False) for x in range(0, n, seq_len)]
    return out


def _plan(pieces: list, seq_len: int, align: int) -> list[int]:
    """Greedy packing of pieces in order, as pack_row does: the first piece index of each row."""
    starts, used = [], seq_len + 1
    for p, (_, a, b, trunc) in enumerate(pieces):
        n = seq_len if trunc else b - a
        if used + n > seq_len:
            starts.append(p)
            used = 0
        used = min(seq_len, used + n + (-(used + n)) % align)
    return starts


def rank_slice(start: int, global_rows: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """(first sample index, rows) of dp rank `dp_rank`'s share of the global batch at `start`."""
    if global_rows % dp_size:
        raise ValueError(f"global batch of {global_rows} rows does not split over dp={dp_size}")
    per = global_rows // dp_size
    return start + dp_rank * per, per


class MemmapRows:
    """Packed rows from a shard folder; `.row(i)` / `.batch(start, n)` by global sample index."""

    def __init__(self, path: str, seq_len: int, align: int = 1, *, seed: int = 0,
                 shuffle: bool = True, loss_on: str = "all", overflow: str = "split",
                 held_out: bool = False, eval_fraction: float = 0.01, tokenizer=None):
        index_path = os.path.join(path, INDEX)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{path!r} is not a shard folder (no {INDEX}); write one "
                                    "with `dcwdist data prepare`")
        with open(index_path) as fh:
            self.index = json.load(fh)
        if self.index.get("format") != FORMAT:
            raise DataError(f"{index_path}: format {self.index.get('format')!r}, not {FORMAT}")
        if tokenizer is not None:
            tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
            if tok.hash != self.index["tokenizer"]["hash"]:
                raise DataError(f"{path}: shards were tokenized with "
                                f"{self.index['tokenizer']['name']!r}, not {tok.name!r} "
                                "(tokenizer hashes differ)")
        self.seq_len, self.align, self.seed, self.shuffle = seq_len, align, seed, shuffle
        self.loss_on, self.pad_id = loss_on, self.index["tokenizer"]["pad_id"]
        dtype = np.dtype(self.index["dtype"])
        self.arrays, docs = [], []
        for s, sh in enumerate(self.index["shards"]):
            base = os.path.join(path, sh["name"])
            arr = {k: np.memmap(f"{base}.{k}.bin", dtype=dt or dtype, mode="r")
                   if sh["num_tokens"] else np.zeros(0, dt or dtype) for k, dt in _FILES}
            self.arrays.append(arr)
            off = np.load(f"{base}.offsets.npy")
            docs += [(s, int(a), int(b)) for a, b in zip(off[:-1], off[1:])]
        num_eval = max(1, round(len(docs) * eval_fraction)) if eval_fraction > 0 else 0
        num_eval = num_eval if len(docs) > 1 else 0  # a one-document corpus trains on it
        self.docs = docs[len(docs) - num_eval:] if held_out else docs[:len(docs) - num_eval]
        if not self.docs:
            raise DataError(f"{path}: no {'held-out' if held_out else 'training'} documents "
                            f"(data.eval_fraction={eval_fraction})")
        self.pieces = []  # (doc, start, end, truncate-to-seq_len)
        for d, (s, a, b) in enumerate(self.docs):
            if b - a <= seq_len:
                self.pieces.append((d, 0, b - a, False))
            elif ROLE_ANSWER in self.arrays[s]["roles"][a:b]:
                if fit_segment(self._segment(d, 0, b - a), seq_len):  # else it cannot fit
                    self.pieces.append((d, 0, b - a, True))
            else:
                stops = range(0, b - a, seq_len) if overflow == "split" else [0]
                self.pieces += [(d, x, min(x + seq_len, b - a), False) for x in stops]
        if not self.pieces:
            raise DataError(f"{path}: no document fits in {seq_len} tokens")
        self.row_starts = _plan(self.pieces, seq_len, align) + [len(self.pieces)]
        self._perm = (-1, None)

    def __len__(self) -> int:
        """Rows per epoch."""
        return len(self.row_starts) - 1

    def _segment(self, d: int, x: int, y: int) -> Segment:
        s, a, _ = self.docs[d]
        arr = self.arrays[s]
        return Segment(arr["tokens"][a + x:a + y].astype(np.int64).tolist(),
                       arr["roles"][a + x:a + y].astype(np.int64).tolist(),
                       arr["relevance"][a + x:a + y].astype(np.float32).tolist())

    def row_id(self, index: int) -> int:
        """The planned row that global sample `index` reads."""
        epoch, j = divmod(index, len(self))
        if not self.shuffle:
            return j
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        return int(self._perm[1][j])

    def row(self, index: int) -> Batch:
        r = self.row_id(index)
        segs = []
        for d, x, y, trunc in self.pieces[self.row_starts[r]:self.row_starts[r + 1]]:
            seg = self._segment(d, x, y)
            segs += fit_segment(seg, self.seq_len) if trunc else [seg]
        return pack_row(segs, self.seq_len, self.align, self.pad_id, self.loss_on)

    def batch(self, start: int, batch_size: int) -> Batch:
        """Rows start .. start + batch_size - 1, stacked."""
        return Batch.stack([self.row(start + i) for i in range(batch_size)])

    def rank_batch(self, start: int, global_rows: int, dp_rank: int, dp_size: int) -> Batch:
        """This dp rank's disjoint share of the global batch beginning at sample `start`."""
        return self.batch(*rank_slice(start, global_rows, dp_rank, dp_size))
