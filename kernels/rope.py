"""Rotary position embedding (rotate-half, Llama / Qwen2) in one Triton kernel per direction, and
its pure-torch reference.

y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (halves of the head dim). The
torch version runs ~5 elementwise kernels forward (slices, neg, cat, two products and a sum)
and more backward, each a full pass over [tokens, heads, head_dim], in cos/sin's dtype (fp32
under autocast), then a cast. Here one pass reads x, cos, sin and writes y in out_dtype,
computing in fp32; backward is the same pass with the rotation transposed:
dx1 = dy1 * cos1 + dy2 * sin2, dx2 = dy2 * cos2 - dy1 * sin1, written in x's dtype.

Shapes: x [B, T, H, D] (heads and head dim contiguous), cos / sin [B, T, 1, D] or [B, T, D]
(rope.rope_cos_sin; no gradient flows to them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["apply_rope_fused", "apply_rope_reference"]


def apply_rope_reference(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """The model's torch RoPE (rope.apply_rope) followed by the cast to out_dtype."""
    from dcwdist.model.rope import apply_rope
    return apply_rope(x_BTHD, cos, sin).to(out_dtype)


@triton.jit
def _rope(X, COS, SIN, Y, n_rows, H, D, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
          BACKWARD: tl.constexpr):
    """BLOCK_R (token, head) rows of HALF-wide halves; a row's cos / sin row is its token's."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HALF)
    ok = (rows < n_rows)[:, None]
    x_at = rows.to(tl.int64)[:, None] * D + cols[None, :]
    cs_at = (rows // H).to(tl.int64)[:, None] * D + cols[None, :]
    x1 = tl.load(X + x_at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_at + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(COS + cs_at, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs_at + HALF, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs_at, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs_at + HALF, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of [[c1, -s1], [s2, c2]]
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(Y + x_at, y1.to(Y.dtype.element_ty), mask=ok)
    tl.store(Y + x_at + HALF, y2.to(Y.dtype.element_ty), mask=ok)


_BLOCK_R = 16  # rows per program: 32 registers per thread at D=64, 68 at D=128 (ptxas, sm_90a)


def _launch(x, cos, sin, out_dtype, backward: bool) -> torch.Tensor:
    B, T, H, D = x.shape
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n_rows = B * T * H
    if n_rows:
        _rope[(triton.cdiv(n_rows, _BLOCK_R),)](x, cos, sin, y, n_rows, H, D, HALF=D // 2,
                                               BLOCK_R=_BLOCK_R, BACKWARD=backward)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, out_dtype):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _launch(x, cos, sin, out_dtype, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy.contiguous(), cos, sin, ctx.x_dtype, True), None, None, None


def apply_rope_fused(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """RoPE of x in one kernel, the result in out_dtype; equals apply_rope_reference up to
    rounding (fp32 math here, cos/sin's dtype there)."""
    if x_BTHD.dim() != 4 or x_BTHD.shape[-1] % 2:
        raise ValueError(f"apply_rope_fused: x must be [B, T, H, D] with even D, got "
                         f"{tuple(x_BTHD.shape)}")
    B, T, H, D = x_BTHD.shape
    cos, sin = cos.reshape(B, T, D), sin.reshape(B, T, D)  # [B, T, 1, D] views are free
    if cos.stride() != (T * D, D, 1):
        cos = cos.contiguous()
    if sin.stride() != (T * D, D, 1):
        sin = sin.contiguous()
    if x_BTHD.stride()[1:] != (H * D, D, 1) or x_BTHD.stride(0) != T * H * D:
        x_BTHD = x_BTHD.contiguous()
    if D // 2 & (D // 2 - 1):
        raise ValueError(f"apply_rope_fused: head dim {D} must be twice a power of two")
    return _Rope.apply(x_BTHD, cos.detach(), sin.detach(), out_dtype)
