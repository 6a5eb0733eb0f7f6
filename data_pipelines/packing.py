"""Packing examples into fixed-length rows with document ids, restarting positions and roles.

For block-based attention kinds every document starts at a block boundary: the previous one
is padded (pad tokens carry doc id -1 and no loss).
"""
from __future__ import annotations

import bisect
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


def _relevance(offsets, spans) -> list[float]:
    """1.0 for every token whose character span overlaps one of `spans` ([start, end) chars)."""
    rel = [0.0] * len(offsets)
    if not spans:
        return rel
    starts = [a for a, _ in offsets]
    for s, e in spans:
        i = bisect.bisect_left(starts, s)
        while i > 0 and offsets[i - 1][1] > s:  # a token that begins before s and reaches it
            i -= 1
        while i < len(offsets) and offsets[i][0] < e:
            if offsets[i][1] > s:
                rel[i] = 1.0
            i += 1
    return rel


def encode_example(tok, example) -> Segment:
    """<instr> instruction <doc> document <answer> answer <eos>, with roles and relevance.

    Relevance marks every document token whose character offsets overlap a relevant span
    (for the byte tokenizer on ASCII text that is exactly the span's characters).
    """
    sp = tok.special_ids
    instr = [sp["<instr>"]] + tok.encode(example.instruction)
    doc_ids, offsets = tok.encode_with_offsets(example.document)
    rel_doc = _relevance(offsets, example.relevant_spans)
    doc = [sp["<doc>"]] + doc_ids
    ans = [sp["<answer>"]] + tok.encode(example.answer) + [sp["<eos>"]]
    return Segment(
        tokens=instr + doc + ans,
        roles=[ROLE_INSTRUCTION] * len(instr) + [ROLE_DOCUMENT] * len(doc) + [ROLE_ANSWER] * len(ans),
        relevance=[1.0] * len(instr) + [0.0] + rel_doc + [1.0] * len(ans),
    )


def encode_text(tok, text: str) -> Segment:
    """A plain language-modelling document: text <eos>, all document role, no relevance."""
    ids = tok.encode(text) + [tok.special_ids["<eos>"]]
    return Segment(tokens=ids, roles=[ROLE_DOCUMENT] * len(ids), relevance=[0.0] * len(ids))


def fit_segment(seg: Segment, seq_len: int, overflow: str = "split") -> list[Segment]:
    """Pieces of `seg` that each fit in `seq_len` tokens.

    An example with an answer is truncated: the end of its document is cut so instruction,
    document head and answer stay in one row (split pieces would orphan the answer); it is
    dropped ([]) when instruction + answer alone do not fit. A plain document is split into
    consecutive pieces of `seq_len` tokens (overflow="split"; each piece is packed as its own
    document, positions restarting) or keeps only its first `seq_len` tokens ("truncate").
    """
    if len(seg) <= seq_len:
        return [seg]
    if ROLE_ANSWER in seg.roles:
        cut = len(seg) - seq_len
        doc_idx = [i for i, r in enumerate(seg.roles) if r == ROLE_DOCUMENT]
        if len(doc_idx) < cut + 1:  # keep at least the <doc> marker
            return []
        drop = set(doc_idx[len(doc_idx) - cut:])
        keep = [i for i in range(len(seg)) if i not in drop]
        return [Segment([seg.tokens[i] for i in keep], [seg.roles[i] for i in keep],
                        [seg.relevance[i] for i in keep])]
    stops = range(0, len(seg), seq_len) if overflow == "split" else [0]
    return [Segment(seg.tokens[a:a + seq_len], seg.roles[a:a + seq_len],
                    seg.relevance[a:a + seq_len]) for a in stops]


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


__all__ = ["Batch", "Segment", "encode_example", "encode_text", "fit_segment", "pack_row", "IGNORE",
           "ROLE_DOCUMENT"]
