"""Packing examples into fixed-length rows with document ids, restarting positions and roles.

For block-based attention kinds every document starts at a block boundary: the previous one
is padded (pad tokens carry doc id -1 and no loss).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

import torch

from dcwdist.attention.context import ROLE_ANSWER, ROLE_DOCUMENT, ROLE_INSTRUCTION, ROLE_PAD

IGNORE = -100


@dataclass
class Batch:
    """One batch of packed rows; every tensor is [B, T]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    """Next-token targets; IGNORE where no loss is taken."""
    positions: torch.Tensor
    doc_ids: torch.Tensor
    roles: torch.Tensor
    relevance: torch.Tensor
    """Per-token relevance labels in {0, 1} (float) for the scorer's L_seg."""

    def to(self, device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def slice_rows(self, start: int, end: int) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name)[start:end] for f in fields(self)})

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @staticmethod
    def stack(rows: list["Batch"]) -> "Batch":
        return Batch(**{f.name: torch.cat([getattr(r, f.name) for r in rows])
                        for f in fields(Batch)})


@dataclass
class Segment:
    """One tokenized example: tokens with their role and relevance per token."""

    tokens: list[int]
    roles: list[int]
    relevance: list[float]

    def __len__(self):
        return len(self.tokens)


def encode_example(tok, example) -> Segment:
    """<instr> instruction <doc> document <answer> answer <eos>, with roles and relevance."""
    sp = tok.special_ids
    instr = [sp["<instr>"]] + tok.encode(example.instruction)
    doc_ids = tok.encode(example.document)
    rel_doc = [0.0] * len(doc_ids)
    for s, e in example.relevant_spans:  # byte tokenizer: char offsets are token offsets
        for i in range(s, min(e, len(rel_doc))):
            rel_doc[i] = 1.0
    doc = [sp["<doc>"]] + doc_ids
    ans = [sp["<answer>"]] + tok.encode(example.answer) + [sp["<eos>"]]
    return Segment(
        tokens=instr + doc + ans,
        roles=[ROLE_INSTRUCTION] * len(instr) + [ROLE_DOCUMENT] * len(doc) + [ROLE_ANSWER] * len(ans),
        relevance=[1.0] * len(instr) + [0.0] + rel_doc + [1.0] * len(ans),
    )


def pack_row(segments: Iterable[Segment], seq_len: int, align: int, pad_id: int,
             loss_on: str = "all") -> Batch:
    """Pack segments in order into one row of `seq_len` tokens (B = 1); stops when full.

    loss_on="all": next-token loss on every token of every document; "answer": only where the
    target token is part of the answer (seed 000's prefix setting).
    """
    tokens, roles, rel, pos, docs = [], [], [], [], []
    for d, seg in enumerate(segments):
        if len(tokens) + len(seg) > seq_len:
            break
        tokens += seg.tokens
        roles += seg.roles
        rel += seg.relevance
        pos += list(range(len(seg)))
        docs += [d] * len(seg)
        pad = (-len(tokens)) % align
        pad = min(pad, seq_len - len(tokens))
        tokens += [pad_id] * pad
        roles += [ROLE_PAD] * pad
        rel += [0.0] * pad
        pos += list(range(len(seg), len(seg) + pad))
        docs += [-1] * pad
    pad = seq_len - len(tokens)
    tokens += [pad_id] * pad
    roles += [ROLE_PAD] * pad
    rel += [0.0] * pad
    pos += list(range(pad))
    docs += [-1] * pad
    t = torch.tensor(tokens)[None]
    doc_t = torch.tensor(docs)[None]
    role_t = torch.tensor(roles)[None]
    labels = torch.full_like(t, IGNORE)
    same = (doc_t[:, 1:] == doc_t[:, :-1]) & (doc_t[:, 1:] >= 0)
    if loss_on == "answer":
        same &= role_t[:, 1:] == ROLE_ANSWER
    labels[:, :-1] = torch.where(same, t[:, 1:], torch.full_like(t[:, 1:], IGNORE))
    return Batch(tokens=t, labels=labels, positions=torch.tensor(pos)[None], doc_ids=doc_t,
                 roles=role_t, relevance=torch.tensor(rel)[None])


__all__ = ["Batch", "Segment", "encode_example", "pack_row", "IGNORE", "ROLE_DOCUMENT"]
