"""CAA attention (seeds 001/003): g(x) * local + (1 - g(x)) * global, two separate softmaxes.

Shapes: q_BTHD [B, T, H, D] post-RoPE; k_BTKD / v_BTKD [B, T, Hkv, D]; gate g [B, T, H, 1].
- local: causal sliding window; its width is chosen per input (per document, n = its length,
  so a packed row computes what each document does alone) from attention.caa_windows (256-512
  in the paper) by `caa_window`. One local layout per candidate width, over disjoint rows.
- global: per kv-head group and query block, the top-k key blocks by pooled score (as
  block_topk) with k * B ~= caa_c * sqrt(n) tokens, plus the causal diagonal so no real query
  is left without keys.
- gate: 2-layer MLP with sigmoid. The paper computes g from the input x; the attention module
  only receives q/k/v, so it reads the token's values v (a linear map of x, free of RoPE, hence
  position-independent like x). One gate per query head.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.layouts import (ROW_NONE, ROW_WINDOW, doc_length_per_block, local_layout,
                                       topk_layout)
from dcwdist.attention.topk import pooled_block_scores


def caa_window(candidates: list[int], n: int) -> int:
    """Local width for an input of n tokens: the smallest candidate >= 4*sqrt(n), else the largest.

    With the default (256, 512): 256 up to 4k tokens, 512 beyond (the paper's range).
    """
    wide_enough = [w for w in sorted(candidates) if w >= 4 * math.sqrt(n)]
    return wide_enough[0] if wide_enough else max(candidates)


def caa_topk(n: int, blk: int, c: float) -> int:
    """Global blocks k with k * blk ~= c * sqrt(n) tokens (at least one block)."""
    return max(1, round(c * math.sqrt(n) / blk))


def caa_block_choices(candidates: list[int], doc_BT: torch.Tensor, blk: int, c: float):
    """Per block: (local width [B, NQ], global k [B, NQ]) from its document's length."""
    root_n = doc_length_per_block(doc_BT, blk).clamp_min(1).double().sqrt()
    width = torch.full_like(root_n, max(candidates), dtype=torch.int64)
    for w in sorted(candidates, reverse=True):  # ends on the smallest wide-enough candidate
        width = torch.where(w >= 4 * root_n, w, width)
    k = (c * root_n / blk).round().clamp_min(1).long()
    return width, k


def caa_local_layouts(cfg: AttentionConfig, doc_BT: torch.Tensor):
    """(one window layout per candidate width over disjoint rows, global k [B, NQ]): depends on
    the doc ids only, so it is built once per forward and shared by every layer."""
    blk = cfg.block_size
    width, k = caa_block_choices(cfg.caa_windows, doc_BT, blk, cfg.caa_c)
    local = [local_layout(doc_BT, blk, torch.where(width == w, ROW_WINDOW, ROW_NONE), w)
             for w in sorted(set(cfg.caa_windows))]
    return local, k


class CAAAttention(nn.Module):
    """Context-adaptive attention; owns the gate MLP."""

    def __init__(self, cfg: AttentionConfig, layer_idx: int, n_heads: int, n_kv_heads: int,
                 head_dim: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.gate = nn.Sequential(nn.Linear(n_kv_heads * head_dim, cfg.caa_gate_hidden), nn.SiLU(),
                                  nn.Linear(cfg.caa_gate_hidden, n_heads))

    def layouts(self, q_BTHD, k_BTKD, ctx: AttnContext):
        """(local layouts, one per candidate width; this layer's global layout)."""
        cfg, blk = self.cfg, self.cfg.block_size
        key = ("caa_local", blk, tuple(cfg.caa_windows), cfg.caa_c)
        if key not in ctx.cache:  # depends on doc ids only: built once, shared by all layers
            ctx.cache[key] = caa_local_layouts(cfg, ctx.doc_ids)
        local, k = ctx.cache[key]
        scores = pooled_block_scores(q_BTHD, k_BTKD, ctx.doc_ids, blk, k_BTKD.shape[2])
        glob = topk_layout(ctx.doc_ids, blk, scores, k)
        ctx.cache[("caa_global", self.layer_idx)] = glob
        return local, glob

    def gate_values(self, v_BTKD: torch.Tensor) -> torch.Tensor:
        """g [B, T, H, 1] from each token's values (per token: local under context parallelism)."""
        B, T = v_BTKD.shape[:2]
        return torch.sigmoid(self.gate(v_BTKD.reshape(B, T, -1)))[..., None]

    def forward(self, q_BTHD, k_BTKD, v_BTKD, ctx: AttnContext):
        if ctx.group is not None:  # context parallel: this rank's shard, K/V over the ring
            from dcwdist.parallel.caa_cp import caa_cp_attention
            return caa_cp_attention(self, q_BTHD, k_BTKD, v_BTKD, ctx)
        cfg = self.cfg
        local_lays, global_lay = self.layouts(q_BTHD, k_BTKD, ctx)
        # Rows of the per-width layouts are disjoint: merging by LSE just picks each row's own.
        local, _ = merge_partials([attend_layout(q_BTHD, k_BTKD, v_BTKD, lay, None, cfg.impl,
                                                 cfg.chunk_size) for lay in local_lays])
        glob, _ = attend_layout(q_BTHD, k_BTKD, v_BTKD, global_lay, None, cfg.impl, cfg.chunk_size)
        g = self.gate_values(v_BTKD)
        return (g * local + (1 - g) * glob).to(q_BTHD.dtype)
