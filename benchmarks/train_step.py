"""End-to-end training step on one GPU: dcwdist (DCW / dense, Triton kernel) vs transformers SDPA
and the strong transformers + Liger (+ activation offload) baseline of /work/shared/ANCHORS.md.

    PYTHONPATH=. python benchmarks/train_step.py --plan full --out train_step.jsonl
    PYTHONPATH=. python benchmarks/train_step.py --plan liger --timed-max-s 10 --out liger.jsonl
    PYTHONPATH=. python benchmarks/train_step.py --smoke   # CPU smoke test: tiny shapes, every impl

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
  dcwdist_sdpa   dcwdist Transformer, attention kind=dense impl=torch: torch SDPA (flash / cuDNN on
                 a GPU); with keep_attention_outputs (the default) a selective-checkpoint policy
                 keeps SDPA's outputs, so the recompute in backward runs no attention.
  dcwdist_dcw    the same with kind=dcw impl=triton, block 64: the segmenter (scorer, causal tiers)
                 runs inside every forward; tiers come from the random-init scorer under the
                 running caps (about 20% core / 30% buffer / 50% background blocks).
  hf_liger       hf_sdpa + Liger kernels on the model instance (liger_kernel.transformers.
                 apply_liger_kernel_to_qwen2 / _llama: fused linear cross-entropy (no logits),
                 RMSNorm, RoPE, SwiGLU). Liger's module-level patches (the RoPE function, the norm /
                 MLP classes) are swapped in only around this impl's steps, so other impls in the
                 same process stay plain transformers.
  hf_liger_offload  hf_liger + torch.autograd.graph.save_on_cpu(pin_memory=True) around forward
                 and backward: the tensors autograd saves outside the checkpointed layers (each
                 layer's checkpointed input, the fused CE's saved gradients) live in pinned host
                 memory (the ANCHORS.md "offload", ALST-style). Host memory is not in peak_gib;
                 host_pinned_peak_gib gives it. (hf_sdpa_offload: the same without Liger.)
  dcwdist_<kind>_zero<N>  the dcwdist model stepped through dcwdist's DeepSpeedBackend
                 (dcwdist/train/engine.py) with ZeRO stage N in one process (a 1-rank process
                 group: nccl on GPU, gloo on CPU), bf16 (DeepSpeed casts the module to bf16 and
                 keeps fp32 master weights + AdamW state in its optimizer, torch_adam=true; no
                 autocast), gradient clipping 1.0. ZeRO on one rank shards nothing: this is the
                 trainer's DeepSpeed path (bf16 weights) against TorchBackend's autocast over fp32.
Long-sequence memory options (dcwdist impls only; every dcwdist case of the run gets them and
its row records them): --tiled-mlp N sets ModelConfig.tiled_mlp (the SwiGLU over N-token tiles,
each recomputed in backward), --offload-activations sets ModelConfig.offload_activations (each
checkpointed layer input, the final norm input and the loss's hidden gradient in pinned host
memory until backward; the row adds offloaded_gib, the bytes moved per step, and the CUDA host
allocator's pinned peak); --recompute-attention sets ModelConfig.keep_attention_outputs=false
(by default the attention kernels' outputs are kept from forward, so the checkpoint recompute
skips the attention forward). --plan long walks the lengths up to 2M (100M) / 1M (1B) for the
longest trainable sequence; run it with both flags, --timed 1 --warmup 1 --no-attn-share.
Synthetic row: one document (doc_ids 0, positions arange), first 128 tokens instruction role,
random tokens, sparse random relevance labels (so the scorer's L_seg runs as in joint training).

Time budget (--budget-s): a case is skipped when its predicted end is past the budget. The step
time is extrapolated as t x (T / T_prev)^1.7 from the series' last length in this process (or a
sibling series: hf_liger <-> hf_liger_offload, dcwdist_dcw <-> dcwdist_dcw_zero1; else a rough
H100 prior per model). A case whose peak memory, extrapolated linearly from the series' last
length, exceeds 1.25 x the GPU's memory is skipped as "predicted out of memory".
--timed-max-s stops the timed steps once they add up to that many seconds (at least one).
--case-timeout-s S stops a case after S seconds: its row gets status "timeout" and the phase it
reached, and every phase is printed to stderr as it ends, so a run killed from outside still
shows where its time went. --memory-sites adds one traced step per case (CUDA): the row's
memory_peak lists the source lines whose tensors are alive at the step's peak.
On CPU, Triton runs interpreted (TRITON_INTERPRET=1 is set when no GPU is seen): dcwdist's kernel
runs (slowly; bf16 dots are not exact there). Liger's kernels do not run under the interpreter,
so on CPU hf_liger* apply the patches, check them and report status "skipped" (also when
liger-kernel is not installed).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import signal
import socket
import statistics
import sys
import time
import traceback
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before dcwdist.kernels imports triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkout import map_packages  # noqa: E402

map_packages()

from dcwdist.attention import AttentionConfig  # noqa: E402
from dcwdist.attention.context import ROLE_DOCUMENT, ROLE_INSTRUCTION, AttnContext  # noqa: E402
from dcwdist.config import JobConfig  # noqa: E402
from dcwdist.data_pipelines.packing import Batch  # noqa: E402
from dcwdist.eval.positions import context_for  # noqa: E402
from dcwdist.model.config import ModelConfig  # noqa: E402
from dcwdist.segmentation.config import SegmentationConfig  # noqa: E402
from dcwdist.train.engine import DeepSpeedBackend, TorchBackend, ZeroConfig  # noqa: E402
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
    "tiny": ([("tiny", i, L) for L in (256, 512)
              for i in ("hf_sdpa", "dcwdist_dense", "dcwdist_sdpa_zero1", "dcwdist_dcw")]
             + [("profile_tiny", "dcwdist_dcw", 512)]),
    # The ANCHORS.md strong baseline (Liger; "offload" where the anchor has it) against DCW through
    # TorchBackend and through DeepSpeed ZeRO-1, in priority order for one ~9-minute device call:
    # every 128k case first (each series then has a length to extrapolate time and memory from),
    # then the long cases; the TorchBackend DCW 512k row repeats the 2026-11-25 run, so it is last.
    "liger": ([("qwen2_100m", i, 128 * K)
               for i in ("hf_liger", "dcwdist_dcw", "dcwdist_dcw_zero1", "hf_sdpa")]
              + [("llama3.2_1b", i, 128 * K)
                 for i in ("hf_liger", "dcwdist_dcw_zero1", "dcwdist_dcw")]
              + [("qwen2_100m", i, 512 * K)
                 for i in ("hf_liger_offload", "dcwdist_dcw_zero1", "hf_sdpa")]
              + [("llama3.2_1b", i, 256 * K)
                 for i in ("hf_liger_offload", "dcwdist_dcw_zero1", "dcwdist_dcw")]
              + [("qwen2_100m", "dcwdist_dcw", 512 * K)]),
    # what the first call's budget is expected to leave over, for a second call
    "liger_tail": ([("llama3.2_1b", i, 256 * K)
                    for i in ("hf_liger_offload", "dcwdist_dcw_zero1", "dcwdist_dcw")]
                   + [("qwen2_100m", "dcwdist_dcw", 512 * K)]),
    # Longest trainable length on one GPU (run with --tiled-mlp / --offload-activations): each
    # series stops at its first OOM. 128k and 512k first: rows without the flags exist there
    # (train_step_h100.md) and later lengths extrapolate time and memory from them. The DeepSpeed
    # bf16 path (bf16 weights: half the bytes per hidden state) for the longest 100M rows and 1B.
    "long": ([("qwen2_100m", "dcwdist_dcw", L) for L in (128 * K, 512 * K, 1024 * K, 2048 * K)]
             + [("qwen2_100m", "dcwdist_dcw_zero1", L) for L in (1024 * K, 2048 * K)]
             + [("llama3.2_1b", "dcwdist_dcw_zero1", L)
                for L in (128 * K, 256 * K, 512 * K, 1024 * K)]),
    # after the summary-layout and fused-launch changes: DCW through ZeRO-1 at the points the
    # strong baseline was measured (train_step_liger_h100.jsonl), 128k first
    "dcw_v2": ([("qwen2_100m", "dcwdist_dcw_zero1", 128 * K),
                ("llama3.2_1b", "dcwdist_dcw_zero1", 128 * K),
                ("profile", "dcwdist_dcw_zero1", 128 * K),
                ("qwen2_100m", "dcwdist_dcw_zero1", 512 * K)]),
    # after keeping attention outputs across the recompute and the side-stream offload: the
    # strong baseline's points again (run once plain and once with --offload-activations)
    "v3": ([("qwen2_100m", "dcwdist_dcw_zero1", 128 * K),
            ("llama3.2_1b", "dcwdist_dcw_zero1", 128 * K),
            ("qwen2_100m", "dcwdist_dcw_zero1", 512 * K),
            ("llama3.2_1b", "dcwdist_dcw_zero1", 256 * K)]),
    # the longest lengths with kept attention outputs and the side-stream offload (run with
    # --tiled-mlp and --offload-activations); 512k / 256k first for the memory comparison
    "long_v3": [("qwen2_100m", "dcwdist_dcw_zero1", L) for L in (512 * K, 1024 * K, 2048 * K)],
    "long_v3_1b": [("llama3.2_1b", "dcwdist_dcw_zero1", L) for L in (256 * K, 512 * K, 1024 * K)],
    # dcwdist dense against the strong baseline at 128k: the Triton dense layout and torch's
    # SDPA, both through the trainer's DeepSpeed bf16 path
    "dense_v5": [(m, i, 128 * K) for m in ("qwen2_100m", "llama3.2_1b")
                 for i in ("dcwdist_sdpa_zero1", "dcwdist_dense_zero1")],
    # dcwdist dense (SDPA, kept outputs, ZeRO-1) against the strong baseline at the other
    # lengths dense runs: 8k and 32k for both models, then 256k (the 1B baseline with its CPU
    # offload, as in the anchor); the 1B 256k pair is last, it is the longest
    "dense_sweep": ([(m, i, L) for L in (8 * K, 32 * K) for m in ("qwen2_100m", "llama3.2_1b")
                     for i in ("hf_liger", "dcwdist_sdpa_zero1")]
                    + [("qwen2_100m", i, 256 * K) for i in ("hf_liger", "dcwdist_sdpa_zero1")]
                    + [("llama3.2_1b", i, 256 * K)
                       for i in ("dcwdist_sdpa_zero1", "hf_liger_offload")]),
    # where the 100M model's 1M step spends its time (with the long-sequence flags)
    "profile_1m": [("profile", "dcwdist_dcw_zero1", 1024 * K)],
    # --smoke (CPU): every impl once at tiny shapes
    "smoke": [("tiny", i, 256) for i in ("hf_sdpa", "hf_sdpa_offload", "hf_liger",
                                         "hf_liger_offload", "dcwdist_dcw", "dcwdist_dcw_zero1",
                                         "dcwdist_sdpa_zero1")],
}
# rough H100 seconds per step at 128k (2026-11-25 run and the anchors), for a series' first case
PRIOR_S_128K = {"qwen2_100m": 4.0, "llama3.2_1b": 15.0, "tiny": 0.01}


def versions(dev) -> dict:
    out = {"torch": torch.__version__}
    for name in ("triton", "transformers", "deepspeed", "liger_kernel"):
        try:  # metadata only: importing deepspeed here would be slow and noisy
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            out[name] = None
    out["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    return out


def family(impl: str) -> str:
    """The series an impl's time / memory may be extrapolated from when it has none of its own."""
    return impl.removesuffix("_offload").split("_zero")[0]


def attention_label(impl: str) -> str:
    if impl.startswith("hf_"):
        return "dense (SDPA)"
    if impl.startswith("dcwdist_sdpa"):
        return "dense (torch SDPA)"
    return f"{impl.removeprefix('dcwdist_').split('_')[0]} (triton)"


class SkipCase(Exception):
    """A case that cannot run here (reported as status "skipped" with the message)."""


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
def ensure_process_group(dev) -> None:
    """A 1-rank process group for DeepSpeed (as dcwdist's trainer makes for a lone process)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo",
                               auto_mpi_discovery=False)


def build_dcwdist(shape: dict, kind: str, dev, zero_stage: int | None = None,
                  tiled_mlp: int = 0, offload: bool = False, keep_attention: bool = True,
                  core_ratio: float = 0.0):
    mcfg = ModelConfig(**shape, activation_checkpointing=True, tiled_mlp=tiled_mlp,
                       offload_activations=offload, keep_attention_outputs=keep_attention)
    # "sdpa": the dense kind through impl=torch, i.e. torch's SDPA (flash / cuDNN on a GPU)
    acfg = AttentionConfig(kind="dense" if kind == "sdpa" else kind,
                           impl="torch" if kind == "sdpa" else "triton", block_size=64)
    seg = SegmentationConfig(core_ratio=core_ratio) if core_ratio else SegmentationConfig()
    job = JobConfig(model=mcfg, attention=acfg, segmentation=seg)
    with torch.device(dev):
        model = build_model(job, acfg)
    model.to(dev).train()
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    if zero_stage is None:
        backend = TorchBackend(model, optim)
        autocast = True  # bf16 autocast over fp32 weights
    else:
        ensure_process_group(dev)
        zero = ZeroConfig(enabled=True, stage=zero_stage, torch_adam=True)
        backend = DeepSpeedBackend(model, zero, optim, micro_batch=1, grad_accum=1, bf16=True,
                                   world_size=1)
        model = backend.module
        autocast = False  # DeepSpeed's bf16 mode casts the module itself (as the trainer does)
    state = {}

    def step(batch: Batch):
        ctx = context_for(batch)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss_sum = backend(batch.tokens, ctx, batch.labels)
        loss = loss_sum.float() / batch.labels.numel()
        for value in ctx.cache.get("aux_losses", {}).values():
            loss = loss + value
        backend.backward(loss)
        backend.step()  # grad-norm clip + AdamW + zero_grad (DeepSpeed: engine.step)
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
        out = {k: round(float(v), 4) for k, v in metrics.items()
               if k in ("tier_core", "tier_buffer", "tier_background", "flops_realised")}
        out["backend"] = "torch" if zero_stage is None else f"deepspeed zero{zero_stage} bf16"
        out.update(tiled_mlp=tiled_mlp, offload_activations=offload,
                   keep_attention_outputs=keep_attention)
        if offload and "ctx" in state:
            out["offloaded_gib"] = round(state["ctx"].cache.get("offloaded_bytes", 0) / 2**30, 2)
        return out

    def close():
        state.clear()
        if zero_stage is not None:
            backend.engine.destroy()  # drops the optimizer's flat fp32 buffers and hooks
    return model, step, attn_call, extra, close


_MISSING = object()


class ModulePatch:
    """Module-level names that `apply` rebinds, kept out of the module except inside `active()`.

    Liger patches a model instance (norm / MLP forwards, the fused-CE forward) but also rebinds
    globals of transformers' modeling module (apply_rotary_pos_emb, the RMSNorm / MLP classes),
    which would leak into every later model of this process (hf_sdpa). The RoPE function is
    looked up at call time, so it is swapped in around each step (recompute in backward too)."""

    def __init__(self, module, apply):
        before = dict(vars(module))
        apply()
        after = dict(vars(module))
        self.module = module
        self.patched = {k: v for k, v in after.items() if before.get(k, _MISSING) is not v}
        self.original = {k: before.get(k, _MISSING) for k in self.patched}
        self._set(self.original)

    def _set(self, values: dict) -> None:
        for key, value in values.items():
            if value is _MISSING:
                delattr(self.module, key)
            else:
                setattr(self.module, key, value)

    @contextlib.contextmanager
    def active(self):
        self._set(self.patched)
        try:
            yield
        finally:
            self._set(self.original)


def apply_liger(model, name: str) -> tuple[ModulePatch, dict]:
    """ANCHORS.md's Liger set on this model instance; (module patch, a summary of what changed)."""
    try:
        import liger_kernel.transformers as lk
    except ModuleNotFoundError as e:
        raise SkipCase(f"liger-kernel is not installed ({e}); the strong baseline needs "
                       "`pip install liger-kernel`") from e
    if name.startswith("llama"):
        from transformers.models.llama import modeling_llama as modeling
        fn = lk.apply_liger_kernel_to_llama
    else:
        from transformers.models.qwen2 import modeling_qwen2 as modeling
        fn = lk.apply_liger_kernel_to_qwen2
    patch = ModulePatch(modeling, lambda: fn(rope=True, cross_entropy=False,
                                             fused_linear_cross_entropy=True, rms_norm=True,
                                             swiglu=True, model=model))
    bound = sum(1 for m in model.modules()  # norms + MLPs rebound
                if m is not model and "forward" in vars(m))
    info = {"liger_bound_modules": bound, "liger_lce_forward": "forward" in vars(model),
            "liger_module_patches": sorted(patch.patched)}
    n_layers = model.config.num_hidden_layers
    if bound != 3 * n_layers + 1 or not info["liger_lce_forward"] or \
            "apply_rotary_pos_emb" not in patch.patched:
        raise RuntimeError(f"Liger did not patch as expected: {info}")
    with patch.active():  # the swap is visible inside, and undone after
        assert modeling.apply_rotary_pos_emb is lk.liger_rotary_pos_emb
    assert modeling.apply_rotary_pos_emb is not lk.liger_rotary_pos_emb
    return patch, info


def build_hf(shape: dict, name: str, dev, T: int, liger: bool = False, offload: bool = False):
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
    info = {"offload": offload}
    patch_ctx = contextlib.nullcontext
    if liger:
        patch, liger_info = apply_liger(model, name)
        info.update(liger_info)
        patch_ctx = patch.active
        if dev.type != "cuda":
            raise SkipCase(f"Liger's Triton kernels need a GPU; wiring checked: {liger_info}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            fused=dev.type == "cuda")

    def step(batch: Batch):
        offload_ctx = (torch.autograd.graph.save_on_cpu(pin_memory=dev.type == "cuda")
                       if offload else contextlib.nullcontext())
        with patch_ctx(), offload_ctx:  # forward and backward (checkpoint recompute included)
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
    return model, step, attn_call, (lambda T: dict(info)), (lambda: None)


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


def host_pinned_stats() -> dict:
    """Pinned memory of the CUDA host allocator (save_on_cpu's buffers), if torch reports it."""
    try:
        st = torch.cuda.host_memory_stats()
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for key, name in (("active_bytes.peak", "host_pinned_peak_gib"),
                      ("allocated_bytes.current", "host_pinned_held_gib")):
        if key in st:
            out[name] = round(st[key] / 2**30, 2)
    return out


def build(model_name: str, impl: str, T: int, dev, args=None):
    """(model, step, attn_call, extra, close) of an impl name (see the module doc)."""
    shape = MODELS[model_name]
    if impl.startswith("hf_"):
        base = impl.removesuffix("_offload")
        if base not in ("hf_sdpa", "hf_liger"):
            raise ValueError(f"unknown impl {impl}")
        return build_hf(shape, model_name, dev, T, liger=base == "hf_liger",
                        offload=impl.endswith("_offload"))
    if not impl.startswith("dcwdist_"):
        raise ValueError(f"unknown impl {impl}")
    kind, _, zero = impl.removeprefix("dcwdist_").partition("_zero")
    if kind not in ("dense", "sdpa", "dcw") or zero not in ("", "0", "1", "2", "3"):
        raise ValueError(f"unknown impl {impl}")
    return build_dcwdist(shape, kind, dev, int(zero) if zero else None,
                         tiled_mlp=getattr(args, "tiled_mlp", 0),
                         offload=getattr(args, "offload_activations", False),
                         keep_attention=not getattr(args, "recompute_attention", False),
                         core_ratio=getattr(args, "core_ratio", 0.0))


class CaseTimeout(Exception):
    """A case ran past --case-timeout-s."""


@contextlib.contextmanager
def case_deadline(seconds: float):
    """Raise CaseTimeout in the main thread after `seconds` (0: no deadline). Python runs the
    handler between bytecodes, so a step blocked in one long GPU sync ends first."""
    if not seconds or seconds <= 0:
        yield
        return

    def fire(signum, frame):
        raise CaseTimeout(f"case timeout after {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def phase(row: dict, name: str, t0: float) -> None:
    """Record the phase a case has reached (a timed-out or failed row keeps the last one) and
    print it to stderr, so a run stopped from outside still shows where its time went."""
    row["phase"], row["phase_s"] = name, round(time.perf_counter() - t0, 1)
    T = row["length"]
    size = f"{T // K}k" if T >= K else str(T)
    print(f"[train_step] {row['model']} {row['impl']} {size}: {name} "
          f"({row['phase_s']} s)", file=sys.stderr, flush=True)


def run_case(model_name: str, impl: str, T: int, args, dev, profile: bool = False,
             row: Optional[dict] = None) -> dict:
    """Build, warm up and time one case; `row` (updated in place) keeps the phase reached."""
    shape = MODELS[model_name]
    row = {} if row is None else row
    row.update(model=model_name, impl=impl, attention=attention_label(impl), length=T)
    torch.manual_seed(0)
    t_build = time.perf_counter()
    model, step, attn_call, extra, close = build(model_name, impl, T, dev, args)
    phase(row, "built", t_build)
    tiles = getattr(args, "tiles", None) or {}
    hooks = trace_layers(model, row, dev, t_build) if getattr(args, "trace_layers", False) else []
    forced = contextlib.nullcontext()
    if tiles and impl.startswith("dcwdist"):
        from dcwdist.kernels.block_sparse import force_tiles
        row["forced_tiles"] = {k: list(v) for k, v in tiles.items()}
        forced = force_tiles(**tiles)
    try:
        with forced:
            return _run_built(row, shape, model, step, attn_call, extra, T, args, dev, profile,
                              t_build)
    finally:
        for h in hooks:
            h.remove()
        close()


def trace_layers(model, row: dict, dev, t0: float) -> list:
    """Phase marks inside a step: each layer's forward and the arrival of its output's gradient
    in backward, with a device sync, so a case that runs out of time says how far its step
    got and how long each pass takes."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return []

    def on_forward(i):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return  # the checkpoint's recompute inside backward: marked by the gradients
            sync(dev)
            phase(row, f"layer {i} forward done", t0)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                def on_grad(grad):
                    sync(dev)
                    phase(row, f"layer {i} output gradient ready", t0)
                output.register_hook(on_grad)
        return hook
    return [layer.register_forward_hook(on_forward(i)) for i, layer in enumerate(layers)]


def parse_tiles(specs: list[str]) -> dict:
    """["fwd=64,64,4,3", ...] -> {"fwd": (64, 64, 4, 3), ...} (block_sparse.force_tiles)."""
    out = {}
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        parts = value.split(",")
        if not sep or len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise SystemExit(f"--tiles: expected KERNEL=BLOCK_M,BLOCK_N,WARPS,STAGES, got {spec!r}")
        out[name] = tuple(int(p) for p in parts)
    return out


def _run_built(row, shape, model, step, attn_call, extra, T, args, dev, profile, t_build) -> dict:
    impl = row["impl"]
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    batch = make_batch(T, shape["vocab_size"], dev)
    tune_at = getattr(args, "tune_at", 0)
    if tune_at and T > tune_at:  # compiles every tile on a short step; long rows tune again
        step(make_batch(tune_at, shape["vocab_size"], dev))
        row["tuned_at"] = tune_at
        sync(dev)
        phase(row, f"tune step at {tune_at // K}k done", t_build)
    row["warmup_steps"] = args.warmup  # 0: the timed step also pays first-step costs
    for i in range(args.warmup):
        step(batch)
        sync(dev)
        phase(row, f"warmup step {i + 1} done", t_build)
    sync(dev)
    row["build_warmup_s"] = round(time.perf_counter() - t_build, 1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        with contextlib.suppress(Exception):
            torch.cuda.reset_peak_host_memory_stats()
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with tprofile(activities=acts) as prof:
            step(batch)
            sync(dev)
        row["profile"] = profile_summary(prof, dev, args)  # in place: main keeps this dict
        return row
    times = []
    for _ in range(args.timed):
        sync(dev)
        t0 = time.perf_counter()
        loss = step(batch)
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
        phase(row, f"timed step {len(times)}: {times[-1]:.0f} ms", t_build)
        if sum(times) >= args.timed_max_s * 1e3:
            break
    step_ms = statistics.median(times)
    row.update(status="ok", step_ms=round(step_ms, 2), step_ms_all=[round(t, 2) for t in times],
               tokens_per_s=round(T / step_ms * 1e3, 1), loss=round(float(loss.detach()), 4))
    if dev.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if impl.endswith("_offload") or (impl.startswith("dcwdist_") and args.offload_activations):
            row.update(host_pinned_stats())
    if getattr(args, "memory_sites", False):  # one more step, its allocations traced
        if dev.type == "cuda":
            from memory_peak import record_peak_sites
            row["memory_peak"] = record_peak_sites(lambda: step(batch))
            phase(row, "memory-sites step done", t_build)
        else:
            row["memory_peak"] = "needs CUDA"
    row.update(extra(T))
    if impl.startswith("dcwdist"):  # which tile each kernel ran with, per tuning key
        from dcwdist.kernels import _block_sparse_plan
        row["kernel_configs"] = {str(k): list(v)
                                 for k, v in _block_sparse_plan.tuned_configs().items()}
    matmul, attn_dense = model_flops(shape, T)
    computed = matmul + attn_dense
    if impl.startswith("dcwdist_dcw"):
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
    del batch
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
            if dev.type == "cuda":  # host-side time too: a step longer than its GPU time
                f.write("\n" + evs.table(sort_by="cpu_time_total", row_limit=20))
    return {"total_self_ms": round(total / 1e3, 2), "top10": rows}


def cleanup(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        # pinned host blocks cached by one case's offload would otherwise add up over the
        # process (a later, longer case was killed for host memory)
        for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
            if hasattr(torch._C, name):
                getattr(torch._C, name)()
                break


def predict_s(series: tuple, T: int, last: dict, profile: bool, args) -> float:
    """Predicted wall seconds of a case (build + warmup + timed steps), from the series' (or a
    sibling's) last length, else the per-model prior."""
    model_name, impl = series
    prev = last.get(series) or next((v for (m, i), v in last.items()
                                     if m == model_name and family(i) == family(impl)), None)
    if prev:
        est = prev[1] * (T / prev[0]) ** 1.7
    else:
        est = max(0.5, PRIOR_S_128K.get(model_name, 1.0) * (T / (128 * K)) ** 1.7)
    timed = 1 if profile else max(1, min(args.timed, args.timed_max_s / est))
    timed = math.ceil(timed)
    return 15.0 + (args.warmup + timed + 2) * est


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default="full", choices=sorted(PLANS))
    ap.add_argument("--only", nargs="*", default=None, help="run only these impls")
    ap.add_argument("--lengths", nargs="*", type=int, default=None,
                    help="run only these lengths (tokens) of the plan")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timed", type=int, default=3)
    ap.add_argument("--timed-max-s", type=float, default=float("inf"),
                    help="stop timing a case once its timed steps add up to this (at least one)")
    ap.add_argument("--memory-sites", action="store_true",
                    help="after the timed steps, one more step with the CUDA allocation history "
                         "on: the row's memory_peak names the source lines whose tensors are "
                         "alive at the step's peak (benchmarks/memory_peak.py)")
    ap.add_argument("--case-timeout-s", type=float, default=0.0,
                    help="stop a case after this many seconds and write its row with status "
                         "timeout and the phase it reached (build, tune step, warmup, timed "
                         "steps); later lengths of its series are skipped")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="skip a case whose predicted time would end past this many seconds")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--no-attn-share", dest="attn_share", action="store_false")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--smoke", action="store_true",
                    help="--plan smoke --timed 1 --no-attn-share: every impl once, tiny shapes "
                         "(on CPU unless a GPU is seen)")
    ap.add_argument("--out", default="")
    ap.add_argument("--profile-out", default="")
    ap.add_argument("--tiled-mlp", type=int, default=0, metavar="N",
                    help="dcwdist impls: model.tiled_mlp=N (SwiGLU over N-token tiles)")
    ap.add_argument("--offload-activations", action="store_true",
                    help="dcwdist impls: model.offload_activations=true (checkpointed inputs "
                         "in pinned host memory)")
    ap.add_argument("--tune-at", type=int, default=0, metavar="T",
                    help="one step at T tokens before each longer case: every kernel tile "
                         "compiles there; tuning runs again at the long length only for "
                         "kernels whose rows fall in a new work bucket (mean entries per row, "
                         "log4; kernels/block_sparse.py _tune_key)")
    ap.add_argument("--tiles", nargs="*", default=None, metavar="KERNEL=M,N,W,S",
                    help="dcwdist impls: run the block-sparse kernels with these tiles and no "
                         "tuning (block_sparse.force_tiles), e.g. fwd=64,64,4,3 dq=64,64,4,3 "
                         "dkdv=64,64,4,2: the long lengths skip the cold step's tuning")
    ap.add_argument("--core-ratio", type=float, default=0.0, metavar="R",
                    help="dcw impls: segmentation.core_ratio=R (default 0.2): the core tier's "
                         "share of blocks, whose full-prefix attention grows with the square of "
                         "the length")
    ap.add_argument("--trace-layers", action="store_true",
                    help="print (and keep as the row's phase) each layer's forward and output "
                         "gradient as the step reaches them, with a device sync")
    ap.add_argument("--recompute-attention", action="store_true",
                    help="dcwdist impls: model.keep_attention_outputs=false (the checkpoint "
                         "recompute runs the attention forward again)")
    args = ap.parse_args()
    args.tiles = parse_tiles(args.tiles)
    if args.smoke:
        args.plan, args.timed, args.attn_share = "smoke", 1, False
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if args.device == "auto" else args.device)
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    capacity_gib = (torch.cuda.get_device_properties(0).total_memory / 2**30
                    if dev.type == "cuda" else float("inf"))
    meta = versions(dev)
    print(json.dumps({"meta": meta, "argv": sys.argv[1:]}), flush=True)
    t_start = time.perf_counter()
    last: dict[tuple, tuple[int, float]] = {}  # (model, impl) -> (length, step seconds)
    last_mem: dict[tuple, tuple[int, float]] = {}  # (model, impl) -> (length, peak GiB)
    stopped: set[tuple] = set()
    for model_name, impl, T in PLANS[args.plan]:
        profile = model_name.startswith("profile")
        if profile:
            model_name = "tiny" if model_name == "profile_tiny" else "qwen2_100m"
        if args.only and impl not in args.only:
            continue
        if args.lengths and T not in args.lengths:
            continue
        series = (model_name, impl)
        elapsed = time.perf_counter() - t_start
        predicted = predict_s(series, T, last, profile, args)
        mem = last_mem.get(series)
        mem_pred = mem[1] * T / mem[0] if mem else 0.0
        row = {"model": model_name, "impl": impl, "length": T}
        if series in stopped and not profile:
            row.update(status="skipped", reason="an earlier length of this series failed")
        elif mem_pred > 1.25 * capacity_gib:
            row.update(status="skipped", reason=f"predicted out of memory ({mem_pred:.0f} GiB "
                                                f"from {mem[1]:.1f} GiB at {mem[0] // K}k, linear)")
        elif elapsed + predicted > args.budget_s:
            row.update(status="skipped", reason=f"time budget (predicted {predicted:.0f} s, "
                                                f"{elapsed:.0f} s used)")
        else:
            try:
                with case_deadline(args.case_timeout_s):
                    run_case(model_name, impl, T, args, dev, profile, row)
                if profile:
                    row["status"] = "profile"
                else:
                    last[series] = (T, row["step_ms"] / 1e3)
                    if row.get("peak_gib"):
                        last_mem[series] = (T, row["peak_gib"])
            except SkipCase as e:
                row.update(status="skipped", reason=str(e)[:500])
            except CaseTimeout as e:
                row.update(status="timeout", error=str(e))
                stopped.add(series)
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
        if impl.startswith("hf_liger"):
            row["liger_kernel"] = meta["liger_kernel"]
        if "_zero" in impl:
            row["deepspeed"] = meta["deepspeed"]
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
            if r.get("status") in ("ok", "oom", "skipped", "error", "timeout"):
                print(r["model"], r["impl"], r["length"], r["status"], r.get("tokens_per_s"),
                      r.get("step_ms"), r.get("peak_gib"), r.get("mfu_computed"),
                      r.get("mfu_dense_equiv"), r.get("attn_share"))


if __name__ == "__main__":
    main()
