"""model.keep_attention_outputs: under activation checkpointing the attention kernels' outputs
are kept from the forward, so the recompute in backward does not run the attention forward
again -- and the loss and every gradient are bit-identical to recomputing (DCW, dense; with and
without activation offload); nothing stays kept after backward."""
import os

import pytest
import torch

from dcwdist.attention import AttentionConfig, AttnContext
from dcwdist.kernels import block_sparse
from dcwdist.model import ModelConfig, Transformer
from dcwdist.model.activations import KeptOutputs
from tests.cp_helpers import open_cross_tier
from tests.test_model_long_seq import batch as batch48

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
# interpreted on CPU tensors; a GPU machine without the interpreter runs them on the GPU
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def model(kind, **opts):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                      loss_chunk=16, activation_checkpointing=True, **opts)
    attn = AttentionConfig(kind=kind, impl="triton", block_size=16, window=16,
                           buffer_window=16, stride=4, summary_pool=4)
    seg = None
    if kind == "dcw":
        from dcwdist.segmentation import SegmentationConfig, build_segmenter
        seg = build_segmenter(SegmentationConfig(
            mode="causal", scorer_layers=1, scorer_dim=16, scorer_heads=2, scorer_window=16,
            tau_core=0.5, tau_buffer=0.45), cfg.dim, attn)
    return open_cross_tier(Transformer(cfg, attn, seg).train())


def batch(B=2, T=64):
    """The long-sequence tests' batch, its second document moved to the block boundary 32."""
    tokens, labels, _, _, roles = batch48(B, T)
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[1, 32:] = 1
    pos = torch.arange(T).repeat(B, 1)
    pos[1, 32:] -= 32
    return tokens, labels, doc, pos, roles


def run(m, monkeypatch, device=DEV):
    """(loss, grads, forward kernel launches in forward, in backward, ctx)."""
    calls = {"n": 0}
    real = block_sparse._forward

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(block_sparse, "_forward", counted)
    tokens, labels, doc, pos, roles = (t.to(device) for t in batch(B=2, T=64))
    ctx = AttnContext(doc_ids=doc, positions=pos, roles=roles)
    loss = m.to(device)(tokens, ctx, labels)
    for value in ctx.cache.get("aux_losses", {}).values():
        loss = loss + value
    in_forward = calls["n"]
    kept_after_forward = len(ctx.kept) if ctx.kept is not None else 0
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return loss.detach(), grads, in_forward, calls["n"] - in_forward, kept_after_forward, ctx


@pytest.mark.parametrize("kind", ["dcw", "dense"])
@pytest.mark.parametrize("offload", [False, True])
def test_kept_outputs_skip_the_recompute_kernels_and_change_no_bit(kind, offload, monkeypatch):
    loss0, grads0, fwd0, bwd0, _, _ = run(
        model(kind, keep_attention_outputs=False, offload_activations=offload), monkeypatch)
    loss1, grads1, fwd1, bwd1, kept, ctx = run(
        model(kind, keep_attention_outputs=True, offload_activations=offload), monkeypatch)
    assert fwd0 == fwd1 > 0 and bwd0 == fwd0, "recompute runs every kernel again when not kept"
    assert bwd1 == 0, "the recompute ran an attention forward although its outputs were kept"
    assert kept == fwd1, "one kept (out, lse) per kernel call"
    assert len(ctx.kept) == 0, "kept outputs outlive backward"
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for name, g in grads0.items():
        assert torch.equal(g, grads1[name]), name


def test_offload_takes_the_kept_outputs_to_the_host(monkeypatch):
    _, _, _, _, _, plain = run(model("dense", keep_attention_outputs=False,
                                     offload_activations=True), monkeypatch)
    _, _, fwd, _, _, kept = run(model("dense", keep_attention_outputs=True,
                                      offload_activations=True), monkeypatch)
    out_bytes = 2 * 64 * 2 * 16 * 4  # [B, T, H, E] fp32 per kernel call (lse is smaller: stays)
    assert kept.cache["offloaded_bytes"] - plain.cache["offloaded_bytes"] == fwd * out_bytes


def test_nothing_is_kept_without_gradients_or_checkpointing(monkeypatch):
    m = model("dense")
    tokens, labels, doc, pos, roles = (t.to(DEV) for t in batch(B=2, T=64))
    with torch.no_grad():
        ctx = AttnContext(doc_ids=doc, positions=pos, roles=roles)
        m.to(DEV)(tokens, ctx, labels)
    assert ctx.kept is None or len(ctx.kept) == 0
    kept = KeptOutputs()
    with torch.no_grad():
        assert kept.recall() == (None, None)
    assert len(kept) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copies need a GPU")
@pytest.mark.parametrize("kind", ["dcw", "dense"])
def test_gpu_offload_on_a_side_stream_changes_no_bit(kind, monkeypatch):
    """The copies to the host and back (prefetched a layer ahead) run on their own stream."""
    loss0, grads0, *_ = run(model(kind, keep_attention_outputs=True), monkeypatch, "cuda")
    loss1, grads1, *_ , ctx = run(model(kind, keep_attention_outputs=True,
                                        offload_activations=True), monkeypatch, "cuda")
    assert ctx.cache["offloaded_bytes"] > 0
    assert torch.equal(loss0, loss1)
    for name, g in grads0.items():
        assert torch.equal(g, grads1[name]), name
