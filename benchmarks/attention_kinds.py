"""Every attention kind as the model runs it (its module, impl=triton), fwd+bwd on one GPU.

    PYTHONPATH=. python benchmarks/attention_kinds.py --lengths 32768 131072 --out kinds.jsonl

One JSON line per (kind, length): fwd+bwd ms with the per-forward layouts already cached (the
model builds them once per forward for all layers), layout_ms (building them on a fresh
context, once per forward), computed attention FLOPs as a share of dense causal (from the
kind's own layouts, `attention_flops`; hyena: none) and peak memory. B=1, one document,
H=16 query heads, 4 KV heads, D=128, bf16. Kind settings are in KINDS below; dcw uses seeded
random tiers with exact 20/30/50 ratios (as benchmarks/attention.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkout import dcw_tiers, map_packages  # noqa: E402

map_packages()

from dcwdist.attention import AttentionConfig, AttnContext, attention_flops, build_attention  # noqa: E402

H, HKV, D, BLK = 16, 4, 128, 64
KINDS = {
    "dense": {},
    "window_512": {"kind": "window", "window": 512},
    "window_4096": {"kind": "window", "window": 4096},
    "multi_window": {"kind": "multi_window", "head_windows": [64, 512, 2048, 4096]},
    "s2attn": {"kind": "s2attn", "s2_group": 4096},
    "random_global": {"kind": "random_global", "window": 512, "random_blocks": 3,
                      "num_global": 64},
    "hierarchical": {"kind": "hierarchical", "segment_size": 512},
    "compressed_memory": {"kind": "compressed_memory", "segment_size": 512},
    "caa": {"kind": "caa"},
    "dcw": {"kind": "dcw", "window": 32, "buffer_window": 64, "stride": 8},
    "hyena": {"kind": "hyena"},
}


def make_ctx(T: int, dev, kind: str) -> AttnContext:
    doc = torch.zeros(1, T, dtype=torch.long, device=dev)
    ctx = AttnContext(doc_ids=doc, positions=torch.arange(T, device=dev)[None])
    if kind == "dcw":
        ctx.tiers = dcw_tiers(T // BLK)[None].to(dev)
    return ctx


def timed(fn, reps: int = 3) -> float:
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def run_case(name: str, T: int, dev) -> dict:
    over = dict(KINDS[name])
    cfg = AttentionConfig(**{"kind": "dense", "impl": "triton", "block_size": BLK, **over})
    module = build_attention(cfg, 0, H, HKV, D).to(dev)
    for p in module.parameters():
        p.data = p.data.to(torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, T, HKV, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, T, HKV, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    ctx = make_ctx(T, dev, cfg.kind)

    def step(c=ctx):
        out = module(q, k, v, c)
        out.backward(do)
        q.grad = k.grad = v.grad = None

    step()  # warm-up: kernel compile/autotune and the cached layouts
    torch.cuda.reset_peak_memory_stats(dev)
    ms = timed(step)
    fresh = timed(lambda: step(make_ctx(T, dev, cfg.kind)))
    row = {"kind": name, "length": T, "fwd_bwd_ms": round(ms, 3),
           "layout_ms": round(max(0.0, fresh - ms), 3),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3),
           "settings": over}
    try:
        fl = attention_flops(cfg, ctx, H, D)
        row["density"] = round(fl["density"], 4)
    except (ValueError, KeyError, NotImplementedError) as e:
        row["density"] = None
        row["density_note"] = str(e).splitlines()[0][:120]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--kinds", nargs="+", default=list(KINDS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "H": H, "Hkv": HKV, "D": D, "block": BLK}
    print(json.dumps({"meta": meta}), flush=True)
    for T in args.lengths:
        for name in args.kinds:
            try:
                row = run_case(name, T, dev)
            except Exception as e:  # one failing kind must not hide the others
                row = {"kind": name, "length": T, "error": f"{type(e).__name__}: {e}"[:300]}
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
