"""Prefill throughput, peak memory and attention FLOPs against dense, per length (and DCW tier).

Peak memory is `peak_memory_gib`: max allocated CUDA memory (reset before each length), or on CPU
the process's peak RSS, which only grows -- read CPU numbers as an upper bound. Attention FLOPs
come from `attention_flops` on the same row (one layer, times the number of layers).
"""
from __future__ import annotations

import time

import torch

from dcwdist.attention.flops import TIER_NAMES, attention_flops
from dcwdist.eval.positions import context_for
from dcwdist.train.logging import peak_memory_gib


@torch.no_grad()
def prefill_speed(model, batch, repeats: int = 2) -> dict:
    """Tokens/s of the no-grad forward over `batch` (best of `repeats` after one warm-up) and the
    attention FLOPs of its last forward."""
    dev = batch.tokens.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.eval()
    best = float("inf")
    for i in range(repeats + 1):
        ctx = context_for(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        model(batch.tokens, ctx)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:  # the first run warms up (allocator, kernels)
            best = min(best, time.perf_counter() - t0)
    cfg = model.cfg
    fl = attention_flops(model.attn_cfg, ctx, cfg.n_heads, cfg.head_dim)
    n = cfg.n_layers
    tokens = batch.tokens.numel()
    row = {"length": batch.tokens.shape[1], "prefill_tok_s": round(tokens / best, 1),
           "peak_mem_gib": round(peak_memory_gib(dev), 3),
           "attn_gflops": round(n * fl["computed"] / 1e9, 4),
           "dense_gflops": round(n * fl["dense"] / 1e9, 4),
           "density": round(fl["density"], 4)}
    for name in TIER_NAMES:
        if "by_tier" in fl:
            row[f"{name}_gflops"] = round(n * fl["by_tier"][name] / 1e9, 4)
    return row
