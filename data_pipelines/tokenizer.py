"""Tokenizers with the special tokens DCW data needs: byte-level, or BPE via `tokenizers`.

Special tokens mark instruction / document / answer boundaries so the scorer and the loss mask
can find them. Every tokenizer gives `encode_with_offsets(text) -> (ids, [(start, end)])` with
character offsets into `text`, so character-level relevance spans map onto tokens.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator

SPECIALS = ("<pad>", "<bos>", "<eos>", "<instr>", "<doc>", "<answer>")


class ByteTokenizer:
    """UTF-8 bytes 0..255, then the special tokens. Byte offsets are token offsets."""

    name = "byte"

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIALS)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIALS)

    @property
    def pad_id(self) -> int:
        return self.special_ids["<pad>"]

    @property
    def hash(self) -> str:
        return hashlib.sha256(("byte:" + ",".join(SPECIALS)).encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and the [start, end) character span each byte belongs to."""
        ids = self.encode(text)
        if len(ids) == len(text):  # ASCII: one byte per character
            return ids, [(i, i + 1) for i in range(len(text))]
        offsets = []
        for c, ch in enumerate(text):
            offsets += [(c, c + 1)] * len(ch.encode("utf-8"))
        return ids, offsets

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A `tokenizers.Tokenizer` (any tokenizer.json) that holds our special tokens."""

    def __init__(self, tok, name: str = "bpe"):
        self.tok = tok
        self.name = name
        missing = [s for s in SPECIALS if tok.token_to_id(s) is None]
        if missing:  # a foreign tokenizer.json: append our specials to its vocabulary
            tok.add_special_tokens(missing)
        self.special_ids = {s: tok.token_to_id(s) for s in SPECIALS}

    @classmethod
    def from_file(cls, path: str) -> "BPETokenizer":
        from tokenizers import Tokenizer
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        return cls(Tokenizer.from_file(path), name=path)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self.special_ids["<pad>"]

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str) -> None:
        self.tok.save(path)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
              out_path: str | None = None) -> BPETokenizer:
    """Train a byte-level BPE on `texts`; SPECIALS take ids 0..5. Saves to `out_path` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tok.save(out_path)
    return BPETokenizer(tok, name=out_path or "bpe")


def _batched(texts: Iterable[str], n: int = 256) -> Iterator[list[str]]:
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def build_tokenizer(name: str):
    """"byte", or a tokenizer.json (ours from `dcwdist data tokenizer train`, or any other) or a
    folder holding one (e.g. a local Hugging Face model folder)."""
    if name == "byte":
        return ByteTokenizer()
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "tokenizer.json")):
        return BPETokenizer.from_file(os.path.join(name, "tokenizer.json"))
    if name.endswith(".json") or os.path.exists(name):
        return BPETokenizer.from_file(name)
    raise ValueError(f"data.tokenizer={name!r} is not supported; use 'byte' or a tokenizer.json "
                     "path")
