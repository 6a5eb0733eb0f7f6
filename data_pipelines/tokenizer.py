"""Tokenizers: a byte-level one with the special tokens DCW data needs (no training needed).

Special tokens mark instruction / document / answer boundaries so the scorer and the loss
mask can find them.
"""
from __future__ import annotations

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

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def build_tokenizer(name: str):
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer={name!r} is not supported; supported: byte")
