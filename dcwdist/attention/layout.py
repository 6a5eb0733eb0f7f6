"""Block layouts: which key blocks each query block reads, and with which token mask.

A layout is CSR over rows r = (b * G + g) * NQ + qb  (b batch, g layout head group, qb query
block): entries indptr[r] .. indptr[r+1] name key blocks and a mask mode each. The token mask
inside a (query block, key block) tile is decided from positions, so the same layout drives a
query set against the full key sequence and against compact key sets (gathered strided keys,
pooled summaries, top-k blocks):

    delta = q_pos[i] - k_pos[j]
    MODE_FULL    every pair
    MODE_CAUSAL  delta >= 0
    MODE_WINDOW  0 <= delta < window
    MODE_FAR     delta >= far            (strided keys outside the buffer window)
and, when q_doc / k_doc are given, q_doc[i] == k_doc[j] (and k_doc[j] >= 0: -1 marks padding).

window / far are the layout's defaults for every entry. An optional per-entry `entry_bound`
(int32 [nnz]) overrides them entry by entry: the window width of a MODE_WINDOW entry, the
minimum distance of a MODE_FAR entry (ignored for MODE_FULL / MODE_CAUSAL). One layout can so
hold rows with different windows (e.g. DCW background rows with window 32 and buffer rows with
window 64) in one kernel launch. Code that selects or permutes a layout's entries must index
entry_bound with the same entry index as kv_block / mode.

G is 1 when every head shares the pattern (DCW), or Hkv when kv-head groups differ
(block_topk); query head h uses group h // (H // G).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

MODE_FULL, MODE_CAUSAL, MODE_WINDOW, MODE_FAR = 0, 1, 2, 3


@dataclass
class BlockLayout:
    """CSR over query-block rows of (key block, mode[, bound]) entries: see the module docstring.
    Every entry reads `window` / `far` unless `entry_bound` gives its own."""

    indptr: torch.Tensor
    """int64 [B * G * NQ + 1] CSR row pointers."""
    kv_block: torch.Tensor
    """int32 [nnz] key block index of each entry (into the key set this layout is used with)."""
    mode: torch.Tensor
    """int8 [nnz] MODE_* of each entry."""
    batch: int
    groups: int
    num_q_blocks: int
    num_k_blocks: int
    q_block: int
    """Tokens per query block."""
    k_block: int
    """Tokens per key block."""
    q_pos: torch.Tensor
    """int64 [B, NQ * q_block] position of each query token (row index for plain sequences)."""
    k_pos: torch.Tensor
    """int64 [B, NK * k_block] position of each key token."""
    window: int = 0
    """MODE_WINDOW width."""
    far: int = 0
    """MODE_FAR minimum distance."""
    q_doc: Optional[torch.Tensor] = None
    """int64 [B, Tq] document of each query token, or None (no document test)."""
    k_doc: Optional[torch.Tensor] = None
    """int64 [B, Tk] document of each key token (-1: padding, never attended)."""
    entry_bound: Optional[torch.Tensor] = None
    """int32 [nnz] parameter of each entry's mode, or None (every entry uses window / far):
    the window width of MODE_WINDOW entries, the minimum distance of MODE_FAR entries; ignored
    for MODE_FULL / MODE_CAUSAL entries. Selected / permuted together with kv_block and mode."""

    def __post_init__(self):
        if self.entry_bound is not None and self.entry_bound.shape != self.kv_block.shape:
            raise ValueError(f"entry_bound must be [nnz] = {tuple(self.kv_block.shape)}, "
                             f"got {tuple(self.entry_bound.shape)}")

    @property
    def nnz(self) -> int:
        return int(self.kv_block.numel())

    def row_index(self, b: int, g: int, qb: int) -> int:
        return (b * self.groups + g) * self.num_q_blocks + qb

    def row_entries(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries of CSR rows [R] (any order): (index into `rows` of each entry, entry index),
        grouped by `rows` order -- the pieces of a sub-layout over those rows."""
        start, count = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        new_row = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), count)
        first = torch.cumsum(count, 0) - count  # first entry of each row in the output
        off = torch.arange(new_row.numel(), device=rows.device) - first[new_row]
        return new_row, start[new_row] + off

    def transpose(self) -> "TransposedLayout":
        """For each key block, the query blocks that read it (for the dK/dV pass), in CSR."""
        rows = torch.repeat_interleave(
            torch.arange(self.indptr.numel() - 1, device=self.indptr.device),
            self.indptr[1:] - self.indptr[:-1])
        bg = rows // self.num_q_blocks
        qb = rows % self.num_q_blocks
        col_row = bg * self.num_k_blocks + self.kv_block.long()
        order = torch.argsort(col_row * self.num_q_blocks + qb, stable=True)
        counts = torch.bincount(col_row, minlength=self.batch * self.groups * self.num_k_blocks)
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
        indptr[1:] = torch.cumsum(counts, 0)
        return TransposedLayout(
            indptr=indptr, q_block_idx=qb[order].to(torch.int32), mode=self.mode[order],
            forward=self, bound=None if self.entry_bound is None else self.entry_bound[order])

    def token_mask(self) -> torch.Tensor:
        """Dense bool mask [B, G, Tq, Tk] implied by the layout (tests and small sizes only)."""
        B, G, NQ = self.batch, self.groups, self.num_q_blocks
        Tq, Tk = NQ * self.q_block, self.num_k_blocks * self.k_block
        dev = self.indptr.device
        block_mask = torch.zeros(B, G, NQ, self.num_k_blocks, dtype=torch.int8, device=dev) - 1
        rows = torch.repeat_interleave(torch.arange(B * G * NQ, device=dev),
                                       self.indptr[1:] - self.indptr[:-1])
        block_mask.view(-1, self.num_k_blocks)[rows, self.kv_block.long()] = self.mode
        expand = lambda x: x.repeat_interleave(self.q_block, 2).repeat_interleave(  # noqa: E731
            self.k_block, 3)
        tile = expand(block_mask)
        window, far = self.window, self.far
        if self.entry_bound is not None:  # per-tile window / far
            bound = torch.zeros(B, G, NQ, self.num_k_blocks, dtype=torch.int64, device=dev)
            bound.view(-1, self.num_k_blocks)[rows, self.kv_block.long()] = \
                self.entry_bound.long()
            window = far = expand(bound)
        delta = self.q_pos[:, None, :, None] - self.k_pos[:, None, None, :]
        allowed = ((tile == MODE_FULL)
                   | ((tile == MODE_CAUSAL) & (delta >= 0))
                   | ((tile == MODE_WINDOW) & (delta >= 0) & (delta < window))
                   | ((tile == MODE_FAR) & (delta >= far)))
        if self.q_doc is not None and self.k_doc is not None:
            same = (self.q_doc[:, :, None] == self.k_doc[:, None, :]) & (self.k_doc[:, None, :] >= 0)
            allowed &= same[:, None]
        return allowed[..., :Tq, :Tk]

    def to(self, device) -> "BlockLayout":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, indptr=move(self.indptr), kv_block=move(self.kv_block),
                       mode=move(self.mode), q_pos=move(self.q_pos), k_pos=move(self.k_pos),
                       q_doc=move(self.q_doc), k_doc=move(self.k_doc),
                       entry_bound=move(self.entry_bound))


@dataclass
class TransposedLayout:
    """CSR over (b, g, key block): the query blocks reading that key block, with their modes."""

    indptr: torch.Tensor
    """int64 [B * G * NK + 1]."""
    q_block_idx: torch.Tensor
    """int32 [nnz]."""
    mode: torch.Tensor
    """int8 [nnz]."""
    forward: BlockLayout
    bound: Optional[torch.Tensor] = None
    """int32 [nnz] forward.entry_bound in this order (None when the forward layout has none)."""
