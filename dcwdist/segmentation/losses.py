"""L_seg (BCE against relevance labels) and L_eff (expected attention FLOPs above a target).

Legend: B batch, T tokens, NB blocks of `blk` tokens.

L_seg targets. A document is labelled when any of its tokens has relevance > 0 (the synthetic
examples label their instruction, answer and key sentence; plain LM text is all zero and is
left out rather than taught "nothing is relevant"). prefix mode: token i's target is its own
label, over instruction and document tokens (the scorer never reads the answer). causal mode:
the score at token i only ever decides the tier of the block that starts after it, so its target
is "a relevant token among the next blk tokens of the document" -- at the last token of block
b-1 that is exactly "block b is relevant". A label may look ahead (like a next-token target); the
score itself does not. With segmentation.summary_source=content the scorer has a second ("own")
output whose target is the lookbehind mirror, "a relevant token of the document in
(i - blk, i]" -- at the last token of block b exactly "block b is relevant" -- and L_seg is the
sum of the two BCEs (lookahead + own) over the same labelled tokens.

Expected FLOPs. Per query token at position p from its document start, keys per tier are
  core        p + 1                                   (dense causal: the reference)
  buffer      min(p + 1, buffer_window) + #{j = 0 mod stride, j <= p - buffer_window}
  background  min(p + 1, window)
plus, for non-core queries, blk / summary_pool cross-tier summaries per core block of the
document before the query's block. With soft tier probabilities per block
  p_core = block score,  p_buffer = (1 - p_core) q,  p_background = (1 - p_core)(1 - q),
  q = buffer_ratio / (1 - core_ratio)  (the non-core split at the target ratios),
the expected fraction is
  E = sum_b [p_core Core_b + p_buf Buf_b + p_bg Bg_b + (1 - p_core) n_b (blk/pool) sum_{b'<b} p_core(b')]
      / sum_b Dense_b
(Core_b, Buf_b, Bg_b, Dense_b: the key counts summed over block b's n_b real tokens). With hard
tiers (one-hot probabilities) the same formula is the realised density that
dcwdist.attention.attention_flops counts for the DCW layouts. L_eff = relu(E - eff_target).
With summary_source=content the summary sources are not just the core blocks: the last term's
p_core(b') becomes p_src(b') (hard: the segmenter's summary_blocks; soft:
p_core + (1 - p_core) * own block score).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import TIER_BACKGROUND, TIER_BUFFER, TIER_CORE
from dcwdist.attention.layouts import doc_position, pad_doc
from dcwdist.segmentation.tiers import BlockInfo


def labelled_tokens(doc_BT: torch.Tensor, relevance_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] True for real tokens of documents with at least one relevant token."""
    B, T = doc_BT.shape
    slot = torch.where(doc_BT >= 0, doc_BT, T)
    pos = ((relevance_BT > 0) & (doc_BT >= 0)).long()
    per_doc = torch.zeros(B, T + 1, dtype=torch.long, device=doc_BT.device).scatter_add_(1, slot, pos)
    return (per_doc.gather(1, slot) > 0) & (doc_BT >= 0)


def lookahead_targets(doc_BT: torch.Tensor, relevance_BT: torch.Tensor, span: int) -> torch.Tensor:
    """[B, T] float: 1 where a relevant token of the same document lies in (i, i + span]."""
    B, T = doc_BT.shape
    t = torch.arange(T, device=doc_BT.device).expand(B, T)
    rel = (relevance_BT > 0) & (doc_BT >= 0)
    nxt = torch.where(rel, t, 2 * T + span).flip(1).cummin(1).values.flip(1)  # first at >= i
    nxt = F.pad(nxt, (0, 1), value=2 * T + span)[:, 1:]  # first at > i
    same = doc_BT.gather(1, nxt.clamp(max=T - 1)) == doc_BT
    return ((nxt - t <= span) & same & (doc_BT >= 0)).float()


def lookbehind_targets(doc_BT: torch.Tensor, relevance_BT: torch.Tensor, span: int) -> torch.Tensor:
    """[B, T] float: 1 where a relevant token of the same document lies in (i - span, i].

    The mirror of lookahead_targets, and the target of the scorer's "own" output
    (summary_source=content): at a block's last token it is "this block holds a relevant token",
    which the score there may know, having read the whole block. Padding tokens are 0.
    """
    B, T = doc_BT.shape
    t = torch.arange(T, device=doc_BT.device).expand(B, T)
    rel = (relevance_BT > 0) & (doc_BT >= 0)
    prev = torch.where(rel, t, -(T + span + 1)).cummax(1).values  # last relevant at <= i
    same = doc_BT.gather(1, prev.clamp(min=0)) == doc_BT
    return ((t - prev < span) & same & (doc_BT >= 0)).float()


def seg_loss(logits_BT: torch.Tensor, target_BT: torch.Tensor, mask_BT: torch.Tensor):
    """Mean BCE over the masked tokens (0 when none)."""
    if not bool(mask_BT.any()):
        return logits_BT.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits_BT[mask_BT].float(), target_BT[mask_BT].float())


def block_costs(doc_BT: torch.Tensor, blk: int, attn_cfg: AttentionConfig) -> dict:
    """Per-block key counts [B, NB] (float64, no grad): dense, core, buffer, background, n."""
    doc = pad_doc(doc_BT, blk)
    B, T = doc.shape
    real = (doc >= 0).double()
    p = doc_position(doc).double()
    bw, w, st = attn_cfg.buffer_window, attn_cfg.window, attn_cfg.stride
    strided = torch.where(p >= bw, torch.floor((p - bw) / st) + 1, torch.zeros_like(p))
    per_token = {"dense": p + 1, "buffer": torch.clamp(p + 1, max=bw) + strided,
                 "background": torch.clamp(p + 1, max=w), "n": torch.ones_like(p)}
    out = {k: (v * real).view(B, -1, blk).sum(-1) for k, v in per_token.items()}
    out["core"] = out["dense"]
    return out


def flops_fraction(p_core: torch.Tensor, p_buffer: torch.Tensor, p_background: torch.Tensor,
                   costs: dict, info: BlockInfo, blk: int, summary_pool: int,
                   p_source: torch.Tensor | None = None) -> torch.Tensor:
    """Expected attention FLOPs / dense over the batch for per-block tier probabilities [B, NB].

    p_source [B, NB]: probability that a block is a summary source (default p_core: the core
    blocks, summary_source=tier)."""
    dt = torch.float32
    pc, pb, pg = p_core.to(dt), p_buffer.to(dt), p_background.to(dt)
    ps = pc if p_source is None else p_source.to(dt)
    csum = ps.cumsum(1)
    before = (csum - ps) - (csum - ps).gather(1, info.seg_start)  # sources earlier in the doc
    summaries = before * (blk // summary_pool)
    c = {k: v.to(dt) for k, v in costs.items()}
    total = (pc * c["core"] + pb * c["buffer"] + pg * c["background"]
             + (1 - pc) * c["n"] * summaries).sum()
    return total / c["dense"].sum().clamp_min(1.0)


def soft_tier_probs(block_scores: torch.Tensor, core_ratio: float, buffer_ratio: float):
    """(p_core, p_buffer, p_background) from soft block scores."""
    q = buffer_ratio / (1 - core_ratio) if core_ratio < 1 else 0.0
    rest = 1 - block_scores
    return block_scores, rest * q, rest * (1 - q)


def hard_tier_probs(tiers: torch.Tensor):
    return tuple((tiers == t).float() for t in (TIER_CORE, TIER_BUFFER, TIER_BACKGROUND))
