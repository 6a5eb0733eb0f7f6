"""One attention layer, fwd and fwd+bwd, on one GPU: dcwdist block-sparse kernel vs SDPA and Flex.

    PYTHONPATH=. python benchmarks/attention.py --lengths 8192 32768 131072 --out results.jsonl

The 100M model's shape (Qwen2-style, 12 query heads over 4 kv heads, D=64, block 64), the DCW
layer broken down into its pieces:

    PYTHONPATH=. python3 benchmarks/attention.py --lengths 131072 --heads 12 --kv-heads 4 \
        --head-dim 64 --block 64 --impls sdpa_cudnn dcwdist_dense dcwdist_dcw_xtier --pieces

Prints (and appends to --out) one JSON line per (impl, length): fwd ms, fwd+bwd ms (medians of
triton.testing.do_bench), TFLOP/s on the work each implementation computes (4·M·N·D per
computed score tile forward, per query head; fwd+bwd counted as 3.5× forward, the
FlashAttention convention), density (computed forward work / dense causal work) and peak memory
of a fwd+bwd. Defaults: H=16, D=128, bf16, B=1, one document, causal. Impls:
  sdpa_cudnn, sdpa_flash     dense causal (torch SDPA backends)
  sdpa_math                  dense causal, SDPA math backend (O(T²) memory; the CPU reference)
  dcwdist_dense              dense causal through the block-sparse kernel (layout `local`)
  dcwdist_dcw                exact DCW pattern: core 20% of blocks full causal, buffer 30%
                             window --buffer-window + strided keys every --stride (gathered
                             compact set, MODE_FAR), background 50% window --window; three
                             kernel calls merged by LSE
  dcwdist_dcw_xtier          the same + the cross-tier residual over core summaries (--pool)
  dcwdist_dcw_layer          the model's DCWAttention module at cp=1 (what dcwdist_dcw_xtier
                             computes, as the model runs it: core / background / buffer /
                             strided in one launch over the merged layout, then the summaries)
  flex_dcw                   FlexAttention on the exact DCW pattern (mask_mod, compiled mask)
  dcwdist_*_atomic           the same with deterministic=False: dQ added with fp32 atomics
                             inside the dK/dV pass instead of a separate dQ pass
Blocks of 128 tokens (--block). Tiers are a seeded random draw with exact ratios, block 0 core.
The DCW plan (layouts) is built outside the timed region (see piece_plan_build).

Flags besides the shape (--lengths, --heads, --head-dim, --block):
  --kv-heads N     GQA: k/v get N heads, q gets --heads (default N = --heads). The dcwdist
                   kernel reads the shared kv heads directly; SDPA passes enable_gqa=True (when
                   the backend refuses it, probed on a small fwd+bwd, k/v are repeat_interleave'd
                   inside the timed call; the row's `gqa` says which); flex_dcw passes
                   enable_gqa=True. FLOPs are still counted per query head (H).
  --window, --buffer-window, --stride, --pool
                   the DCW pattern: background window, buffer window, strided-key stride,
                   cross-tier summary pool (defaults 32, 64, 8, 4: the earlier fixed values).
  --pieces         after the impl rows of each length, the DCW layer with cross-tier
                   (dcwdist_dcw_xtier, deterministic) timed piece by piece, one row each,
                   impl "piece_<name>":
      local            block_sparse_attention over plan.local (core causal + background window)
      buffer           block_sparse_attention over plan.buffer (buffer rows' window)
      strided_gather   k, v gathered at plan.strided_idx (glue)
      strided          strided_gather + block_sparse_attention over plan.strided
      pool             pool_summaries of k and v (glue)
      summary          pool + block_sparse_attention over plan.summary (the cross-tier term)
      merge            merge_partials of three (out bf16 [1,T,H,D], lse fp32 [1,H,T]) partials
                       (fresh leaves; glue)
      plan_build       build_dcw_plan + the kernel plans (kernel_plan) of its 4 layouts on a
                       fresh plan: fwd only (fwd_bwd_ms null), synchronize + perf_counter,
                       median of 3. Built once per step and shared by every layer.
    fwd+bwd is torch.autograd.grad of the piece's outputs (random grads; a kernel piece's lse
    gets one too, as under merge_partials, except summary, whose lse the layer drops) against
    its differentiable inputs. entries = layout.nnz·q_block·k_block score entries per head for
    kernel pieces (TFLOP/s on them, glue included), 0 for glue pieces (no TFLOP/s).
    share_of_layer = the piece's fwd_bwd_ms (plan_build: its fwd_ms) / the fwd_bwd_ms of the
    dcwdist_dcw_xtier row of the same run and length (present only when that row was measured).
    Pieces overlap (strided contains strided_gather, summary contains pool) and the layer's
    last add is not a piece, so shares do not sum to 1.
  --device cpu     a smoke run: Triton interpreted (TRITON_INTERPRET=1, set at import when
                   --device cpu is given or no GPU is seen), fp32 (the interpreter's bf16 dot
                   is wrong; rows say dtype "fp32"), medians of 3 perf_counter runs instead of
                   do_bench, peak memory 0; sdpa_cudnn, sdpa_flash and flex_dcw print a
                   "skipped" row; the dense reference is sdpa_math.

    PYTHONPATH=. TRITON_INTERPRET=1 python benchmarks/attention.py --device cpu --lengths 512 \
        --heads 4 --kv-heads 2 --head-dim 16 --block 16 --window 16 --buffer-window 32 \
        --stride 4 --impls dcwdist_dense dcwdist_dcw_xtier --pieces
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import NamedTuple


def _device_arg(argv) -> str:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="cuda")
    return p.parse_known_args(argv)[0].device


import torch  # noqa: E402

if _device_arg(sys.argv[1:]) == "cpu" or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before dcwdist.kernels imports triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkout import dcw_tiers, map_packages  # noqa: E402

map_packages()
from triton.testing import do_bench  # noqa: E402

from dcwdist.attention import AttentionConfig  # noqa: E402
from dcwdist.attention.context import AttnContext  # noqa: E402
from dcwdist.attention.dcw import DCWAttention, build_dcw_plan, pool_summaries  # noqa: E402
from dcwdist.attention.executor import merge_partials  # noqa: E402
from dcwdist.attention.layouts import local_layout  # noqa: E402
from dcwdist.kernels import _block_sparse_plan  # noqa: E402
from dcwdist.kernels.block_sparse import block_sparse_attention  # noqa: E402

WINDOW, BUFFER_WINDOW, STRIDE, POOL = 32, 64, 8, 4
CUDA_ONLY = ("sdpa_cudnn", "sdpa_flash", "flex_dcw")
CPU_REPS = 3


class Pattern(NamedTuple):
    """The DCW pattern's knobs."""
    window: int = WINDOW
    buffer_window: int = BUFFER_WINDOW
    stride: int = STRIDE
    pool: int = POOL


def tiles(layout) -> int:
    return layout.nnz * layout.q_block * layout.k_block


def sync(dev) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, dev, reps=CPU_REPS) -> float:
    """Median wall time of `reps` calls of fn (synchronized), in ms."""
    times = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench_ms(fn, dev) -> float:
    """Median ms of fn: triton.testing.do_bench on CUDA, perf_counter runs on CPU."""
    if dev == "cuda":
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    return median_ms(fn, dev)


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def time_fwd_bwd(fn, inputs, dev, grads=None, warm=True) -> tuple[float, float]:
    """(fwd ms, fwd+bwd ms) of fn(*inputs) -> tensor or tuple of tensors.

    fwd runs under no_grad; fwd+bwd is torch.autograd.grad(outputs, inputs, grads). grads
    default to random tensors like the outputs. warm: one fwd+bwd first (compile, tuning).
    """
    if grads is None:
        with torch.no_grad():
            grads = tuple(torch.randn_like(o) for o in as_tuple(fn(*inputs)))

    def fwd_bwd():
        torch.autograd.grad(as_tuple(fn(*inputs)), inputs, grads)
    if warm:
        fwd_bwd()
    with torch.no_grad():
        fwd_ms = bench_ms(lambda: fn(*inputs), dev)
    return fwd_ms, bench_ms(fwd_bwd, dev)


def dcw_setup(T, blk, dev, pat: Pattern):
    """(AttentionConfig, doc ids [1,T], tiers [1,T/blk]) of the synthetic DCW case."""
    cfg = AttentionConfig(kind="dcw", block_size=blk, window=pat.window,
                          buffer_window=pat.buffer_window, stride=pat.stride,
                          summary_pool=pat.pool)
    doc = torch.zeros(1, T, dtype=torch.long, device=dev)
    return cfg, doc, dcw_tiers(T // blk).to(dev)[None]


def make_dcwdist(T, blk, kind, dev, pat: Pattern):
    """(fn(q, k, v) -> out [B,T,H,D], computed score entries per head, info)."""
    deterministic = not kind.endswith("_atomic")
    kind = kind.removesuffix("_atomic")

    def bsa(q, k, v, layout):
        return block_sparse_attention(q, k, v, layout, deterministic=deterministic)
    cfg, doc, tiers = dcw_setup(T, blk, dev, pat)
    if kind == "dense":
        lay = local_layout(doc, blk)
        return (lambda q, k, v: bsa(q, k, v, lay)[0]), tiles(lay), {}
    plan = build_dcw_plan(cfg, doc, tiers)
    bi = torch.zeros(1, 1, dtype=torch.long, device=dev)
    work = tiles(plan.local) + tiles(plan.buffer) + tiles(plan.strided)
    if kind == "dcw_layer":  # the model's DCW layer as it runs at cp=1 (fused launch + summary)
        layer = DCWAttention(dataclasses.replace(cfg, impl="triton"), 0, 0, 0, 0).to(dev)
        layer.alpha.data.fill_(0.5)
        ctx = AttnContext(doc_ids=doc, positions=torch.arange(T, device=dev)[None], tiers=tiers)
        return (lambda q, k, v: layer(q, k, v, ctx)), work + tiles(plan.summary), {}

    def local(q, k, v):
        k_s, v_s = k[bi, plan.strided_idx], v[bi, plan.strided_idx]
        return merge_partials([bsa(q, k, v, plan.local), bsa(q, k, v, plan.buffer),
                               bsa(q, k_s, v_s, plan.strided)])[0]
    if kind == "dcw":
        return local, work, {}

    def with_xtier(q, k, v):
        k_sum = pool_summaries(k, doc, plan.core_idx, blk, pat.pool)
        v_sum = pool_summaries(v, doc, plan.core_idx, blk, pat.pool)
        return local(q, k, v) + 0.5 * bsa(q, k_sum, v_sum, plan.summary)[0]
    return with_xtier, work + tiles(plan.summary), {}


def make_sdpa(T, H, Hkv, D, backend, dev, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
          "math": SDPBackend.MATH}[backend]
    rep = H // Hkv

    def call(q, k, v, gqa):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kw = {}
        if gqa == "repeat_kv":
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        elif gqa == "enable_gqa":
            kw["enable_gqa"] = True
        with sdpa_kernel(be):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        return out.transpose(1, 2)

    gqa = "none" if rep == 1 else "enable_gqa"
    if rep > 1:  # does this backend take GQA? a small fwd+bwd tells
        t = min(T, 256)
        qkv = [torch.randn(1, t, h, D, device=dev, dtype=dtype, requires_grad=True)
               for h in (H, Hkv, Hkv)]
        try:
            torch.autograd.grad(call(*qkv, gqa), qkv, torch.randn(1, t, H, D, device=dev,
                                                                  dtype=dtype))
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            gqa = "repeat_kv"
    return (lambda q, k, v: call(q, k, v, gqa)), T * (T + 1) // 2, {"gqa": gqa}


def make_flex_dcw(T, H, Hkv, blk, dev, pat: Pattern):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    tier = dcw_tiers(T // blk).to(dev)

    def mask_mod(b, h, q_idx, kv_idx):
        t = tier[q_idx // blk]
        d = q_idx - kv_idx
        strided = (kv_idx % pat.stride == 0) & (d >= pat.buffer_window)
        buffer = (t == 1) & ((d < pat.buffer_window) | strided)
        return (d >= 0) & ((t == 0) | buffer | ((t == 2) & (d < pat.window)))

    mask = create_block_mask(mask_mod, None, None, T, T, device=dev, BLOCK_SIZE=blk,
                             _compile=True)
    flex = torch.compile(flex_attention)
    n_blocks = int(mask.kv_num_blocks.sum()) + int(mask.full_kv_num_blocks.sum())
    kw = {"enable_gqa": True} if H != Hkv else {}

    def fn(q, k, v):
        return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    block_mask=mask, **kw).transpose(1, 2)
    return fn, n_blocks * blk * blk, ({"gqa": "enable_gqa"} if kw else {})


def make(impl, T, H, Hkv, D, blk, dev, dtype, pat: Pattern):
    """(fn(q, k, v) -> out, computed score entries per head, extra row fields)."""
    if impl.startswith("sdpa_"):
        return make_sdpa(T, H, Hkv, D, impl[5:], dev, dtype)
    if impl == "flex_dcw":
        return make_flex_dcw(T, H, Hkv, blk, dev, pat)
    if impl.startswith("dcwdist_"):
        return make_dcwdist(T, blk, impl[len("dcwdist_"):], dev, pat)
    raise ValueError(f"unknown impl {impl!r}")


def dtype_name(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def base_row(impl, T, a) -> dict:
    """The fields every row of this run carries (a: parsed args, with a.dtype set)."""
    return dict(impl=impl, length=T, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                block=a.block, dtype=dtype_name(a.dtype), window=a.window,
                buffer_window=a.buffer_window, stride=a.stride, pool=a.pool, device=a.device)


def qkv_leaves(T, a):
    return [torch.randn(1, T, h, a.head_dim, device=a.device, dtype=a.dtype, requires_grad=True)
            for h in (a.heads, a.kv_heads, a.kv_heads)]


def bench_case(impl, T, a, ref_out=None):
    dev, H, D = a.device, a.heads, a.head_dim
    torch.manual_seed(0)
    q, k, v = qkv_leaves(T, a)
    dout = torch.randn_like(q)
    t0 = time.time()
    fn, entries, info = make(impl, T, H, a.kv_heads, D, a.block, dev, a.dtype, a.pattern)
    out = fn(q, k, v)  # compile / tune
    torch.autograd.grad(out, (q, k, v), dout)
    sync(dev)
    setup_s = time.time() - t0
    peak = 0.0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    fwd_ms, fb_ms = time_fwd_bwd(fn, (q, k, v), dev, (dout,), warm=False)
    fwd_flops = 4.0 * entries * D * H
    causal_flops = 4.0 * (T * (T + 1) // 2) * D * H
    row = base_row(impl, T, a)
    row.update(info)
    row.update(density=round(fwd_flops / causal_flops, 4), fwd_ms=round(fwd_ms, 3),
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
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def dcw_pieces(T, a):
    """[(name, fn, inputs, entries per head)] of the DCW layer with cross-tier (deterministic),
    and the plan_build closure."""
    dev, blk, pool = a.device, a.block, a.pool
    cfg, doc, tiers = dcw_setup(T, blk, dev, a.pattern)
    plan = build_dcw_plan(cfg, doc, tiers)
    bi = torch.zeros(1, 1, dtype=torch.long, device=dev)
    torch.manual_seed(0)
    q, k, v = qkv_leaves(T, a)

    def bsa(q, k, v, layout):
        return block_sparse_attention(q, k, v, layout, deterministic=True)

    def gather(k, v):
        return k[bi, plan.strided_idx], v[bi, plan.strided_idx]

    def pool_kv(k, v):
        return (pool_summaries(k, doc, plan.core_idx, blk, pool),
                pool_summaries(v, doc, plan.core_idx, blk, pool))

    def merge(o1, l1, o2, l2, o3, l3):
        return merge_partials([(o1, l1), (o2, l2), (o3, l3)])[0]
    partials = []
    for _ in range(3):
        partials += [torch.randn(1, T, a.heads, a.head_dim, device=dev, dtype=a.dtype,
                                 requires_grad=True),
                     torch.randn(1, a.heads, T, device=dev, dtype=torch.float32,
                                 requires_grad=True)]
    pieces = [
        ("local", lambda q, k, v: bsa(q, k, v, plan.local), (q, k, v), tiles(plan.local)),
        ("buffer", lambda q, k, v: bsa(q, k, v, plan.buffer), (q, k, v), tiles(plan.buffer)),
        ("strided_gather", gather, (k, v), 0),
        ("strided", lambda q, k, v: bsa(q, *gather(k, v), plan.strided), (q, k, v),
         tiles(plan.strided)),
        ("pool", pool_kv, (k, v), 0),
        ("summary", lambda q, k, v: bsa(q, *pool_kv(k, v), plan.summary)[0], (q, k, v),
         tiles(plan.summary)),
        ("merge", merge, tuple(partials), 0),
    ]

    def plan_build():
        fresh = build_dcw_plan(cfg, doc, tiers)
        for lay in (fresh.local, fresh.buffer, fresh.strided, fresh.summary):
            _block_sparse_plan.kernel_plan(lay, torch.device(dev))
    return pieces, plan_build


def bench_pieces(T, a, layer_fb_ms=None):
    """One row per piece of the DCW layer with cross-tier (see the module docstring)."""
    D, H = a.head_dim, a.heads
    pieces, plan_build = dcw_pieces(T, a)
    rows = []
    for name, fn, inputs, entries in pieces:
        row = base_row(f"piece_{name}", T, a)
        try:
            fwd_ms, fb_ms = time_fwd_bwd(fn, inputs, a.device)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            continue
        row.update(entries=entries, fwd_ms=round(fwd_ms, 3), fwd_bwd_ms=round(fb_ms, 3))
        if entries:
            fwd_flops = 4.0 * entries * D * H
            row.update(density=round(entries / (T * (T + 1) // 2), 4),
                       fwd_tflops=round(fwd_flops / fwd_ms / 1e9, 1),
                       fwd_bwd_tflops=round(3.5 * fwd_flops / fb_ms / 1e9, 1))
        if layer_fb_ms:
            row["share_of_layer"] = round(fb_ms / layer_fb_ms, 4)
        rows.append(row)
    row = base_row("piece_plan_build", T, a)
    try:
        plan_build()  # warm-up (lazy init, allocator)
        ms = median_ms(plan_build, a.device, reps=3)
        row.update(entries=0, fwd_ms=round(ms, 3), fwd_bwd_ms=None)
        if layer_fb_ms:
            row["share_of_layer"] = round(ms / layer_fb_ms, 4)
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:300]
    rows.append(row)
    del pieces
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--impls", nargs="+", default=[
        "sdpa_cudnn", "sdpa_flash", "dcwdist_dense", "dcwdist_dense_atomic", "dcwdist_dcw",
        "dcwdist_dcw_atomic", "dcwdist_dcw_xtier", "dcwdist_dcw_xtier_atomic", "flex_dcw"])
    ap.add_argument("--heads", type=int, default=16, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=None,
                    help="key/value heads (GQA; default: --heads)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--window", type=int, default=WINDOW, help="DCW background window")
    ap.add_argument("--buffer-window", type=int, default=BUFFER_WINDOW, help="DCW buffer window")
    ap.add_argument("--stride", type=int, default=STRIDE, help="DCW strided-key stride")
    ap.add_argument("--pool", type=int, default=POOL, help="DCW cross-tier summary pool")
    ap.add_argument("--pieces", action="store_true",
                    help="also time each piece of the DCW layer with cross-tier")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: smoke run under the Triton interpreter (fp32)")
    ap.add_argument("--check-upto", type=int, default=8192,
                    help="compare outputs with a reference impl at lengths up to this")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    a = ap.parse_args(argv)
    a.kv_heads = a.heads if a.kv_heads is None else a.kv_heads
    if a.heads % a.kv_heads:
        ap.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: use --device cpu for a smoke run")
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu needs TRITON_INTERPRET=1 before triton is imported "
                 "(set it in the environment, or pass --device cpu on the command line)")
    a.dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    a.pattern = Pattern(a.window, a.buffer_window, a.stride, a.pool)
    dev = a.device
    ref_dense = "sdpa_cudnn" if dev == "cuda" else "sdpa_math"
    refs = {"dcwdist_dense": ref_dense, "sdpa_flash": ref_dense, "dcwdist_dcw": "flex_dcw",
            "dcwdist_dense_atomic": ref_dense, "dcwdist_dcw_atomic": "flex_dcw"}

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    for T in a.lengths:
        layer_fb_ms = None
        for impl in a.impls:
            if dev == "cpu" and impl in CUDA_ONLY:
                emit(dict(base_row(impl, T, a), skipped="needs CUDA (cuDNN / flash SDPA, "
                                                        "compiled FlexAttention)"))
                continue
            ref = None
            if T <= a.check_upto and impl in refs and not (dev == "cpu"
                                                           and refs[impl] in CUDA_ONLY):
                ref = make(refs[impl], T, a.heads, a.kv_heads, a.head_dim, a.block, dev,
                           a.dtype, a.pattern)[0]
            try:
                row = bench_case(impl, T, a, ref)
            except Exception as err:  # report and go on (e.g. OOM of a baseline)
                row = dict(base_row(impl, T, a), error=f"{type(err).__name__}: {err}"[:300])
                if dev == "cuda":
                    torch.cuda.empty_cache()
            if impl == "dcwdist_dcw_xtier" and "fwd_bwd_ms" in row:
                layer_fb_ms = row["fwd_bwd_ms"]
            emit(row)
        if a.pieces:
            for row in bench_pieces(T, a, layer_fb_ms):
                emit(row)
    print(json.dumps({"tuned_configs": {str(k): v for k, v in
                                        _block_sparse_plan.tuned_configs().items()}}), flush=True)


if __name__ == "__main__":
    main()
