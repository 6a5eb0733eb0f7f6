"""End-to-end training step on one GPU: dcwdist (DCW / dense, Triton kernel) vs transformers SDPA.

    PYTHONPATH=. python benchmarks/train_step.py --plan full --out train_step.jsonl
    PYTHONPATH=. python benchmarks/train_step.py --plan tiny   # CPU smoke test (tiny shapes)

One step = forward + backward + AdamW step on one row (batch 1), bf16 autocast over fp32
weights, activation checkpointing on. Prints (and appends to --out) one JSON line per case:

  model, impl, attention, length, status (ok / oom / skipped / error)
  step_ms            median of --timed steps after --warmup steps (synchronize + perf_counter)
  tokens_per_s       length / step time
  tflops_computed    FLOPs the implementation computes / step time: 6 x matmul params x tokens
                     (lm head included, embedding lookup not) + attention 12 x head_dim x heads x
                     pairs per layer (fwd 4·E per pair, bwd 2x fwd). Pairs: dense causal for
                     dense / HF; for DCW the realised fraction the segmenter reports
                     (`flops_realised`, token-exact, cross-tier summaries included) x causal, plus
                     the scorer's linears and windowed attention. Checkpoint recompute not counted.
  tflops_dense_equiv the same model with dense causal attention and no scorer / step time
  mfu_computed, mfu_dense_equiv   the two over --peak-tflops (989: H100 SXM bf16 dense datasheet)
  peak_gib           torch.cuda.max_memory_allocated over the timed steps (reserved_gib beside it)
  attn_fwd_ms, attn_fwdbwd_ms     one layer's attention module alone (random q/k/v of the step's
                     shape, the step's context / DCW plan), CUDA events, median of 3
  attn_share         n_layers x (fwd + fwd_bwd) / step_ms: checkpointing runs each attention
                     forward twice (forward, recompute) and its backward once. An estimate from
                     isolated timing (no overlap with the rest of the step), not a profile.

Impls:
  hf_sdpa        transformers Qwen2ForCausalLM / LlamaForCausalLM from config (random init),
                 attn_implementation="sdpa", gradient_checkpointing_enable(use_reentrant=False),
                 model(input_ids, labels) loss (full logits), torch AdamW(fused=True), no clip.
  dcwdist_dense  dcwdist Transformer, attention kind=dense impl=triton (block-sparse kernel, dense
                 causal layout), block 64; dcwdist's TorchBackend (AdamW + grad-norm clip 1.0).
  dcwdist_dcw    the same with kind=dcw impl=triton, block 64: the segmenter (scorer, causal tiers)
                 runs inside every forward; tiers come from the random-init scorer under the
                 running caps (about 20% core / 30% buffer / 50% background blocks).
Synthetic row: one document (doc_ids 0, positions arange), first 128 tokens instruction role,
random tokens, sparse random relevance labels (so the scorer's L_seg runs as in joint training).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
for _sub in ("kernels", "data_pipelines"):  # package-dir mappings of pyproject, by hand if needed
    try:
        importlib.import_module(f"dcwdist.{_sub}")
    except ImportError:
        _spec = importlib.util.spec_from_file_location(
            f"dcwdist.{_sub}", os.path.join(REPO, _sub, "__init__.py"),
            submodule_search_locations=[os.path.join(REPO, _sub)])
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules[f"dcwdist.{_sub}"] = _mod
        _spec.loader.exec_module(_mod)

from dcwdist.attention import AttentionConfig  # noqa: E402
from dcwdist.attention.context import ROLE_DOCUMENT, ROLE_INSTRUCTION, AttnContext  # noqa: E402
from dcwdist.config import JobConfig  # noqa: E402
from dcwdist.data_pipelines.packing import Batch  # noqa: E402
from dcwdist.eval.positions import context_for  # noqa: E402
from dcwdist.model.config import ModelConfig  # noqa: E402
from dcwdist.segmentation.config import SegmentationConfig  # noqa: E402
from dcwdist.train.engine import TorchBackend  # noqa: E402
from dcwdist.train.optim import OptimConfig  # noqa: E402
from dcwdist.train.trainer import build_model  # noqa: E402

MODELS = {
    "qwen2_100m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4,
                       ffn_dim=2048, qkv_bias=True, tie_embeddings=True),
    "llama3.2_1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        ffn_dim=8192, qkv_bias=False, tie_embeddings=True),
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 qkv_bias=True, tie_embeddings=True),
}
K = 1024
# (model, impl, length): the order is the priority (a later case is skipped when time runs out).
PLANS = {
    "full": ([("qwen2_100m", i, L) for L in (8 * K, 32 * K, 128 * K)
              for i in ("hf_sdpa", "dcwdist_dense", "dcwdist_dcw")]
             + [("profile", "dcwdist_dcw", 32 * K)]
             + [("qwen2_100m", "dcwdist_dcw", L) for L in (256 * K, 512 * K)]
             + [("llama3.2_1b", i, L) for L in (8 * K, 32 * K) for i in ("dcwdist_dcw", "hf_sdpa")]),
    # second device call of 2026-11-25: the DCW series after the dtype fixes, HF re-measured
    "dcw": ([("qwen2_100m", "dcwdist_dcw", L) for L in (8 * K, 32 * K, 128 * K)]
            + [("qwen2_100m", "hf_sdpa", 128 * K), ("profile", "dcwdist_dcw", 32 * K)]
            + [("qwen2_100m", "dcwdist_dcw", L) for L in (256 * K, 512 * K)]
            + [("llama3.2_1b", "dcwdist_dcw", L) for L in (8 * K, 32 * K)]),
    "tiny": ([("tiny", i, L) for L in (256, 512) for i in ("hf_sdpa", "dcwdist_dense", "dcwdist_dcw")]
             + [("profile_tiny", "dcwdist_dcw", 512)]),
}


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make_batch(T: int, vocab: int, dev, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (1, T + 1), generator=g)
    roles = torch.full((1, T), ROLE_DOCUMENT, dtype=torch.long)
    roles[:, :128] = ROLE_INSTRUCTION
    relevance = (torch.rand(1, T, generator=g) < 0.05).float()
    return Batch(tokens=tokens[:, :T], labels=tokens[:, 1:].clone(),
                 positions=torch.arange(T)[None], doc_ids=torch.zeros(1, T, dtype=torch.long),
                 roles=roles, relevance=relevance).to(dev)


# -- FLOPs --------------------------------------------------------------------------------
def model_flops(shape: dict, T: int) -> tuple[float, float]:
    """(matmul FLOPs, dense causal attention FLOPs) of one fwd+bwd step over T tokens."""
    d, L, H, Hkv, F, V = (shape["dim"], shape["n_layers"], shape["n_heads"], shape["n_kv_heads"],
                          shape["ffn_dim"], shape["vocab_size"])
    E = d // H
    per_layer = d * H * E * 2 + d * Hkv * E * 2 + 3 * d * F
    matmul = 6.0 * (L * per_layer + V * d) * T
    attn = 12.0 * E * H * L * (T * (T + 1) / 2)
    return matmul, attn


def scorer_flops(model, T: int) -> float:
    seg = getattr(model, "segmenter", None)
    if seg is None:
        return 0.0
    lin = sum(m.weight.numel() for m in seg.modules() if isinstance(m, torch.nn.Linear))
    enc = seg.scorer.encoder
    D = enc.layers[0].attn.qkv.weight.shape[1]
    return 6.0 * lin * T + 12.0 * D * 2 * enc.window * T * len(enc.layers)


# -- models -------------------------------------------------------------------------------
def build_dcwdist(shape: dict, kind: str, dev):
    mcfg = ModelConfig(**shape, activation_checkpointing=True)
    acfg = AttentionConfig(kind=kind, impl="triton", block_size=64)
    job = JobConfig(model=mcfg, attention=acfg, segmentation=SegmentationConfig())
    with torch.device(dev):
        model = build_model(job, acfg)
    model.to(dev).train()
    backend = TorchBackend(model, OptimConfig(lr=1e-4, warmup_steps=0))
    state = {}

    def step(batch: Batch):
        ctx = context_for(batch)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss_sum = model(batch.tokens, ctx, batch.labels)
        loss = loss_sum.float() / batch.labels.numel()
        for value in ctx.cache.get("aux_losses", {}).values():
            loss = loss + value
        loss.backward()
        backend.step()  # grad-norm clip (one sync) + AdamW + zero_grad
        state["ctx"] = ctx
        return loss

    def attn_call(T: int):
        """fn() -> output of layer 0's attention on random q/k/v with the last step's context."""
        ctx = state["ctx"]
        ctx.block_scores = None if ctx.block_scores is None else ctx.block_scores.detach()
        mod = model.layers[0].self_attn.attn
        E = shape["dim"] // shape["n_heads"]
        q = torch.randn(1, T, shape["n_heads"], E, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, T, shape["n_kv_heads"], E, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for t in (q, k, v):
            t.requires_grad_(True)

        def fn():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return mod(q, k, v, ctx)
        return fn

    def extra(T: int) -> dict:
        metrics = state["ctx"].cache.get("metrics", {}) if "ctx" in state else {}
        return {k: round(float(v), 4) for k, v in metrics.items()
                if k in ("tier_core", "tier_buffer", "tier_background", "flops_realised")}
    return model, step, attn_call, extra


def build_hf(shape: dict, name: str, dev, T: int):
    import transformers
    common = dict(vocab_size=shape["vocab_size"], hidden_size=shape["dim"],
                  intermediate_size=shape["ffn_dim"], num_hidden_layers=shape["n_layers"],
                  num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"],
                  tie_word_embeddings=shape["tie_embeddings"], max_position_embeddings=max(T, 4096),
                  use_cache=False)
    if name.startswith("llama"):
        cfg = transformers.LlamaConfig(head_dim=shape["dim"] // shape["n_heads"], **common)
    else:
        cfg = transformers.Qwen2Config(**common)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.to(dev).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            fused=dev.type == "cuda")

    def step(batch: Batch):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(input_ids=batch.tokens, labels=batch.tokens, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    def attn_call(T: int):
        H, Hkv, E = shape["n_heads"], shape["n_kv_heads"], shape["dim"] // shape["n_heads"]
        q = torch.randn(1, H, T, E, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, Hkv, T, E, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, Hkv, T, E, device=dev, dtype=torch.bfloat16, requires_grad=True)

        def fn():
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=H != Hkv)
        return fn
    return model, step, attn_call, (lambda T: {})


# -- timing -------------------------------------------------------------------------------
def time_attention(fn, dev, reps: int = 3) -> tuple[float, float]:
    """(fwd ms, fwd+bwd ms) medians; CUDA events on GPU, perf_counter on CPU."""
    def timed(f):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t = time.perf_counter()
        f()
        return (time.perf_counter() - t) * 1e3

    def fb():
        out = fn()
        out.backward(torch.ones_like(out))
    with torch.no_grad():
        fn()
    fb()
    sync(dev)
    f_ms = statistics.median(timed(lambda: fn().sum()) for _ in range(reps))
    fb_ms = statistics.median(timed(fb) for _ in range(reps))
    return f_ms, fb_ms


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_case(model_name: str, impl: str, T: int, args, dev, profile: bool = False) -> dict:
    shape = MODELS[model_name]
    row = {"model": model_name, "impl": impl,
           "attention": {"hf_sdpa": "dense (SDPA)", "dcwdist_dense": "dense (triton)",
                         "dcwdist_dcw": "dcw (triton)"}[impl], "length": T}
    torch.manual_seed(0)
    t_build = time.perf_counter()
    if impl == "hf_sdpa":
        model, step, attn_call, extra = build_hf(shape, model_name, dev, T)
    else:
        model, step, attn_call, extra = build_dcwdist(shape, impl.removeprefix("dcwdist_"), dev)
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    batch = make_batch(T, shape["vocab_size"], dev)
    for _ in range(args.warmup):
        step(batch)
    sync(dev)
    row["build_warmup_s"] = round(time.perf_counter() - t_build, 1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with tprofile(activities=acts) as prof:
            step(batch)
            sync(dev)
        return row | {"profile": profile_summary(prof, dev, args)}
    times = []
    for _ in range(args.timed):
        sync(dev)
        t0 = time.perf_counter()
        loss = step(batch)
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    step_ms = statistics.median(times)
    row.update(status="ok", step_ms=round(step_ms, 2), step_ms_all=[round(t, 2) for t in times],
               tokens_per_s=round(T / step_ms * 1e3, 1), loss=round(float(loss.detach()), 4))
    if dev.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    row.update(extra(T))
    matmul, attn_dense = model_flops(shape, T)
    computed = matmul + attn_dense
    if impl == "dcwdist_dcw":
        computed = matmul + attn_dense * row.get("flops_realised", float("nan")) + scorer_flops(model, T)
    sec = step_ms / 1e3
    row.update(tflops_computed=round(computed / sec / 1e12, 1),
               tflops_dense_equiv=round((matmul + attn_dense) / sec / 1e12, 1),
               mfu_computed=round(computed / sec / 1e12 / args.peak_tflops, 4),
               mfu_dense_equiv=round((matmul + attn_dense) / sec / 1e12 / args.peak_tflops, 4),
               attn_flops_frac_dense=round(attn_dense / (matmul + attn_dense), 3))
    if args.attn_share:
        try:
            f_ms, fb_ms = time_attention(attn_call(T), dev)
            row.update(attn_fwd_ms=round(f_ms, 2), attn_fwdbwd_ms=round(fb_ms, 2),
                       attn_share=round(shape["n_layers"] * (f_ms + fb_ms) / step_ms, 3))
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                row["attn_share_error"] = "oom"
            else:
                row["attn_share_error"] = f"{type(e).__name__}: {e}"[:300]
    del model, step, attn_call, batch
    return row


def profile_summary(prof, dev, args) -> dict:
    evs = prof.key_averages()

    def dev_self(e):
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, name):
                return float(getattr(e, name))
        return 0.0

    def cpu_self(e):
        return float(getattr(e, "self_cpu_time_total", 0.0))
    key = dev_self if dev.type == "cuda" else cpu_self
    total = sum(key(e) for e in evs)
    top = sorted(evs, key=key, reverse=True)[:10]
    rows = [{"op": e.key[:120], "self_ms": round(key(e) / 1e3, 2), "calls": e.count,
             "share": round(key(e) / total, 3) if total else None} for e in top]
    table = evs.table(sort_by="self_cuda_time_total" if dev.type == "cuda" else
                      "self_cpu_time_total", row_limit=25)
    if args.profile_out:
        with open(args.profile_out, "w") as f:
            f.write(table)
    return {"total_self_ms": round(total / 1e3, 2), "top10": rows}


def cleanup(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default="full", choices=sorted(PLANS))
    ap.add_argument("--only", nargs="*", default=None, help="run only these impls")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timed", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="skip a case whose predicted time would end past this many seconds")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--no-attn-share", dest="attn_share", action="store_false")
    ap.add_argument("--out", default="")
    ap.add_argument("--profile-out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = versions()
    print(json.dumps({"meta": meta, "argv": sys.argv[1:]}), flush=True)
    t_start = time.perf_counter()
    last: dict[tuple, tuple[int, float]] = {}  # (model, impl) -> (length, step seconds)
    stopped: set[tuple] = set()
    for model_name, impl, T in PLANS[args.plan]:
        profile = model_name.startswith("profile")
        if profile:
            model_name = "tiny" if model_name == "profile_tiny" else "qwen2_100m"
        if args.only and impl not in args.only:
            continue
        series = (model_name, impl)
        elapsed = time.perf_counter() - t_start
        prev = last.get(series)
        steps = args.warmup + (1 if profile else args.timed)
        predicted = 15.0 + (steps + 2) * (prev[1] * (T / prev[0]) ** 1.7 if prev else 1.0)
        row = {"model": model_name, "impl": impl, "length": T}
        if series in stopped and not profile:
            row.update(status="skipped", reason="an earlier length of this series failed")
        elif elapsed + predicted > args.budget_s:
            row.update(status="skipped", reason=f"time budget (predicted {predicted:.0f} s, "
                                                f"{elapsed:.0f} s used)")
        else:
            try:
                row = run_case(model_name, impl, T, args, dev, profile)
                if profile:
                    row["status"] = "profile"
                else:
                    last[series] = (T, row["step_ms"] / 1e3)
            except Exception as e:  # noqa: BLE001
                if is_oom(e):
                    row.update(status="oom", error=str(e).splitlines()[0][:300])
                else:
                    row.update(status="error", error=f"{type(e).__name__}: {e}"[:500],
                               trace=traceback.format_exc()[-1500:])
                stopped.add(series)
            cleanup(dev)
        row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        row.update({k: meta[k] for k in ("device", "torch", "triton", "transformers")})
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    # short table last
    print("\nmodel impl length status tok/s step_ms peak_GiB mfu_comp mfu_dense attn_share")
    if args.out:
        for line in open(args.out):
            r = json.loads(line)
            if r.get("status") in ("ok", "oom", "skipped", "error"):
                print(r["model"], r["impl"], r["length"], r["status"], r.get("tokens_per_s"),
                      r.get("step_ms"), r.get("peak_gib"), r.get("mfu_computed"),
                      r.get("mfu_dense_equiv"), r.get("attn_share"))


if __name__ == "__main__":
    main()
