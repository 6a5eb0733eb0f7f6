"""Chunked masked-softmax attention in torch: the semantic reference for every kind.

Shapes: q_BTHD [B, Tq, H, D]; k_BSKD / v_BSKD [B, Tk, Hkv, D] with H % Hkv == 0 (GQA).
Memory is O(chunk * keys-per-chunk), never O(T^2) for windowed patterns.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(q_idx [Cq], k_idx [Ck]) -> bool mask [B or 1, 1, Cq, Ck] of allowed pairs."""


def masked_attention(q_BTHD: torch.Tensor, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor,
                     mask_BQK: torch.Tensor, scale: Optional[float] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under a boolean mask [B, Tq, Tk]; returns (out [B,Tq,H,D], lse [B,H,Tq]).

    Rows with no allowed key give out = 0 and lse = -inf, so LSE merging treats them as empty.
    """
    H, Hkv = q_BTHD.shape[2], k_BSKD.shape[2]
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
    k = k_BSKD.repeat_interleave(H // Hkv, dim=2)
    v = v_BSKD.repeat_interleave(H // Hkv, dim=2)
    acc = torch.promote_types(q_BTHD.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    scores = torch.einsum("bqhd,bkhd->bhqk", q_BTHD.to(acc), k.to(acc)) * scale
    scores = scores.masked_fill(~mask_BQK[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Tq]
    probs = torch.exp(scores - lse.clamp_min(-1e30)[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(acc))
    return out.to(q_BTHD.dtype), lse


def chunked_local_attention(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor,
                            doc_ids_BT: torch.Tensor, window: Optional[int] = None,
                            chunk: int = 1024, scale: Optional[float] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each document, optionally limited to i - j < window.

    Queries go in chunks; each chunk sees keys from (chunk start - window + 1) on, so memory is
    O(chunk * (chunk + window)) for windows and O(chunk * T) for dense.
    """
    B, T = doc_ids_BT.shape
    outs, lses = [], []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        ks = 0 if window is None else max(0, s - window + 1)
        qi = torch.arange(s, e, device=q_BTHD.device)
        kj = torch.arange(ks, e, device=q_BTHD.device)
        mask = (kj[None, :] <= qi[:, None])
        if window is not None:
            mask = mask & (qi[:, None] - kj[None, :] < window)
        same_doc = doc_ids_BT[:, s:e, None] == doc_ids_BT[:, None, ks:e]
        o, l = masked_attention(q_BTHD[:, s:e], k_BTHD[:, ks:e], v_BTHD[:, ks:e],
                                mask[None] & same_doc, scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=-1)


def merge_by_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmaxes over disjoint key sets (out [B,T,H,D], lse [B,H,T]) in fp32."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe).nan_to_num(0.0).transpose(1, 2)[..., None]
    wb = torch.exp(lse_b - safe).nan_to_num(0.0).transpose(1, 2)[..., None]
    acc = torch.promote_types(out_a.dtype, torch.float32)
    out = out_a.to(acc) * wa + out_b.to(acc) * wb
    return out.to(out_a.dtype), lse
