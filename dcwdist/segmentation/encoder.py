"""The scorer's encoder: pre-norm transformer layers with windowed, document-confined attention.

Legend: B batch, T tokens, D scorer dim, H heads, E head dim, C window chunks, W window,
N = keys per chunk (2W causal, 3W bidirectional).

Token i attends to j in the same document (doc id >= 0) with 0 <= i - j < W (causal) or
|i - j| < W (bidirectional), and only to keys allowed by `key_ok` (prefix mode drops answer
tokens). The sequence is cut into chunks of W queries; each chunk reads its own and the
neighbouring chunks' keys, so memory and work are O(T * W): at 1M tokens the scorer never
forms a T x T matrix. Every token may attend to itself, so no softmax row is empty (padding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dcwdist.model.rope import RopeConfig, apply_rope, rope_cos_sin


def window_mask(doc_BT: torch.Tensor, key_ok_BT: torch.Tensor, window: int, causal: bool):
    """Gather indices [C, N] of each chunk's keys and the mask [B, C, W, N] they are read with."""
    B, T = doc_BT.shape
    W, dev = window, doc_BT.device
    C = T // W
    offsets = (-1, 0) if causal else (-1, 0, 1)
    q_idx = torch.arange(T, device=dev).view(C, W)
    k_idx = torch.cat([q_idx + o * W for o in offsets], dim=1)  # [C, N]
    in_range = (k_idx >= 0) & (k_idx < T)
    k_safe = k_idx.clamp(0, T - 1)
    diff = q_idx[:, :, None] - k_idx[:, None, :]  # [C, W, N]
    near = (diff >= 0) & (diff < W) if causal else diff.abs() < W
    doc_q = doc_BT.view(B, C, W)
    doc_k, ok_k = doc_BT[:, k_safe], key_ok_BT[:, k_safe] & in_range  # [B, C, N]
    mask = near & (doc_q[..., None] == doc_k[:, :, None, :]) & ok_k[:, :, None, :]
    return k_safe, mask | (diff == 0)


class WindowedSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x_BTD, cos, sin, k_idx, mask_BCWN):
        B, T, D = x_BTD.shape
        C, N = k_idx.shape
        W = T // C
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.view(B * C, W, self.heads, self.head_dim).transpose(1, 2)
        k = k[:, k_idx].reshape(B * C, N, self.heads, self.head_dim).transpose(1, 2)
        v = v[:, k_idx].reshape(B * C, N, self.heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BCWN.reshape(B * C, 1, W, N))
        return self.out(o.transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = WindowedSelfAttention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x_BTD, cos, sin, k_idx, mask):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, k_idx, mask)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class WindowedEncoder(nn.Module):
    """`num_layers` layers of windowed attention; RoPE on positions within the document."""

    def __init__(self, dim: int, heads: int, num_layers: int, window: int,
                 checkpointing: bool = False):
        super().__init__()
        self.window, self.head_dim = window, dim // heads
        self.checkpointing = checkpointing
        self.layers = nn.ModuleList(EncoderLayer(dim, heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.rope = RopeConfig()

    def forward(self, x_BTD, doc_BT, positions_BT, key_ok_BT, causal: bool):
        """[B, T, D] -> [B, T, D]; T is padded to a multiple of the window internally."""
        B, T, D = x_BTD.shape
        pad = (-T) % self.window
        x = F.pad(x_BTD, (0, 0, 0, pad))
        doc = F.pad(doc_BT, (0, pad), value=-1)
        key_ok = F.pad(key_ok_BT & (doc_BT >= 0), (0, pad), value=False)
        positions = F.pad(positions_BT, (0, pad))
        k_idx, mask = window_mask(doc, key_ok, self.window, causal)
        cos, sin = rope_cos_sin(self.rope, self.head_dim, positions, x.dtype)
        ckpt = self.checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = (checkpoint(layer, x, cos, sin, k_idx, mask, use_reentrant=False) if ckpt
                 else layer(x, cos, sin, k_idx, mask))
        return self.norm(x)[:, :T]
