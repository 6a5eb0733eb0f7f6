"""Vectorised BlockLayout builders from document ids, tiers and block choices.

Shapes: doc_BT [B, T] (-1 padding); blocks of `blk` tokens, NQ = ceil(T / blk). Every builder
works on whole tensors (no Python loop over blocks): each CSR row is a contiguous range of key
blocks (local, causal, compact strided/global/summary sets) or a padded candidate list (top-k).
Positions in layouts are token indices of the row; the document test (q_doc / k_doc) keeps every
pattern inside its document, so a packed row computes what each document computes alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dcwdist.attention.layout import MODE_CAUSAL, MODE_FAR, MODE_FULL, MODE_WINDOW, BlockLayout

ROW_NONE, ROW_CAUSAL, ROW_WINDOW = 0, 1, 2
"""What a query block of a local layout reads: nothing, its document's prefix, or a window."""


def pad_doc(doc_BT: torch.Tensor, blk: int) -> torch.Tensor:
    """Pad doc ids with -1 to a whole number of blocks."""
    return F.pad(doc_BT, (0, (-doc_BT.shape[1]) % blk), value=-1)


def doc_start(doc_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the first token of each token's document (run of equal ids)."""
    B, T = doc_BT.shape
    t = torch.arange(T, device=doc_BT.device).expand(B, T)
    new = torch.ones_like(doc_BT, dtype=torch.bool)
    new[:, 1:] = doc_BT[:, 1:] != doc_BT[:, :-1]
    return torch.cummax(torch.where(new, t, torch.zeros_like(t)), dim=1).values


def doc_position(doc_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] position counted from the document start (the contract's strided/global origin)."""
    return torch.arange(doc_BT.shape[1], device=doc_BT.device) - doc_start(doc_BT)


def ranges_to_csr(lo: torch.Tensor, hi: torch.Tensor):
    """Rows [R] reading key blocks lo..hi (empty if hi < lo) -> (indptr, kv_block, row of entry)."""
    count = (hi - lo + 1).clamp_min(0)
    indptr = F.pad(torch.cumsum(count, 0), (1, 0))
    rows = torch.repeat_interleave(torch.arange(lo.numel(), device=lo.device), count)
    kv = lo[rows] + torch.arange(rows.numel(), device=lo.device) - indptr[rows]
    return indptr, kv, rows


def _make(indptr, kv, mode, B, G, NQ, NK, qb, kb, q_pos, k_pos, q_doc, k_doc, window=0, far=0):
    return BlockLayout(indptr=indptr, kv_block=kv.to(torch.int32), mode=mode.to(torch.int8),
                       batch=B, groups=G, num_q_blocks=NQ, num_k_blocks=NK, q_block=qb,
                       k_block=kb, q_pos=q_pos, k_pos=k_pos, window=window, far=far,
                       q_doc=q_doc, k_doc=k_doc)


def _block_bounds(doc_BT: torch.Tensor, blk: int):
    """Padded doc ids, token index, first token's doc start and last token of every block."""
    doc = pad_doc(doc_BT, blk)
    B, T = doc.shape
    NQ = T // blk
    pos = torch.arange(T, device=doc.device).expand(B, T)
    first = torch.arange(NQ, device=doc.device) * blk
    start = doc_start(doc)[:, first]  # [B, NQ]
    live = (doc.view(B, NQ, blk) >= 0).any(-1)  # blocks with at least one real token
    return doc, pos, start, first + blk - 1, live


def local_layout(doc_BT: torch.Tensor, blk: int, row_kind: Optional[torch.Tensor] = None,
                 window: int = 0) -> BlockLayout:
    """Causal prefix (ROW_CAUSAL) or sliding window (ROW_WINDOW) over the full sequence.

    row_kind [B, NQ]; None means every block ROW_CAUSAL (dense). Causal rows read FULL blocks of
    their document's prefix and a CAUSAL diagonal; window rows read WINDOW blocks that can hold
    i - window + 1 .. i of the block's first .. last token.
    """
    doc, pos, start, _, live = _block_bounds(doc_BT, blk)
    B, NQ = start.shape
    qb_idx = torch.arange(NQ, device=doc.device).expand(B, NQ)
    if row_kind is None:
        row_kind = torch.full_like(qb_idx, ROW_CAUSAL)
    lo_tok = torch.where(row_kind == ROW_WINDOW,
                         torch.maximum(start, qb_idx * blk - window + 1), start)
    hi = torch.where((row_kind == ROW_NONE) | ~live, -1, qb_idx)
    indptr, kv, rows = ranges_to_csr((lo_tok // blk).reshape(-1), hi.reshape(-1))
    kind = row_kind.reshape(-1)[rows]
    diag = kv == qb_idx.reshape(-1)[rows]
    mode = torch.where(kind == ROW_WINDOW, MODE_WINDOW,
                       torch.where(diag, MODE_CAUSAL, MODE_FULL))
    return _make(indptr, kv, mode, B, 1, NQ, NQ, blk, blk, pos, pos, doc, doc, window=window)


def compact_far_layout(doc_BT: torch.Tensor, blk: int, select_BT: torch.Tensor,
                       rows_BN: torch.Tensor, far: int) -> tuple[BlockLayout, torch.Tensor]:
    """Selected tokens gathered into a compact key set, read by rows_BN where j <= i - far.

    Used for DCW's strided keys (far = buffer_window) and static_sparse's global tokens
    (far = window): MODE_FAR makes them disjoint from the local window, so the two partial
    softmaxes merge by LSE. Returns (layout over the compact set, gather index [B, S] into T);
    compact slots past a row's count gather token 0 and carry k_doc -1 (never attended).
    Documents start at block boundaries (block-based kinds), so a row's document is its first
    token's and its compact keys are one contiguous range.
    """
    doc, pos, start, last, live = _block_bounds(doc_BT, blk)
    B, T = doc.shape
    NQ = start.shape[1]
    select = F.pad(select_BT, (0, T - select_BT.shape[1]), value=False) & (doc >= 0)
    count = select.sum(1)
    S = max(1, -(-int(count.max()) // blk)) * blk
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)  # selected first, in order
    order = F.pad(order, (0, max(0, S - T)))[:, :S]
    slot_ok = torch.arange(S, device=doc.device)[None] < count[:, None]
    gather = torch.where(slot_ok, order, torch.zeros_like(order))
    k_doc = torch.where(slot_ok, doc.gather(1, gather), torch.full_like(gather, -1))
    cum = F.pad(torch.cumsum(select.long(), 1), (1, 0))  # cum[:, t] = selected tokens before t
    lo = cum.gather(1, start)
    hi = cum.gather(1, (last - far + 1).clamp_min(0).expand(B, NQ)) - 1
    hi = torch.where(rows_BN & live, hi, torch.full_like(hi, -1))
    lo_b, hi_b = lo // blk, torch.where(hi >= lo, hi // blk, torch.full_like(hi, -1))
    indptr, kv, _ = ranges_to_csr(lo_b.reshape(-1), hi_b.reshape(-1))
    mode = torch.full_like(kv, MODE_FAR)
    layout = _make(indptr, kv, mode, B, 1, NQ, S // blk, blk, blk, pos, gather, doc, k_doc,
                   far=far)
    return layout, gather


def doc_length_per_block(doc_BT: torch.Tensor, blk: int) -> torch.Tensor:
    """[B, NQ] real-token length of the document each block belongs to (its first token's)."""
    doc = pad_doc(doc_BT, blk)
    start = doc_start(doc)
    count = torch.zeros_like(doc).scatter_add_(1, start, (doc >= 0).long())
    return count.gather(1, start)[:, ::blk]


def topk_layout(doc_BT: torch.Tensor, blk: int, score_BGNN: torch.Tensor, k) -> BlockLayout:
    """Per (row, group, query block): top-k earlier same-document key blocks + causal diagonal.

    k: an int, or [B, NQ] per query block (CAA sizes k by each document's length).

    score_BGNN [B, G, NQ, NK] is the block-selection score (no gradient: the choice is discrete);
    ties break towards the lower block index (torch.topk on a score nudged by index would alter
    values, so ties are left to topk's order and the result is sorted by block).
    """
    doc, pos, start, _, live = _block_bounds(doc_BT, blk)
    B, G, NQ, _ = score_BGNN.shape
    dev = doc.device
    qb_idx = torch.arange(NQ, device=dev)
    first_blk = (start // blk)[:, None, :, None]  # [B, 1, NQ, 1]
    kb_idx = qb_idx[None, None, None, :]
    eligible = (kb_idx < qb_idx[None, None, :, None]) & (kb_idx >= first_blk)
    masked = score_BGNN.detach().float().masked_fill(~eligible, float("-inf"))
    k_row = torch.as_tensor(k, device=dev).expand(B, NQ)
    kk = min(int(k_row.max()), NQ)
    top_val, top_idx = torch.topk(masked, kk, dim=-1) if kk > 0 else (masked[..., :0],) * 2
    keep = torch.isfinite(top_val) & (torch.arange(kk, device=dev) < k_row[:, None, :, None])
    cand = torch.cat([torch.where(keep, top_idx, NQ), qb_idx.expand(B, G, NQ)[..., None]], -1)
    cand = torch.sort(cand, dim=-1).values  # in block order; NQ marks dropped slots (sorted last)
    valid = (cand < NQ) & live[:, None, :, None]
    indptr = F.pad(torch.cumsum(valid.reshape(-1, cand.shape[-1]).sum(1), 0), (1, 0))
    kv = cand[valid]
    row_q = qb_idx[None, None, :, None].expand_as(cand)[valid]
    mode = torch.where(kv == row_q, MODE_CAUSAL, MODE_FULL)
    return _make(indptr, kv, mode, B, G, NQ, NQ, blk, blk, pos, pos, doc, doc)


SUMMARY_KEY_BLOCK = 64
"""Summary tokens per compact key block (at least one core block's): the kernel's key tile is the
layout's key block, and one core block's blk // pool summaries alone (16 at block 64, pool 4)
made 16-wide tiles that ran at ~50 TFLOP/s on an H100 against ~300 for 64-wide ones."""


def summary_layout(doc_BT: torch.Tensor, blk: int, core_BN: torch.Tensor, rows_BN: torch.Tensor,
                   pool: int) -> tuple[BlockLayout, torch.Tensor, torch.Tensor]:
    """DCW cross-tier: rows_BN query blocks read summaries of earlier same-document core blocks.

    The compact key set holds, per row, the summaries of its core blocks in block order (blk //
    pool per core block), padded to whole key blocks of SUMMARY_KEY_BLOCK summaries (several
    core blocks each). Visibility is whole-block: core block c is read by query block b when c
    ends before b starts (c < b) and both lie in one document. In block units: q_pos = the query
    token's block, k_pos = the summary's core block, MODE_FAR with far = 1; interior key blocks
    pass unmasked. Returns (layout, core block index [B, NC], valid [B, NC]); NC is a multiple
    of the core blocks per key block; summary n pools tokens core_idx[n // per] * blk +
    (n % per) * pool ... + pool (per = blk // pool).
    """
    doc, _, start, _, live = _block_bounds(doc_BT, blk)
    B, NQ = start.shape
    dev = doc.device
    per = blk // pool
    group = max(1, SUMMARY_KEY_BLOCK // per)  # core blocks per compact key block
    core = core_BN & live
    count = core.sum(1)
    NC = -(-max(1, int(count.max())) // group) * group
    order = torch.argsort((~core).to(torch.int8), dim=1, stable=True)
    core_idx = F.pad(order, (0, max(0, NC - NQ)))[:, :NC]
    valid = torch.arange(NC, device=dev)[None] < count[:, None]
    core_idx = torch.where(valid, core_idx, torch.zeros_like(core_idx))
    cum = F.pad(torch.cumsum(core.long(), 1), (1, 0))  # core blocks before block b
    lo = cum.gather(1, start // blk) // group
    hi = torch.where(cum[:, :NQ] > 0, (cum[:, :NQ] - 1) // group, -1)
    hi = torch.where(rows_BN & live, hi, torch.full_like(hi, -1))  # non-core rows (the caller)
    indptr, kv, _ = ranges_to_csr(lo.reshape(-1), hi.reshape(-1))
    mode = torch.full_like(kv, MODE_FAR)
    k_pos = core_idx.repeat_interleave(per, 1)  # [B, NC * per] in block units
    # A summary's document: its pool's (pools never straddle documents, which start at block
    # boundaries); an all-padding pool or a padding slot is -1 and never attended.
    pool_doc = doc.view(B, NQ, per, pool).amax(-1)  # [B, NQ, per]
    k_doc = pool_doc.gather(1, core_idx[:, :, None].expand(B, NC, per))
    k_doc = torch.where(valid[:, :, None], k_doc, torch.full_like(k_doc, -1)).reshape(B, NC * per)
    q_pos = (torch.arange(NQ * blk, device=dev) // blk).expand(B, -1)
    layout = _make(indptr, kv, mode, B, 1, NQ, NC // group, blk, per * group, q_pos, k_pos, doc,
                   k_doc, far=1)
    return layout, core_idx, valid


def entry_bounds(layout: BlockLayout) -> torch.Tensor:
    """int32 [nnz] each entry's mode parameter: its entry_bound, else the layout's window
    (MODE_WINDOW) or far (MODE_FAR), 0 for the other modes."""
    if layout.entry_bound is not None:
        return layout.entry_bound.int()
    m = layout.mode.long()
    return torch.where(m == MODE_WINDOW, layout.window,
                       torch.where(m == MODE_FAR, layout.far, 0)).int()


def merge_layouts(layouts: list[BlockLayout], shared_keys: bool = False) -> BlockLayout:
    """One layout holding every entry of `layouts`, which share their query side (rows, q_pos,
    q_doc, blocks): one kernel launch and one softmax over the union, instead of one launch per
    layout and an LSE merge. The key sets must be disjoint per row for that to equal the merged
    partials: different rows, or MODE_FAR against a window (DCW's buffer rows).

    shared_keys: every layout indexes the same key set; else the key sets are concatenated in
    order (entries' key blocks offset, k_pos / k_doc concatenated): run the result on
    torch.cat of the key tensors, each padded to its layout's num_k_blocks * k_block. Each
    entry keeps its own window / far as entry_bound. Within a row, entries keep layout order.
    """
    first = layouts[0]
    for lay in layouts[1:]:
        same = ((lay.batch, lay.groups, lay.num_q_blocks, lay.q_block, lay.k_block)
                == (first.batch, first.groups, first.num_q_blocks, first.q_block, first.k_block))
        if not same or (lay.k_doc is None) != (first.k_doc is None):
            raise ValueError("merge_layouts: layouts must share batch, groups, query blocks, "
                             "block sizes and whether they test documents")
        if shared_keys and lay.num_k_blocks != first.num_k_blocks:
            raise ValueError("merge_layouts(shared_keys=True): key sets differ in size")
    dev = first.indptr.device
    R = first.indptr.numel() - 1
    rows, kv, mode, bound = [], [], [], []
    offset = 0
    for lay in layouts:
        rows.append(torch.repeat_interleave(torch.arange(R, device=dev),
                                            lay.indptr[1:] - lay.indptr[:-1]))
        kv.append(lay.kv_block.long() + offset)
        mode.append(lay.mode)
        bound.append(entry_bounds(lay))
        offset += 0 if shared_keys else lay.num_k_blocks
    rows_all = torch.cat(rows)
    order = torch.argsort(rows_all, stable=True)
    indptr = F.pad(torch.cumsum(torch.bincount(rows_all, minlength=R), 0), (1, 0))
    cat = (lambda ts: ts[0]) if shared_keys else (lambda ts: torch.cat(ts, 1))  # noqa: E731
    num_k = first.num_k_blocks if shared_keys else offset
    return BlockLayout(
        indptr=indptr, kv_block=torch.cat(kv)[order].to(torch.int32),
        mode=torch.cat(mode)[order], batch=first.batch, groups=first.groups,
        num_q_blocks=first.num_q_blocks, num_k_blocks=num_k, q_block=first.q_block,
        k_block=first.k_block, q_pos=first.q_pos, k_pos=cat([lay.k_pos for lay in layouts]),
        q_doc=first.q_doc,
        k_doc=None if first.k_doc is None else cat([lay.k_doc for lay in layouts]),
        entry_bound=torch.cat(bound)[order].to(torch.int32))
