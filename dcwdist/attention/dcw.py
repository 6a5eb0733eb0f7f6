"""DCW attention: tiered local pattern plus the gated cross-tier residual to core summaries.

Shapes: q_BTHD [B, T, H, D] post-RoPE; k_BTKD / v_BTKD [B, T, Hkv, D]; tiers [B, NB], NB = T / blk.

Per query token i of block b (DESIGN.md, "The attention contract"):
  core        every earlier key of its document                      (layout `local`, causal rows)
  background  i - j < window                                          (layout `local`, window rows)
  buffer      i - j < buffer_window  (layout `buffer`)  +  strided keys j = 0 mod stride from the
              document start with j <= i - buffer_window (layout `strided`, a compact gathered key
              set read with MODE_FAR) -- the three partial softmaxes are disjoint and merge by LSE
              into one softmax.
  At cp=1 the three run as one kernel launch over one merged layout (merge_layouts: keys
  [K; strided K], each entry with its own window / far), so one softmax, no LSE merge.
  non-core    + alpha_layer * CrossAttn(q_i, S_b): its own softmax over the pooled K/V of core
              blocks of the same document that end before b starts (layout `summary`). With
              segmentation.summary_source=content the sources are the core blocks plus the
              blocks the scorer found relevant by their own content (ctx.cache
              "summary_blocks"): causal, since only blocks after a source read it.

Differentiable path to the scorer: when ctx.block_scores (soft, with grad) is given, every core
block's summary values are multiplied by w = 1 + s - s.detach() (a straight-through weight: the
value is exactly 1, so outputs do not change, but dL/ds = sum over its summaries of
<dL/dV_summary, V_summary>), which is how L_task reaches the scorer through the cross-tier.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import TIER_BACKGROUND, TIER_BUFFER, TIER_CORE, AttnContext
from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.layout import BlockLayout
from dcwdist.attention.layouts import (ROW_CAUSAL, ROW_NONE, ROW_WINDOW, compact_far_layout,
                                       doc_position, local_layout, merge_layouts, pad_doc,
                                       summary_layout)


@dataclass
class DCWPlan:
    """Layouts of one forward, built once from the tiers and shared by every layer."""

    local: BlockLayout
    """Core rows: causal prefix; background rows: window `window` (full key sequence)."""
    buffer: BlockLayout
    """Buffer rows: window `buffer_window` (full key sequence)."""
    strided: BlockLayout
    """Buffer rows over the compact strided key set, MODE_FAR far = buffer_window."""
    strided_idx: torch.Tensor
    """[B, S] token index of each compact strided key."""
    summary: BlockLayout
    """Non-core rows over the compact core-summary set (MODE_FULL, whole core blocks)."""
    core_idx: torch.Tensor
    """[B, NC] block index of each summary source block (core blocks, or the segmenter's
    content-chosen sources): the summary layout's compact key set, in block order."""
    core_valid: torch.Tensor
    """[B, NC] False for padding slots."""
    tiers: torch.Tensor
    """[B, NB] the tiers the plan was built from."""
    fused: Optional[BlockLayout] = None
    """local + buffer + strided as one layout over [K; strided K] (built on first use)."""


def fused_layout(plan: DCWPlan) -> BlockLayout:
    """The plan's core / background / buffer / strided parts as one layout: rows are disjoint
    between local and buffer, and strided keys (MODE_FAR) are disjoint from the buffer window."""
    if plan.fused is None:
        plan.fused = merge_layouts([merge_layouts([plan.local, plan.buffer], shared_keys=True),
                                    plan.strided])
    return plan.fused


def local_rows(tiers_BN: torch.Tensor) -> torch.Tensor:
    """What each query block reads in the `local` layout: core its prefix, background a window."""
    return torch.where(tiers_BN == TIER_CORE, ROW_CAUSAL,
                       torch.where(tiers_BN == TIER_BACKGROUND, ROW_WINDOW, ROW_NONE))


def summary_sources(ctx: AttnContext) -> Optional[torch.Tensor]:
    """[B, NB] bool blocks whose summaries later blocks read, when the segmenter chose them by
    their own content (segmentation.summary_source=content); None: the core tier's blocks."""
    return ctx.cache.get("summary_blocks")


def summary_weight_scores(ctx: AttnContext) -> Optional[torch.Tensor]:
    """[B, NB] soft scores (with grad) that weight each source block's summary values: the
    segmenter's summary scores when it chose sources by content, else the block scores."""
    return ctx.cache.get("summary_scores", ctx.block_scores)


def build_dcw_plan(cfg: AttentionConfig, doc_BT: torch.Tensor, tiers_BN: torch.Tensor,
                   summary_BN: Optional[torch.Tensor] = None) -> DCWPlan:
    blk = cfg.block_size
    NB = -(-doc_BT.shape[1] // blk)
    if tiers_BN.shape != (doc_BT.shape[0], NB):
        raise ValueError(f"ctx.tiers must be [B, T / block_size] = {(doc_BT.shape[0], NB)}, "
                         f"got {tuple(tiers_BN.shape)}")
    core, buffer = tiers_BN == TIER_CORE, tiers_BN == TIER_BUFFER
    local = local_layout(doc_BT, blk, local_rows(tiers_BN), cfg.window)
    buf = local_layout(doc_BT, blk, torch.where(buffer, ROW_WINDOW, ROW_NONE), cfg.buffer_window)
    doc = pad_doc(doc_BT, blk)
    strided_sel = doc_position(doc) % cfg.stride == 0
    strided, strided_idx = compact_far_layout(doc_BT, blk, strided_sel, buffer, cfg.buffer_window)
    src = core if summary_BN is None else summary_BN.to(torch.bool)
    summary, core_idx, core_valid = summary_layout(doc_BT, blk, src, ~core, cfg.summary_pool)
    return DCWPlan(local, buf, strided, strided_idx, summary, core_idx, core_valid, tiers_BN)


def dcw_plan(cfg: AttentionConfig, ctx: AttnContext) -> DCWPlan:
    """The forward's plan from ctx.cache, built on first use (layer 0) and reused by the rest."""
    if ctx.tiers is None:
        raise ValueError("attention.kind='dcw' needs ctx.tiers ([B, T / block_size] TIER_* per "
                         "block, from the scorer); got ctx.tiers=None")
    key = ("dcw_plan", cfg.block_size, cfg.buffer_window, cfg.stride, cfg.summary_pool)
    plans = ctx.cache.get(key)
    if plans is None or next(iter(plans.values())).tiers is not ctx.tiers:
        plans = ctx.cache[key] = {cfg.window: build_dcw_plan(cfg, ctx.doc_ids, ctx.tiers,
                                                                  summary_sources(ctx))}
    if cfg.window not in plans:  # per-layer windows: only the `local` layout differs
        plan = next(iter(plans.values()))
        plans[cfg.window] = dataclasses.replace(plan, fused=None, local=local_layout(
            ctx.doc_ids, cfg.block_size, local_rows(ctx.tiers), cfg.window))
    return plans[cfg.window]


def pool_summaries(x_BTKD: torch.Tensor, doc_BT: torch.Tensor, core_idx: torch.Tensor,
                   blk: int, pool: int) -> torch.Tensor:
    """Mean of each `pool` consecutive real tokens of the listed core blocks -> [B, NC*blk/pool, K, D]."""
    B, T, K, D = x_BTKD.shape
    NB = -(-T // blk)
    x = F.pad(x_BTKD, (0, 0, 0, 0, 0, NB * blk - T)).view(B, NB, blk // pool, pool, K, D)
    real = (pad_doc(doc_BT, blk) >= 0).view(B, NB, blk // pool, pool).to(x.dtype)
    bi = torch.arange(B, device=x.device)[:, None]
    x_sel, real_sel = x[bi, core_idx], real[bi, core_idx]  # [B, NC, per, pool, (K, D)]
    pooled = (x_sel * real_sel[..., None, None]).sum(3) / real_sel.sum(3).clamp_min(1)[..., None, None]
    # x's dtype: under CUDA autocast .sum() runs in fp32, and the kernel needs q, k, v alike.
    return pooled.reshape(B, -1, K, D).to(x_BTKD.dtype)


def background_layouts(cfg: AttentionConfig, ctx: AttnContext, plan: DCWPlan) -> list[BlockLayout]:
    """`local` layouts of the multi-window background, one per kv-head group: core rows as in
    plan.local, background rows with that group's window (cached for every layer)."""
    key = ("dcw_background", cfg.block_size, tuple(cfg.dcw_background_windows))
    hit = ctx.cache.get(key)
    if hit is None or hit[0] is not plan.tiers:
        rows = local_rows(plan.tiers)
        hit = (plan.tiers, [local_layout(ctx.doc_ids, cfg.block_size, rows, w)
                            for w in cfg.dcw_background_windows])
        ctx.cache[key] = hit
    return hit[1]


def _local_part(cfg: AttentionConfig, ctx: AttnContext, plan: DCWPlan, q, k, v):
    """(out, lse) of the core / background layout: one layout, or one per head group."""
    run = lambda q, k, v, lay: attend_layout(q, k, v, lay, None, cfg.impl, cfg.chunk_size, ctx.kept)  # noqa: E731
    if not cfg.dcw_background_windows:
        return run(q, k, v, plan.local)
    G = len(cfg.dcw_background_windows)
    hq, hk = q.shape[2] // G, k.shape[2] // G
    parts = [run(q[:, :, g * hq:(g + 1) * hq], k[:, :, g * hk:(g + 1) * hk],
                 v[:, :, g * hk:(g + 1) * hk], lay)
             for g, lay in enumerate(background_layouts(cfg, ctx, plan))]
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 1)


class DCWAttention(nn.Module):
    """Tiered DCW attention of one layer; owns the layer's cross-tier scale alpha (init 0)."""

    def __init__(self, cfg: AttentionConfig, layer_idx: int, n_heads: int, n_kv_heads: int,
                 head_dim: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.alpha = nn.Parameter(torch.zeros(1))  # [1], not 0-dim: DeepSpeed broadcasts views
        if cfg.dcw_background_windows and n_kv_heads % len(cfg.dcw_background_windows):
            raise ValueError(f"attention.dcw_background_windows has "
                             f"{len(cfg.dcw_background_windows)} windows; they must divide "
                             f"n_kv_heads={n_kv_heads}")

    def layer_cfg(self) -> AttentionConfig:
        """This layer's settings: the background window of a per-layer schedule or growth rule
        (attention.window_schedule / window_growth), else the shared config."""
        cfg = self.cfg
        if not cfg.window_schedule and cfg.window_growth == "none":
            return cfg
        from dcwdist.attention.windows import layer_window
        w = layer_window(cfg, self.layer_idx, getattr(self, "n_layers", None))
        return dataclasses.replace(cfg, window=w, window_schedule=[], window_growth="none")

    def forward(self, q_BTHD, k_BTKD, v_BTKD, ctx: AttnContext):
        cfg = self.layer_cfg()
        if ctx.group is not None:  # context parallel: this rank's shard (parallel/balance.py)
            if cfg.dcw_background_windows:
                raise ValueError("attention.dcw_background_windows runs at cp=1 only")
            from dcwdist.parallel.dcw_cp import dcw_cp_attention
            return dcw_cp_attention(self, q_BTHD, k_BTKD, v_BTKD, ctx, cfg)
        plan = dcw_plan(cfg, ctx)
        run = lambda q, k, v, lay: attend_layout(q, k, v, lay, None, cfg.impl, cfg.chunk_size, ctx.kept)  # noqa: E731
        bi = torch.arange(q_BTHD.shape[0], device=q_BTHD.device)[:, None]
        k_s, v_s = k_BTKD[bi, plan.strided_idx], v_BTKD[bi, plan.strided_idx]
        blk, pool = cfg.block_size, cfg.summary_pool
        if cfg.dcw_background_windows:  # per-group local layouts: partials merged by LSE
            local, _ = merge_partials([_local_part(cfg, ctx, plan, q_BTHD, k_BTKD, v_BTKD),
                                       run(q_BTHD, k_BTKD, v_BTKD, plan.buffer),
                                       run(q_BTHD, k_s, v_s, plan.strided)])
        else:
            pad = plan.local.num_k_blocks * blk - k_BTKD.shape[1]
            cat = lambda x, x_s: torch.cat([F.pad(x, (0, 0, 0, 0, 0, pad)), x_s], 1)  # noqa: E731
            local, _ = run(q_BTHD, cat(k_BTKD, k_s), cat(v_BTKD, v_s), fused_layout(plan))
        k_sum = pool_summaries(k_BTKD, ctx.doc_ids, plan.core_idx, blk, pool)
        v_sum = pool_summaries(v_BTKD, ctx.doc_ids, plan.core_idx, blk, pool)
        weight_scores = summary_weight_scores(ctx)
        if weight_scores is not None:
            s = weight_scores.gather(1, plan.core_idx).to(v_sum.dtype)  # [B, NC]
            weight = (1 + s - s.detach()).repeat_interleave(blk // pool, 1)  # value exactly 1
            v_sum = v_sum * weight[:, :, None, None]
        cross, _ = run(q_BTHD, k_sum, v_sum, plan.summary)
        return local + self.alpha.to(local.dtype) * cross
