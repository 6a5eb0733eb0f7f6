"""The SwiGLU gate, silu(g) * u, in one Triton kernel per direction, and its torch reference.

torch runs silu then a product forward (keeping silu(g) for backward: one more [tokens, ffn]
tensor) and three products plus silu's backward after. Here forward reads g and u once and
writes h; backward reads dh, g and u once and writes dg and du, recomputing sigmoid(g):
dg = dh * u * s * (1 + g * (1 - s)), du = dh * g * s, s = sigmoid(g). fp32 math; outputs in
the inputs' dtype (g and u share one). Shapes: g, u [..., F], same shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["swiglu", "swiglu_reference"]


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


@triton.jit
def _swiglu(G, U, DH, H_OR_DG, DU, n, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = at < n
    g = tl.load(G + at, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + at, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    if BACKWARD:
        dh = tl.load(DH + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(H_OR_DG + at, (dh * u * s * (1.0 + g * (1.0 - s))).to(H_OR_DG.dtype.element_ty),
                 mask=ok)
        tl.store(DU + at, (dh * g * s).to(DU.dtype.element_ty), mask=ok)
    else:
        tl.store(H_OR_DG + at, (g * s * u).to(H_OR_DG.dtype.element_ty), mask=ok)


_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        n = g.numel()
        if n:
            _swiglu[(triton.cdiv(n, _BLOCK),)](g, u, g, h, h, n, BLOCK=_BLOCK, BACKWARD=False)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu[(triton.cdiv(n, _BLOCK),)](g, u, dh, dg, du, n, BLOCK=_BLOCK, BACKWARD=True)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u fused (see the module doc); equals swiglu_reference up to rounding."""
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"swiglu: gate and up must share shape and dtype; got "
                         f"{tuple(g.shape)} {g.dtype}, {tuple(u.shape)} {u.dtype}")
    return _SwiGLU.apply(g, u)
