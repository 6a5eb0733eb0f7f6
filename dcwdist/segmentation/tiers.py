"""Block scores -> tiers (DESIGN.md "Scores -> tiers"). Everything is vectorised over blocks.

Legend: B batch, T tokens, NB = ceil(T / blk) blocks. Documents start at block boundaries, so a
block holds (real tokens of) at most one document; a block with no real token is padding and
is always background.

prefix: per document, the document blocks (no instruction or answer token) are ranked by score,
  ties to the lower block index; the first round(core_ratio * n) are core, up to
  round((core_ratio + buffer_ratio) * n) buffer, the rest background. Blocks holding an
  instruction or answer token are core.
causal: block b's tier comes from `decision` [B, NB], the score at the last token of block b-1
  (same document); a document's first block is core. Block k (0-based within its document) is
  core if decision >= tau_core and the document's core count over blocks 0..k stays within
  floor(core_ratio * (k + 1) + cap_slack) (at least 1: the first block); otherwise buffer if
  decision >= tau_buffer (or it wanted core but hit the cap) and the buffer count stays within
  floor(buffer_ratio * (k + 1) + cap_slack); otherwise background. With `roles_core`
  (segmentation.answer_core), blocks holding an instruction or answer token are core
  too, outside the cap, as in prefix mode: roles are known before the block is read (the
  decoder marks generated tokens as answer), and generation attends densely for answer tokens,
  so training gives those queries the full prefix as well.

content sources (segmentation.summary_source=content): block k whose own score (at its own last
real token) is >= tau_core, admitted under the same running cap as the core tier,
floor(core_ratio * (k + 1) + cap_slack) (at least 1), counted over the content sources alone.

The running cap is a sequential rule, count_k = min(count_{k-1} + want_k, cap_k), but with a
non-decreasing cap it has the closed form count_k = A_k + min(0, min_{j<=k} (cap_j - A_j)) where
A is the running sum of `want` (a block wanting in while count_{k-1} = cap_k is refused, and then
count_{k-1} = cap_{k-1} = cap_k). So it is two cumsums and a cummin: no loop over 16k blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcwdist.attention.context import (ROLE_ANSWER, ROLE_INSTRUCTION, TIER_BACKGROUND,
                                       TIER_BUFFER, TIER_CORE)


@dataclass
class BlockInfo:
    """Per-block document structure; every field is [B, NB]."""

    doc: torch.Tensor
    """Document id of the block's real tokens; -1 for a padding block."""
    real: torch.Tensor
    """True when the block holds a real token."""
    first: torch.Tensor
    """True for the first block of a document."""
    index: torch.Tensor
    """Block index within its document (padding blocks continue the previous count)."""
    seg_start: torch.Tensor
    """[B, NB] index of the first block of the block's document (run start)."""
    forced: torch.Tensor
    """Holds an instruction or answer token (prefix mode: always core)."""


def block_info(doc_BT: torch.Tensor, roles_BT: torch.Tensor | None, blk: int,
               check: bool = True) -> BlockInfo:
    B, T = doc_BT.shape
    NB = -(-T // blk)
    doc_BNK = F.pad(doc_BT, (0, NB * blk - T), value=-1).view(B, NB, blk)
    doc = doc_BNK.max(-1).values
    real = doc >= 0
    if check:
        lowest = torch.where(doc_BNK >= 0, doc_BNK, doc[..., None]).min(-1).values
        if bool((lowest != doc).any()):
            raise ValueError("segmentation: a block holds tokens of two documents; pack with "
                             "align = attention.block_size so documents start at block boundaries")
    col = torch.arange(NB, device=doc.device).expand(B, NB)
    first = real.clone()
    first[:, 1:] &= doc[:, 1:] != doc[:, :-1]
    seg_start = torch.where(first | (col == 0), col, 0).cummax(1).values
    forced = torch.zeros_like(real)
    if roles_BT is not None:
        roles = F.pad(roles_BT, (0, NB * blk - T), value=-1).view(B, NB, blk)
        forced = ((roles == ROLE_INSTRUCTION) | (roles == ROLE_ANSWER)).any(-1) & real
    return BlockInfo(doc, real, first, col - seg_start, seg_start, forced)


def _segment_rank(score_BN: torch.Tensor, group_BN: torch.Tensor):
    """Rank of each block within its group by descending score (ties: lower index first), and
    the group's size; both [B, NB]."""
    B, NB = score_BN.shape
    order = torch.argsort(-score_BN, dim=1, stable=True)
    order = order.gather(1, torch.argsort(group_BN.gather(1, order), dim=1, stable=True))
    g = group_BN.gather(1, order)
    col = torch.arange(NB, device=g.device).expand(B, NB)
    new = torch.ones_like(g, dtype=torch.bool)
    new[:, 1:] = g[:, 1:] != g[:, :-1]
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    start = torch.where(new, col, 0).cummax(1).values
    end = torch.where(last, col, NB).flip(1).cummin(1).values.flip(1)
    rank = torch.empty_like(col).scatter_(1, order, col - start)
    size = torch.empty_like(col).scatter_(1, order, end - start + 1)
    return rank, size


def prefix_tiers(block_scores: torch.Tensor, info: BlockInfo, core_ratio: float,
                 buffer_ratio: float) -> torch.Tensor:
    """[B, NB] int64 tiers by per-document quantiles of the (detached) block scores."""
    ranked = info.real & ~info.forced
    unranked = torch.iinfo(torch.int64).max  # one group after every document
    rank, n = _segment_rank(block_scores.detach().float(),
                            torch.where(ranked, info.doc, unranked))
    n = n.double()
    n_core = torch.floor(core_ratio * n + 0.5)
    n_top = torch.floor((core_ratio + buffer_ratio) * n + 0.5)
    tier = torch.where(rank < n_core, TIER_CORE, torch.where(rank < n_top, TIER_BUFFER,
                                                             TIER_BACKGROUND))
    tier = torch.where(ranked, tier, TIER_BACKGROUND)
    return torch.where(info.forced, TIER_CORE, tier).long()


def capped_admit(want_BN: torch.Tensor, cap_BN: torch.Tensor, info: BlockInfo) -> torch.Tensor:
    """Blocks admitted by count_k = min(count_{k-1} + want_k, cap_k), run per document.

    cap_BN must not decrease along a document; returns [B, NB] bool.
    """
    NB = want_BN.shape[1]
    cap_BN = cap_BN.clamp(max=NB + 1)  # a larger cap never binds (count <= k + 1)
    a = want_BN.long()
    A = a.cumsum(1)
    A = A - (A - a).gather(1, info.seg_start)  # inclusive running count within the document
    v = cap_BN - A
    # cummin restarted at each document: later documents are shifted below earlier ones.
    ordinal = (info.seg_start == torch.arange(NB, device=a.device)).long().cumsum(1)
    big = 4 * NB + 8  # > the spread of v (in [-NB, NB + 1])
    run_min = (v - ordinal * big).cummin(1).values + ordinal * big
    count = A + run_min.clamp(max=0)
    prev = F.pad(count, (1, 0))[:, :-1]
    prev = torch.where(info.seg_start == torch.arange(NB, device=a.device), 0, prev)
    return (count - prev) > 0


def core_cap(info: BlockInfo, core_ratio: float, cap_slack: float) -> torch.Tensor:
    """[B, NB] int64 running cap on the core count over a document's blocks 0..k."""
    k1 = (info.index + 1).double()
    return torch.floor(core_ratio * k1 + cap_slack + 1e-9).long().clamp_min(1)


def content_sources(own_BN: torch.Tensor, info: BlockInfo, core_ratio: float, tau_core: float,
                    cap_slack: float) -> torch.Tensor:
    """[B, NB] bool blocks chosen as summary sources by their own (detached) score, within the
    core tier's running cap; padding blocks never."""
    want = info.real & (own_BN.detach().float() >= tau_core)
    return capped_admit(want, core_cap(info, core_ratio, cap_slack), info) & info.real


def causal_tiers(decision_BN: torch.Tensor, info: BlockInfo, core_ratio: float,
                 buffer_ratio: float, tau_core: float, tau_buffer: float,
                 cap_slack: float, roles_core: bool = False) -> torch.Tensor:
    """[B, NB] int64 tiers from the previous block's last score, under the running caps; with
    roles_core, instruction / answer blocks are core besides (not counted in the cap)."""
    s = decision_BN.detach().float()
    k1 = (info.index + 1).double()
    forced = info.forced & ~info.first if roles_core else torch.zeros_like(info.real)
    scored = info.real & ~info.first & ~forced
    want_core = (scored & (s >= tau_core)) | info.first
    cap_core = core_cap(info, core_ratio, cap_slack)
    core = (capped_admit(want_core, cap_core, info) | forced) & info.real
    want_buf = scored & ~core & (s >= tau_buffer)
    cap_buf = torch.floor(buffer_ratio * k1 + cap_slack + 1e-9).long()
    buf = capped_admit(want_buf, cap_buf, info) & info.real
    return torch.where(core, TIER_CORE, torch.where(buf, TIER_BUFFER, TIER_BACKGROUND)).long()

