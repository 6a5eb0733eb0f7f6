"""The segmenter the Transformer calls once per forward: scores -> tiers, block scores, losses.

Legend: B batch, T tokens, M model dim, NB = ceil(T / blk) blocks.

Fills ctx.tiers [B, NB] int64, ctx.block_scores [B, NB] (soft, differentiable),
ctx.cache["token_scores"] [B, T], ctx.cache["aux_losses"] (weighted L_seg, L_eff) and
ctx.cache["metrics"] (floats; always the same keys so ranks all-reduce them in step).

Block scores, the path L_task takes into the scorer (DCW multiplies each core block's summary
values by s / s.detach(), a straight-through weight of exactly 1):
- prefix: the mean token score of a document block; blocks with instruction/answer tokens
  (always core) and padding carry the constant 1 / 0.
- causal: block b carries the score that decided it, the one at the last token of block b-1;
  a document's first block (always core) and, with segmentation.answer_core, blocks with
  instruction/answer tokens (core too) carry the constant 1, padding 0.

Summary sources (segmentation.summary_source). tier: the core blocks' summaries serve later
non-core blocks; nothing extra is stored. content (causal mode only): the scorer has a second,
"own" output (target: a relevant token lies in the trailing block_size tokens, losses.
lookbehind_targets), read at each block's last real token; blocks with own score >= tau_core
are admitted under the core tier's running cap (tiers.content_sources) and OR'd with the core
blocks. Stored: ctx.cache["summary_blocks"] [B, NB] bool (the sources) and
ctx.cache["summary_scores"] [B, NB] float (differentiable: the own score for content-chosen
blocks, the block score elsewhere), which DCW's straight-through summary weight reads instead
of ctx.block_scores. Block b's summary is read only by blocks after b, so judging b by its own
content is causal. The oracle scorer's own scores are the lookbehind targets themselves.

Tiers are computed from the detached scores (they are discrete); the phase decides the rest:
scorer / joint add lambda_seg * L_seg (when labels exist; with summary_source=content the
lookahead BCE plus the own-output BCE against the lookbehind targets, same tokens) and
lambda_eff * L_eff (when > 0);
frozen runs the scorer without gradient and adds nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import ROLE_ANSWER, TIER_CORE, AttnContext
from dcwdist.segmentation.config import SegmentationConfig
from dcwdist.segmentation.losses import (block_costs, flops_fraction, hard_tier_probs,
                                         labelled_tokens, lookahead_targets,
                                         lookbehind_targets, seg_loss, soft_tier_probs)
from dcwdist.segmentation.scorer import InstructionScorer
from dcwdist.segmentation.tiers import (BlockInfo, block_info, causal_tiers, content_sources,
                                        prefix_tiers)

METRIC_KEYS = ("seg_bce", "core_precision", "core_recall", "tier_core", "tier_buffer",
               "tier_background", "flops_expected", "flops_realised", "summary_recall")
"""seg_bce: L_seg's BCE (summary_source=content: lookahead + own). summary_recall: share of
relevant scored blocks (those core_recall counts) that are summary sources; 0 with
summary_source=tier or without labels."""


def _blocks(x_BT: torch.Tensor, blk: int, fill=0) -> torch.Tensor:
    T = x_BT.shape[1]
    NB = -(-T // blk)
    return torch.nn.functional.pad(x_BT, (0, NB * blk - T), value=fill).view(x_BT.shape[0], NB, blk)


class Segmenter(nn.Module):
    def __init__(self, cfg: SegmentationConfig, model_dim: int, attn_cfg: AttentionConfig):
        super().__init__()
        self.cfg, self.attn_cfg = cfg, attn_cfg
        self.scorer = InstructionScorer(cfg, model_dim, n_out=2 if self.content else 1)

    @property
    def causal(self) -> bool:
        return self.cfg.mode == "causal"

    @property
    def content(self) -> bool:
        """Summary sources include blocks chosen by their own content (summary_source=content)."""
        return self.cfg.summary_source == "content"

    def own_block_scores(self, own_BT: torch.Tensor, doc_BT, info: BlockInfo) -> torch.Tensor:
        """[B, NB] the own score at each block's last real token (its whole content read);
        padding blocks 0. (Only a document's last block can be partial; its trailing window
        then reaches into the block before, which is harmless: no block of its document comes
        after it to read its summary.)"""
        blk = self.attn_cfg.block_size
        real = _blocks(doc_BT >= 0, blk, False)
        k = torch.arange(blk, device=doc_BT.device)
        last = torch.where(real, k, -1).max(-1).values.clamp_min(0)
        s = _blocks(own_BT, blk).gather(-1, last[..., None]).squeeze(-1)
        return torch.where(info.real, s, 0.0)

    def block_scores(self, s_BT: torch.Tensor, doc_BT, roles_BT, info: BlockInfo) -> torch.Tensor:
        """[B, NB] soft block scores (see the module docstring)."""
        blk = self.attn_cfg.block_size
        if self.causal:
            last = _blocks(s_BT, blk)[:, :, -1]  # score at each block's last token
            decided = torch.nn.functional.pad(last, (1, 0))[:, :-1]
            return torch.where(info.first | self._role_core(info), 1.0,
                               torch.where(info.real, decided, 0.0))
        read = doc_BT >= 0 if roles_BT is None else (doc_BT >= 0) & (roles_BT != ROLE_ANSWER)
        scored = _blocks(read, blk, False)
        s = _blocks(s_BT, blk)
        mean = (s * scored).sum(-1) / scored.sum(-1).clamp_min(1)
        return torch.where(info.forced, 1.0, torch.where(info.real, mean, 0.0))

    def _role_core(self, info: BlockInfo) -> torch.Tensor:
        """[B, NB] causal-mode blocks that are core by their roles (segmentation.answer_core)."""
        return info.forced if self.cfg.answer_core else torch.zeros_like(info.forced)

    def oracle_scores(self, doc_BT, relevance_BT, roles_BT) -> torch.Tensor:
        """[B, T] the labels the learned scorer is trained to predict, as scores in {0, 1}."""
        if self.causal:
            return lookahead_targets(doc_BT, relevance_BT, self.attn_cfg.block_size)
        return ((relevance_BT > 0) & (doc_BT >= 0)).float()

    def forward(self, h_emb_BTM: torch.Tensor, tokens_BT: torch.Tensor, ctx: AttnContext) -> None:
        cfg, blk = self.cfg, self.attn_cfg.block_size
        doc, roles = ctx.doc_ids, ctx.roles
        relevance = ctx.cache.get("relevance")
        train = cfg.phase != "frozen" and torch.is_grad_enabled() and cfg.scorer == "learned"
        own_logits = own = None  # the "own" output (summary_source=content)
        if cfg.scorer == "oracle":
            if relevance is None:
                raise ValueError("segmentation.scorer=oracle needs relevance labels "
                                 "(ctx.cache['relevance']); this input has none")
            relevance = relevance.to(h_emb_BTM.device)
            s = self.oracle_scores(doc, relevance, roles)
            logits = torch.logit(s.clamp(1e-4, 1 - 1e-4))
            if self.content:
                own = lookbehind_targets(doc, relevance, blk)
                own_logits = torch.logit(own.clamp(1e-4, 1 - 1e-4))
        else:
            with torch.set_grad_enabled(train):
                logits = self.scorer(h_emb_BTM, doc, ctx.positions, roles).float()
            if self.content:
                logits, own_logits = logits.unbind(-1)
                own = torch.sigmoid(own_logits)
            s = torch.sigmoid(logits)
        s_in = s.masked_fill(doc < 0, 0.0)
        info = block_info(doc, roles, blk)
        scores = self.block_scores(s_in, doc, roles, info)
        if self.causal:
            tiers = causal_tiers(scores, info, cfg.core_ratio, cfg.buffer_ratio, cfg.tau_core,
                                 cfg.tau_buffer, cfg.cap_slack, cfg.answer_core)
        else:
            tiers = prefix_tiers(scores, info, cfg.core_ratio, cfg.buffer_ratio)
        ctx.tiers, ctx.block_scores = tiers, scores
        ctx.cache["token_scores"] = s
        sources = p_source = None
        if self.content:
            own_blk = self.own_block_scores(own.masked_fill(doc < 0, 0.0), doc, info)
            chosen = content_sources(own_blk, info, cfg.core_ratio, cfg.tau_core, cfg.cap_slack)
            sources = chosen | (tiers == TIER_CORE)
            ctx.cache["summary_blocks"] = sources
            ctx.cache["summary_scores"] = torch.where(chosen, own_blk, scores)
            p_source = scores + (1 - scores) * own_blk  # soft: core, or else chosen by content

        costs = block_costs(doc, blk, self.attn_cfg)
        pool = self.attn_cfg.summary_pool
        expected = flops_fraction(*soft_tier_probs(scores, cfg.core_ratio, cfg.buffer_ratio),
                                  costs, info, blk, pool, p_source)
        bce, target, mask = None, None, None
        if relevance is not None:
            mask = labelled_tokens(doc, relevance)
            if self.causal:
                target = lookahead_targets(doc, relevance, blk)
            else:
                target = (relevance > 0).float()
                mask = mask & (roles != ROLE_ANSWER) if roles is not None else mask
            bce = seg_loss(logits, target, mask)
            if own_logits is not None:
                bce = bce + seg_loss(own_logits, lookbehind_targets(doc, relevance, blk), mask)
        aux = ctx.cache.setdefault("aux_losses", {})
        if train:
            if bce is not None and cfg.lambda_seg > 0:
                aux["seg"] = cfg.lambda_seg * bce
            if cfg.lambda_eff > 0:
                aux["eff"] = cfg.lambda_eff * torch.relu(expected - cfg.eff_target)
        ctx.cache.setdefault("metrics", {}).update(
            self._metrics(tiers, info, relevance, mask, bce, expected, costs, sources))

    @torch.no_grad()
    def _metrics(self, tiers, info: BlockInfo, relevance, mask, bce, expected, costs,
                 sources=None) -> dict:
        blk = self.attn_cfg.block_size
        real = info.real
        n_real = real.sum().clamp_min(1)
        zero = torch.zeros((), device=tiers.device)
        vals = [zero if bce is None else bce.detach(), zero, zero]
        summary_recall = zero
        if relevance is not None:
            # Blocks whose tier the score decided, in labelled documents.
            scored = real & (~(info.first | self._role_core(info)) if self.causal
                             else ~info.forced)
            scored &= _blocks(mask, blk, False).any(-1)
            rel = _blocks(relevance > 0, blk, False).any(-1)
            core = (tiers == TIER_CORE) & scored
            hit = (core & rel).sum()
            vals[1] = hit / core.sum().clamp_min(1)
            vals[2] = hit / (rel & scored).sum().clamp_min(1)
            if sources is not None:
                summary_recall = (sources & rel & scored).sum() / (rel & scored).sum().clamp_min(1)
        ratios = [((tiers == t) & real).sum() / n_real for t in range(3)]
        realised = flops_fraction(*hard_tier_probs(tiers), costs, info, blk,
                                  self.attn_cfg.summary_pool,
                                  None if sources is None else sources.float())
        row = torch.stack([v.float().reshape(()) for v in vals + ratios + [
            expected.detach(), realised, summary_recall]]).tolist()  # one sync
        return dict(zip(METRIC_KEYS, row))
