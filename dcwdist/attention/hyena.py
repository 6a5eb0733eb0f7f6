"""Hyena long-convolution operator of order 2 (attention.kind=hyena; Poli et al. 2023, seed 000's
baseline) in the attention slot of the model.

Shapes: q_BTHD [B, T, H, D] post-RoPE; k_BTKD / v_BTKD [B, T, Hkv, D], repeated to H heads as
attention does (GQA: query head h reads kv head h // (H / Hkv)); channels C = H * D; filters
h_LC [L, C] (lag, channel).

    y = q ⊙ (h2 * (k ⊙ (h1 * v)))           * : causal convolution along time, per channel

The model's q / k / v projections serve as Hyena's three input projections: v is the input, k
and q the two gates (post-RoPE, so the gates carry a position-dependent rotation; Hyena's own
short depthwise convolution on the projections is not reproduced). Filters are implicit and
per channel:
    h_i(t)[c] = w_c(t) * (1 + MLP(z(t))[i, c]),   w_c(t) = (1 - exp(-a_c)) * exp(-a_c * t)
z(t): t / hyena_decay_len and sin / cos of t at 8 periods from 2 tokens to hyena_decay_len;
MLP: Linear-sin-Linear-sin-Linear, hyena_filter_hidden wide, 2 filters per channel out. w_c is
Hyena's exponential decay window, normalised to sum 1 over t >= 0; a_c = ln 2 / half-life with
half-lives spread geometrically over each head's D channels from 1 token to hyena_decay_len.
The model draws every matrix at init_std (0.02), so at init MLP ~ 0 and each filter is an
exponential moving average of its channel: outputs stay bounded at any length.

Exact, causal and per document: the convolution is an FFT of length 2L (zero padded: no
wrap-around), run on each document alone -- a packed row is cut into its runs of equal doc ids
(padding, -1, outputs 0). Cost per layer: O(sum_d L_d log L_d * C) for the FFTs (3 real FFTs of
size 2 L_d per convolution, the filter's shared by a row's equal-length documents only when they
are whole rows) plus a Python loop of one call per document run; rows that are one whole
document go in one batched call. `hyena_reference` is the direct O(T^2) causal convolution.

No kernel path: impl=triton also runs the torch FFT. No context parallelism (a sharded FFT
convolution is not implemented): cp > 1 raises. attention_flops: no attention layouts to count
(flop_layouts raises).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext

NUM_BANDS = 8
"""sin / cos pairs of the filter's positional features."""


class _Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


def fft_causal_conv(x_NLC: torch.Tensor, h_LC: torch.Tensor) -> torch.Tensor:
    """y[n, t, c] = sum_{s <= t} h[t - s, c] x[n, s, c], by FFT of length 2L (no wrap-around)."""
    L = x_NLC.shape[1]
    X = torch.fft.rfft(x_NLC, n=2 * L, dim=1)
    Hf = torch.fft.rfft(h_LC[:L], n=2 * L, dim=0)
    return torch.fft.irfft(X * Hf, n=2 * L, dim=1)[:, :L]


def doc_runs(doc_BT: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every run of equal non-negative doc ids."""
    B, T = doc_BT.shape
    change = torch.ones(B, T + 1, dtype=torch.bool, device=doc_BT.device)
    change[:, 1:T] = doc_BT[:, 1:] != doc_BT[:, :-1]
    runs = []
    for b in range(B):
        cuts = change[b].nonzero().squeeze(1).tolist()
        ids = doc_BT[b].tolist()
        runs += [(b, s, e) for s, e in zip(cuts[:-1], cuts[1:]) if ids[s] >= 0]
    return runs


class HyenaOperator(nn.Module):
    """Order-2 Hyena with implicit per-channel filters; owns the filter MLP."""

    def __init__(self, cfg: AttentionConfig, layer_idx: int, n_heads: int, n_kv_heads: int,
                 head_dim: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        C, hidden = n_heads * head_dim, cfg.hyena_filter_hidden
        self.filter_mlp = nn.Sequential(
            nn.Linear(1 + 2 * NUM_BANDS, hidden), _Sin(), nn.Linear(hidden, hidden), _Sin(),
            nn.Linear(hidden, 2 * C))

    def filters(self, L: int, dtype: torch.dtype) -> torch.Tensor:
        """[2, L, C] filters h1, h2 for lags 0 .. L-1, computed in `dtype` (fp32 or fp64)."""
        cfg, dev = self.cfg, self.filter_mlp[0].weight.device
        span = math.log10(cfg.hyena_decay_len)
        t = torch.arange(L, device=dev, dtype=dtype)[:, None]
        angle = 2 * math.pi * t / torch.logspace(math.log10(2), span, NUM_BANDS, device=dev,
                                                 dtype=dtype)
        z = torch.cat([t / cfg.hyena_decay_len, torch.sin(angle), torch.cos(angle)], -1)
        mod = self.filter_mlp(z.to(self.filter_mlp[0].weight.dtype)).to(dtype)  # [L, 2C]
        half_life = torch.logspace(0, span, self.head_dim, device=dev, dtype=dtype)
        a = (math.log(2) / half_life).repeat(self.n_heads)  # [C]
        window = (1 - torch.exp(-a)) * torch.exp(-a * t)  # [L, C]
        return (window.repeat(1, 2) * (1 + mod)).view(L, 2, -1).transpose(0, 1)

    def _inputs(self, q_BTHD, k_BTKD, v_BTKD):
        B, T, H, D = q_BTHD.shape
        rep = H // k_BTKD.shape[2]
        acc = torch.promote_types(q_BTHD.dtype, torch.float32)  # no bf16 FFT
        flat = lambda x: x.repeat_interleave(rep, 2).reshape(B, T, H * D).to(acc)  # noqa: E731
        return q_BTHD.reshape(B, T, H * D).to(acc), flat(k_BTKD), flat(v_BTKD), acc

    def forward(self, q_BTHD, k_BTKD, v_BTKD, ctx: AttnContext):
        if ctx.group is not None:
            raise ValueError("attention.kind=hyena has no context-parallel path; use cp=1")
        q, k, v, acc = self._inputs(q_BTHD, k_BTKD, v_BTKD)
        doc = ctx.doc_ids
        B, T = doc.shape
        h1, h2 = self.filters(T, acc)
        if bool((doc >= 0).all()) and bool((doc == doc[:, :1]).all()):  # whole-row documents
            y = q * fft_causal_conv(k * fft_causal_conv(v, h1), h2)
        else:
            if "hyena_runs" not in ctx.cache:  # one host sync per forward, shared by the layers
                ctx.cache["hyena_runs"] = doc_runs(doc)
            y = torch.zeros_like(q)
            for b, s, e in ctx.cache["hyena_runs"]:
                u = k[b:b + 1, s:e] * fft_causal_conv(v[b:b + 1, s:e], h1)
                y[b:b + 1, s:e] = q[b:b + 1, s:e] * fft_causal_conv(u, h2)
        return y.view(q_BTHD.shape).to(q_BTHD.dtype)

    @staticmethod
    def flop_layouts(cfg: AttentionConfig, ctx: AttnContext) -> dict:
        raise ValueError("attention_flops: kind=hyena has no attention layouts (FFT long "
                         "convolution, about 2 * 3 * 2.5 * 2T log2(2T) FLOPs per channel)")


def hyena_reference(module: HyenaOperator, q_BTHD, k_BTKD, v_BTKD, doc_BT) -> torch.Tensor:
    """The module's output by direct O(T^2) causal convolution, masked to each document."""
    q, k, v, acc = module._inputs(q_BTHD, k_BTKD, v_BTKD)
    T = q.shape[1]
    h1, h2 = module.filters(T, acc)
    t = torch.arange(T, device=q.device)
    lag = t[:, None] - t[None, :]
    same = (doc_BT[:, :, None] == doc_BT[:, None, :]) & (doc_BT[:, :, None] >= 0)
    mask = ((lag >= 0)[None] & same).to(acc)[..., None]  # [B, T, T, 1]

    def conv(x, h):
        return torch.einsum("btsc,bsc->btc", h[lag.clamp_min(0)][None] * mask, x)

    y = q * conv(k * conv(v, h1), h2)
    return y.view(q_BTHD.shape).to(q_BTHD.dtype)


KINDS: dict = {"hyena": HyenaOperator}
"""attention.kind -> module class, merged into kinds.ATTENTION_KINDS."""
