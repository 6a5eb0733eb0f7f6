"""One attention layer, fwd and fwd+bwd, on one GPU: dcwdist block-sparse kernel vs SDPA and Flex.

    PYTHONPATH=. python benchmarks/attention.py --lengths 8192 32768 131072 --out results.jsonl

Prints (and appends to --out) one JSON line per (impl, length): fwd ms, fwd+bwd ms (medians of
triton.testing.do_bench), TFLOP/s on the work each implementation computes (4·M·N·D per
computed score tile forward; fwd+bwd counted as 3.5× forward, the FlashAttention convention),
density (computed forward work / dense causal work) and peak memory of a fwd+bwd.
H=16, D=128, bf16, B=1, one document, causal. Impls:
  sdpa_cudnn, sdpa_flash     dense causal (torch SDPA backends)
  dcwdist_dense              dense causal through the block-sparse kernel (layout `local`)
  dcwdist_dcw                exact DCW pattern: core 20% of blocks full causal, buffer 30%
                             window 64 + strided keys every 8 (gathered compact set, MODE_FAR),
                             background 50% window 32; three kernel calls merged by LSE
  dcwdist_dcw_xtier          the same + the cross-tier residual over core summaries (pool 4)
  flex_dcw                   FlexAttention on the exact DCW pattern (mask_mod, compiled mask)
  dcwdist_*_atomic           the same with deterministic=False: dQ added with fp32 atomics
                             inside the dK/dV pass instead of a separate dQ pass
Blocks of 128 tokens (--block). Tiers are a seeded random draw with exact ratios, block 0 core.
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
from triton.testing import do_bench  # noqa: E402

from dcwdist.attention import AttentionConfig  # noqa: E402
from dcwdist.attention.dcw import build_dcw_plan, pool_summaries  # noqa: E402
from dcwdist.attention.executor import merge_partials  # noqa: E402
from dcwdist.attention.layouts import local_layout  # noqa: E402
from dcwdist.kernels import _block_sparse_plan  # noqa: E402
from dcwdist.kernels.block_sparse import block_sparse_attention  # noqa: E402

WINDOW, BUFFER_WINDOW, STRIDE, POOL = 32, 64, 8, 4


def tiles(layout) -> int:
    return layout.nnz * layout.q_block * layout.k_block


def make_dcwdist(T, H, D, blk, kind, dev):
    """(fn(q, k, v) -> out [B,T,H,D], computed score entries per head)."""
    deterministic = not kind.endswith("_atomic")
    kind = kind.removesuffix("_atomic")

    def bsa(q, k, v, layout):
        return block_sparse_attention(q, k, v, layout, deterministic=deterministic)
    doc = torch.zeros(1, T, dtype=torch.long, device=dev)
    if kind == "dense":
        lay = local_layout(doc, blk)
        return (lambda q, k, v: bsa(q, k, v, lay)[0]), tiles(lay)
    cfg = AttentionConfig(kind="dcw", block_size=blk, window=WINDOW,
                          buffer_window=BUFFER_WINDOW, stride=STRIDE, summary_pool=POOL)
    plan = build_dcw_plan(cfg, doc, dcw_tiers(T // blk).to(dev)[None])
    bi = torch.zeros(1, 1, dtype=torch.long, device=dev)
    work = tiles(plan.local) + tiles(plan.buffer) + tiles(plan.strided)

    def local(q, k, v):
        k_s, v_s = k[bi, plan.strided_idx], v[bi, plan.strided_idx]
        return merge_partials([bsa(q, k, v, plan.local), bsa(q, k, v, plan.buffer),
                               bsa(q, k_s, v_s, plan.strided)])[0]
    if kind == "dcw":
        return local, work

    def with_xtier(q, k, v):
        k_sum = pool_summaries(k, doc, plan.core_idx, blk, POOL)
        v_sum = pool_summaries(v, doc, plan.core_idx, blk, POOL)
        return local(q, k, v) + 0.5 * bsa(q, k_sum, v_sum, plan.summary)[0]
    return with_xtier, work + tiles(plan.summary)


def make_sdpa(T, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def fn(q, k, v):
        with sdpa_kernel(be):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)
    return fn, T * (T + 1) // 2


def make_flex_dcw(T, blk, dev):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    tier = dcw_tiers(T // blk).to(dev)

    def mask_mod(b, h, q_idx, kv_idx):
        t = tier[q_idx // blk]
        d = q_idx - kv_idx
        strided = (kv_idx % STRIDE == 0) & (d >= BUFFER_WINDOW)
        buffer = (t == 1) & ((d < BUFFER_WINDOW) | strided)
        return (d >= 0) & ((t == 0) | buffer | ((t == 2) & (d < WINDOW)))

    mask = create_block_mask(mask_mod, None, None, T, T, device=dev, BLOCK_SIZE=blk,
                             _compile=True)
    flex = torch.compile(flex_attention)
    n_blocks = int(mask.kv_num_blocks.sum()) + int(mask.full_kv_num_blocks.sum())

    def fn(q, k, v):
        return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    block_mask=mask).transpose(1, 2)
    return fn, n_blocks * blk * blk


def make(impl, T, H, D, blk, dev):
    if impl.startswith("sdpa_"):
        return make_sdpa(T, impl[5:])
    if impl == "flex_dcw":
        return make_flex_dcw(T, blk, dev)
    return make_dcwdist(T, H, D, blk, impl[len("dcwdist_"):], dev)


def bench_case(impl, T, H, D, blk, dev, ref_out=None):
    torch.manual_seed(0)
    q, k, v = [torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3)]
    dout = torch.randn_like(q)
    t0 = time.time()
    fn, entries = make(impl, T, H, D, blk, dev)
    out = fn(q, k, v)  # compile / tune
    torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    setup_s = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    out = fn(q, k, v)
    torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    with torch.no_grad():
        fwd_ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
    fb_ms = do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout),
                     warmup=25, rep=100, return_mode="median")
    fwd_flops = 4.0 * entries * D * H
    causal_flops = 4.0 * (T * (T + 1) // 2) * D * H
    row = dict(impl=impl, length=T, heads=H, head_dim=D, block=blk, dtype="bf16",
               density=round(fwd_flops / causal_flops, 4), fwd_ms=round(fwd_ms, 3),
               fwd_bwd_ms=round(fb_ms, 3),
               fwd_tflops=round(fwd_flops / fwd_ms / 1e9, 1),
               fwd_bwd_tflops=round(3.5 * fwd_flops / fb_ms / 1e9, 1),
               peak_mem_gib=round(peak, 2), setup_s=round(setup_s, 1))
    if ref_out is not None:
        with torch.no_grad():
            o = fn(q, k, v).float()
            r = ref_out(q, k, v).float()
        row["rel_err_vs_ref"] = float((o - r).norm() / r.norm())
    del q, k, v, dout, out
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--impls", nargs="+", default=[
        "sdpa_cudnn", "sdpa_flash", "dcwdist_dense", "dcwdist_dense_atomic", "dcwdist_dcw",
        "dcwdist_dcw_atomic", "dcwdist_dcw_xtier", "dcwdist_dcw_xtier_atomic", "flex_dcw"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--check-upto", type=int, default=8192,
                    help="compare outputs with a reference impl at lengths up to this")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    dev = "cuda"
    H, D, blk = args.heads, args.head_dim, args.block
    refs = {"dcwdist_dense": "sdpa_cudnn", "sdpa_flash": "sdpa_cudnn", "dcwdist_dcw": "flex_dcw",
            "dcwdist_dense_atomic": "sdpa_cudnn", "dcwdist_dcw_atomic": "flex_dcw"}
    for T in args.lengths:
        for impl in args.impls:
            ref = None
            if T <= args.check_upto and impl in refs:
                ref = make(refs[impl], T, H, D, blk, dev)[0]
            try:
                row = bench_case(impl, T, H, D, blk, dev, ref)
            except Exception as err:  # report and go on (e.g. OOM of a baseline)
                row = dict(impl=impl, length=T, error=f"{type(err).__name__}: {err}"[:300])
                torch.cuda.empty_cache()
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    print(json.dumps({"tuned_configs": {str(k): v for k, v in
                                        _block_sparse_plan.tuned_configs().items()}}), flush=True)


if __name__ == "__main__":
    main()
