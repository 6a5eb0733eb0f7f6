"""Per-layer attention modules, one per `attention.kind`, and the registry that builds them.

Every module maps post-RoPE q [B,T,H,D], k/v [B,T,Hkv,D] and the forward's AttnContext to the
attention output [B,T,H,D]. Kinds with learned parts (DCW's alpha, CAA's gate) own them here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dcwdist.attention.caa import CAAAttention
from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.dcw import DCWAttention
from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.layouts import (ROW_CAUSAL, ROW_WINDOW, compact_far_layout, doc_position,
                                       local_layout, pad_doc)
from dcwdist.attention.reference import chunked_local_attention
from dcwdist.attention.topk import BlockTopkAttention


class AttentionKind(nn.Module):
    def __init__(self, cfg: AttentionConfig, layer_idx: int, n_heads: int, n_kv_heads: int,
                 head_dim: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim


class DenseAttention(AttentionKind):
    """Full causal attention within each document."""

    def forward(self, q, k, v, ctx: AttnContext):
        if ctx.group is not None:  # context parallel: ring over the cp group
            from dcwdist.parallel.ring import dense_cp_attention
            return dense_cp_attention(self.cfg, q, k, v, ctx)
        if self.cfg.impl == "triton":
            return _run_local(self.cfg, q, k, v, ctx, ROW_CAUSAL, 0)
        single_doc = bool((ctx.doc_ids == ctx.doc_ids[:, :1]).all())
        if single_doc:
            # One document per row: plain causal SDPA (flash/cuDNN on GPU, exact on CPU).
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=self.n_heads != self.n_kv_heads)
            return out.transpose(1, 2)
        out, _ = chunked_local_attention(q, k, v, ctx.doc_ids, None, self.cfg.chunk_size)
        return out


class WindowAttention(AttentionKind):
    """Causal sliding window (i - j < attention.window) within each document."""

    def forward(self, q, k, v, ctx: AttnContext):
        if self.cfg.impl == "triton":
            return _run_local(self.cfg, q, k, v, ctx, ROW_WINDOW, self.cfg.window)
        out, _ = chunked_local_attention(q, k, v, ctx.doc_ids, self.cfg.window,
                                         self.cfg.chunk_size)
        return out


def _run_local(cfg: AttentionConfig, q, k, v, ctx: AttnContext, row_kind: int, window: int):
    """dense / window through a layout (the kernel path); the layout is cached for all layers."""
    key = ("local", cfg.block_size, row_kind, window)
    if key not in ctx.cache:
        rows = torch.full_like(ctx.doc_ids[:, ::cfg.block_size], row_kind)
        ctx.cache[key] = local_layout(ctx.doc_ids, cfg.block_size, rows, window)
    T, pad = q.shape[1], (-q.shape[1]) % cfg.block_size
    if pad:  # the kernel tiles whole blocks: zero-pad (pads are doc -1, read by nothing)
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    out, _ = attend_layout(q, k, v, ctx.cache[key], None, cfg.impl, cfg.chunk_size, ctx.kept)
    return out[:, :T]


def static_sparse_layouts(cfg: AttentionConfig, ctx: AttnContext):
    """(window layout, global layout over the compact first-num_global-tokens set, gather index).

    Global keys are read only at i - j >= window (MODE_FAR), disjoint from the window, so the
    two partial softmaxes merge by LSE into one.
    """
    key = ("static_sparse", cfg.block_size, cfg.window, cfg.num_global)
    if key not in ctx.cache:
        blk, doc = cfg.block_size, ctx.doc_ids
        rows = torch.full_like(doc[:, ::blk], ROW_WINDOW)
        local = local_layout(doc, blk, rows, cfg.window)
        glob_sel = doc_position(pad_doc(doc, blk)) < cfg.num_global
        glob, idx = compact_far_layout(doc, blk, glob_sel, rows == ROW_WINDOW, cfg.window)
        ctx.cache[key] = (local, glob, idx)
    return ctx.cache[key]


class StaticSparseAttention(AttentionKind):
    """Window `window` plus the first `num_global` tokens of each document, one softmax."""

    def forward(self, q, k, v, ctx: AttnContext):
        cfg = self.cfg
        local, glob, idx = static_sparse_layouts(cfg, ctx)
        bi = torch.arange(q.shape[0], device=q.device)[:, None]
        out, _ = merge_partials([
            attend_layout(q, k, v, local, None, cfg.impl, cfg.chunk_size, ctx.kept),
            attend_layout(q, k[bi, idx], v[bi, idx], glob, None, cfg.impl, cfg.chunk_size,
                          ctx.kept)])
        return out


ATTENTION_KINDS: dict[str, type[nn.Module]] = {
    "dense": DenseAttention,
    "window": WindowAttention,
    "static_sparse": StaticSparseAttention,
    "block_topk": BlockTopkAttention,
    "caa": CAAAttention,
    "dcw": DCWAttention,
}


def _register_families() -> None:
    """Kinds living in their own modules register themselves through a KINDS dict there."""
    from dcwdist.attention import hyena, memory, windows
    for mod in (windows, memory, hyena):
        ATTENTION_KINDS.update(mod.KINDS)


_register_families()


def build_attention(cfg: AttentionConfig, layer_idx: int, n_heads: int, n_kv_heads: int,
                    head_dim: int, n_layers: Optional[int] = None) -> nn.Module:
    """The layer's attention module; n_layers (the model depth) serves per-layer windows."""
    if cfg.kind not in ATTENTION_KINDS:
        raise ValueError(f"attention.kind={cfg.kind} is not available; available: "
                         f"{', '.join(sorted(ATTENTION_KINDS))}")
    module = ATTENTION_KINDS[cfg.kind](cfg, layer_idx, n_heads, n_kv_heads, head_dim)
    module.n_layers = n_layers  # read by windows.layer_window (window_schedule / window_growth)
    return module
