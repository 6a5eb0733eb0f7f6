"""Llama/Qwen2-style decoder whose attention pattern is pluggable (`attention.kind`).

Legend: B batch, T tokens, D model dim, H query heads, K kv heads, E head dim, V vocab.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dcwdist.attention import AttentionConfig, AttnContext, build_attention
from dcwdist.kernels.rmsnorm import rms_norm, rms_norm_reference
from dcwdist.kernels.rope import apply_rope_fused
from dcwdist.kernels.swiglu import swiglu, swiglu_reference
from dcwdist.model.activations import KeptOutputs, OffloadSaved, checkpoint_context, tiled
from dcwdist.model.config import ModelConfig
from dcwdist.model.loss import chunked_cross_entropy_sum
from dcwdist.model.rope import RopeConfig, apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    """RMSNorm; impl (ModelConfig.norm_impl) picks the torch ops or the fused Triton kernel."""

    def __init__(self, dim: int, eps: float, impl: str = "torch"):
        super().__init__()
        self.eps, self.impl = eps, impl
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.impl == "triton" or (self.impl == "auto" and x.is_cuda):
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); with `tile` > 0, over tiles of that many tokens, each
    recomputed in backward (`activations.tiled`)."""

    def __init__(self, dim: int, hidden: int, tile: int = 0, impl: str = "torch"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.tile, self.impl = tile, impl

    def forward(self, x):
        return tiled(self._mlp, x, self.tile) if self.tile else self._mlp(x)

    def _mlp(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        if self.impl == "triton" or (self.impl == "auto" and g.is_cuda):
            return self.down_proj(swiglu(g, u))
        return self.down_proj(swiglu_reference(g, u))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig, layer_idx: int):
        super().__init__()
        E = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, E
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * E, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * E, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * E, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * E, cfg.dim, bias=False)
        self.attn = build_attention(attn_cfg, layer_idx, cfg.n_heads, cfg.n_kv_heads, E,
                                    n_layers=cfg.n_layers)
        half = E // 2
        # auto takes the fused kernel on CUDA when it applies (head dim twice a power of two)
        self.rope_impl = "torch" if cfg.rope_impl == "auto" and half & (half - 1) else cfg.rope_impl

    def forward(self, x_BTD, cos, sin, ctx: AttnContext):
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        # q, k leave RoPE in v's dtype: the block-sparse kernel needs one dtype for q, k, v.
        if self.rope_impl == "triton" or (self.rope_impl == "auto" and q.is_cuda):
            q, k = apply_rope_fused(q, cos, sin, v.dtype), apply_rope_fused(k, cos, sin, v.dtype)
        else:  # in cos/sin's dtype (fp32 under autocast with an fp32 residual stream), then cast
            q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        out_BTHE = self.attn(q, k, v, ctx)
        return self.o_proj(out_BTHE.reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_impl)
        self.self_attn = SelfAttention(cfg, attn_cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_impl)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_hidden, cfg.tiled_mlp, cfg.swiglu_impl)
        self.layer_idx = layer_idx

    def forward(self, x, cos, sin, ctx: AttnContext):
        if ctx.kept is not None:  # the first forward and the recompute number kernel calls alike
            ctx.kept.begin_layer(self.layer_idx)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class VocabProjection(nn.Module):
    """Token embedding and/or output projection over one [V, D] weight.

    Both directions go through `forward` (integer input: lookup; hidden states: logits or, with
    labels, the chunked summed CE), because ZeRO-3 gathers a module's weight only in its forward
    hooks. A tied model uses one instance for both.
    """

    def __init__(self, vocab_size: int, dim: int, loss_chunk: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.loss_chunk = loss_chunk

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not x.is_floating_point():
            return F.embedding(x, self.weight)
        if labels is not None:
            return chunked_cross_entropy_sum(x, self.weight, labels, self.loss_chunk)
        return x @ self.weight.t()


class Transformer(nn.Module):
    """Decoder-only LM. `forward` returns final hidden states; `loss_sum` the summed token CE.

    `segmenter` (optional) runs once per forward on the input embeddings and fills the context's
    tiers/scores for the DCW layers (DESIGN.md "Scores -> tiers").
    """

    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig,
                 segmenter: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.attn_cfg = attn_cfg
        self.rope_cfg: RopeConfig = cfg.rope
        self.embed_tokens = VocabProjection(cfg.vocab_size, cfg.dim, cfg.loss_chunk)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attn_cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_impl)
        self.lm_head = (None if cfg.tie_embeddings
                        else VocabProjection(cfg.vocab_size, cfg.dim, cfg.loss_chunk))
        self.segmenter = segmenter
        self.reset_parameters()

    def reset_parameters(self):
        for name, p in self.named_parameters():
            if name.startswith("segmenter."):
                continue
            if p.dim() >= 2:
                nn.init.normal_(p, std=self.cfg.init_std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    @property
    def head(self) -> VocabProjection:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def set_rope(self, rope: RopeConfig) -> None:
        """Switch RoPE settings (a progressive stage changes base or scaling)."""
        self.rope_cfg = rope

    def forward(self, tokens_BT: torch.Tensor, ctx: AttnContext,
                labels_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final hidden states [B, T, D]; with labels, the summed token CE instead (so that a
        wrapping engine such as DeepSpeed sees the whole step as one forward)."""
        h = self.embed_tokens(tokens_BT)
        if self.segmenter is not None:
            self.segmenter(h, tokens_BT, ctx)
            if ctx.group is not None:  # context parallel: re-deal the shards by the tiers' work
                from dcwdist.parallel.balance import rebalance
                moved = rebalance(ctx, self.attn_cfg, labels_BT is not None)
                if moved is not None:
                    tokens_BT, labels_BT = moved
                    h = self.embed_tokens(tokens_BT)
        cos, sin = rope_cos_sin(self.rope_cfg, self.cfg.head_dim, ctx.positions, h.dtype)
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        keep = ckpt and self.cfg.keep_attention_outputs
        # the torch attention path keeps SDPA's outputs through the checkpoint's policy
        context_fn = checkpoint_context(keep and self.attn_cfg.impl == "torch")
        if not (ckpt and self.cfg.offload_activations):
            ctx.kept = KeptOutputs() if keep else None
            for layer in self.layers:
                h = (checkpoint(layer, h, cos, sin, ctx, use_reentrant=False,
                                context_fn=context_fn) if ckpt
                     else layer(h, cos, sin, ctx))
            h = self.norm(h)
            return h if labels_BT is None else self.loss_sum(h, labels_BT)
        # Offload: every tensor of at least hidden-state size that autograd keeps from here to
        # backward goes to host memory. Inside the checkpoints that is each layer's input; the
        # final norm is checkpointed too so its input is all it keeps; the loss keeps its
        # gradient with respect to the hidden states (model/loss.py).
        offload = OffloadSaved(min_numel=h.numel())
        ctx.kept = KeptOutputs(offload) if keep else None
        with offload:
            for i, layer in enumerate(self.layers):
                offload.begin_group(i)
                h = checkpoint(layer, h, cos, sin, ctx, use_reentrant=False,
                               context_fn=context_fn)
            offload.begin_group(len(self.layers))
            h = checkpoint(self.norm, h, use_reentrant=False)
            out = h if labels_BT is None else self.loss_sum(h, labels_BT)
        ctx.cache["offloaded_bytes"] = offload.offloaded_bytes
        return out

    def loss_sum(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Summed next-token CE over labels >= 0, chunked so the logits never exist in full."""
        return self.head(hidden_BTD, labels_BT)

    def logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """Full logits (evaluation / generation on short spans only)."""
        return self.head(hidden_BTD)
