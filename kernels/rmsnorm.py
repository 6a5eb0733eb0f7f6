"""RMSNorm in one Triton kernel per direction, and its pure-torch reference.

y = w * round(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), computed in fp32; round() casts to
x's dtype (as the Llama / Qwen2 reference does), and y has the dtype of w * x (torch's type
promotion: fp32 under autocast with fp32 weights, bf16 under DeepSpeed's bf16 module). The
torch version runs ~6 elementwise kernels forward and more backward, each a full pass over
[tokens, dim] in fp32; at 128k tokens they were a visible part of a training step's
elementwise time. Forward keeps x and rstd [N] fp32; backward is one pass for dx plus per-program
partial sums of dw (summed in torch).

Shapes: x [..., D] (any leading dims, last dim contiguous), w [D].
Backward treats round() as identity (as autograd does for the cast): dx = rstd * (g - xhat *
mean(g * xhat)), g = dy * w, xhat = x * rstd; dw = sum_rows dy * round(xhat).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm", "rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama / Qwen2 RMSNorm in torch ops."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@triton.jit
def _fwd(X, W, Y, RSTD, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    row0 = tl.program_id(0) * ROWS
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    for r in range(ROWS):
        base = (row0 + r).to(tl.int64) * D
        x = tl.load(X + base + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + base + cols, (w * xhat).to(Y.dtype.element_ty), mask=ok)
        tl.store(RSTD + row0 + r, rstd)


@triton.jit
def _bwd(X, W, DY, RSTD, DX, DW, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    row0 = pid * ROWS
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(ROWS):
        base = (row0 + r).to(tl.int64) * D
        x = tl.load(X + base + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row0 + r)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
        tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW + pid.to(tl.int64) * D + cols, dw, mask=ok)


def _rows_per_program(n: int) -> int:
    """Rows per program: a divisor of n, so no row test in the loops; larger with many rows so
    dw's partial sums stay few."""
    for rows in (16, 8, 4, 2):
        if n % rows == 0 and n // rows >= 1024:
            return rows
    return 1


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        D = x.shape[-1]
        x2 = x.reshape(-1, D)
        if x2.stride(-1) != 1 or x2.stride(0) != D:
            x2 = x2.contiguous()
        N = x2.shape[0]
        y = torch.empty(x2.shape, dtype=torch.result_type(w, x), device=x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        rows = _rows_per_program(N)
        block = triton.next_power_of_2(D)
        if N:
            _fwd[(N // rows,)](x2, w, y, rstd, D, eps, ROWS=rows, BLOCK_D=block)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape, ctx.rows, ctx.block = x.shape, rows, block
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        D, N = x2.shape[1], x2.shape[0]
        dy2 = dy.reshape(-1, D)
        if dy2.stride(-1) != 1 or dy2.stride(0) != D:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        parts = torch.empty(max(N // ctx.rows, 1), D, dtype=torch.float32, device=x2.device)
        if N:
            _bwd[(N // ctx.rows,)](x2, w, dy2, rstd, dx, parts, D, ROWS=ctx.rows,
                                   BLOCK_D=ctx.block)
        else:
            parts.zero_()
        return dx.view(ctx.shape), parts.sum(0).to(w.dtype), None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm (see the module doc); equals rms_norm_reference up to rounding."""
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"rms_norm: x's last dim {x.shape[-1]} != weight size {w.shape[0]}")
    return _RMSNorm.apply(x, w, float(eps))
