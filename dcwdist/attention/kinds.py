"""Per-layer attention modules, one per `attention.kind`, and the registry that builds them.

Every module maps post-RoPE q [B,T,H,D], k/v [B,T,Hkv,D] and the forward's AttnContext to the
attention output [B,T,H,D]. Kinds with learned parts (DCW's alpha, CAA's gate) own them here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.reference import chunked_local_attention


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
        out, _ = chunked_local_attention(q, k, v, ctx.doc_ids, self.cfg.window,
                                         self.cfg.chunk_size)
        return out


ATTENTION_KINDS: dict[str, type[AttentionKind]] = {
    "dense": DenseAttention,
    "window": WindowAttention,
}


def build_attention(cfg: AttentionConfig, layer_idx: int, n_heads: int, n_kv_heads: int,
                    head_dim: int) -> AttentionKind:
    if cfg.kind not in ATTENTION_KINDS:
        raise ValueError(f"attention.kind={cfg.kind} is not available; available: "
                         f"{', '.join(sorted(ATTENTION_KINDS))}")
    return ATTENTION_KINDS[cfg.kind](cfg, layer_idx, n_heads, n_kv_heads, head_dim)
