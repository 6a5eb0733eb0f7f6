"""DCW's core / background / buffer / strided parts run as one launch over one merged layout
(attention.dcw.fused_layout): it equals the three partial softmaxes merged by LSE, and the
summary layout's 64-summary key blocks equal the same summaries read one core block at a time."""
import os

import pytest
import torch
import torch.nn.functional as F

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.dcw import build_dcw_plan, fused_layout
from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.layouts import summary_layout
from tests.kernel_helpers import KERNEL_DEV, fp32_kernel_tol

triton_ok = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def packed(B=2, T=256, blk=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 96:] = 1
    doc[1, 48:160] = 1
    doc[1, 160:] = 2
    tiers = torch.randint(0, 3, (B, T // blk), generator=g)
    return doc, tiers


def qkv(B, T, H, Hkv, D, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, D, generator=g, dtype=dtype).requires_grad_()
            for h in (H, Hkv, Hkv)]


def run_both(cfg, doc, tiers, impl, dtype, dev="cpu"):
    plan = build_dcw_plan(cfg, doc.to(dev), tiers.to(dev))
    q, k, v = [x.detach().to(dev).requires_grad_()
               for x in qkv(doc.shape[0], doc.shape[1], 4, 2, 16, dtype)]
    bi = torch.arange(doc.shape[0], device=dev)[:, None]
    ks, vs = k[bi, plan.strided_idx], v[bi, plan.strided_idx]
    parts = merge_partials([attend_layout(q, k, v, plan.local, impl=impl),
                            attend_layout(q, k, v, plan.buffer, impl=impl),
                            attend_layout(q, ks, vs, plan.strided, impl=impl)])
    fused = attend_layout(q, torch.cat([k, ks], 1), torch.cat([v, vs], 1), fused_layout(plan),
                          impl=impl)
    dout = torch.randn_like(q)
    grads = [torch.autograd.grad(o, (q, k, v), dout, retain_graph=True)
             for o, _ in (parts, fused)]
    return parts, fused, grads


def test_fused_launch_equals_the_partials_merged_by_lse_fp64():
    cfg = AttentionConfig(kind="dcw", block_size=16, window=8, buffer_window=24, stride=4)
    doc, tiers = packed()
    (o1, l1), (o2, l2), (g1, g2) = run_both(cfg, doc, tiers, "torch", torch.float64)
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-10)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not triton_ok, reason="needs CUDA or TRITON_INTERPRET=1")
def test_fused_kernel_launch_equals_the_merged_partials():
    cfg = AttentionConfig(kind="dcw", block_size=16, window=8, buffer_window=24, stride=4)
    doc, tiers = packed(seed=3)
    (o1, _), (o2, _), (g1, g2) = run_both(cfg, doc, tiers, "triton", torch.float32, KERNEL_DEV)
    atol, rtol = fp32_kernel_tol(2e-5, 1e-4)
    torch.testing.assert_close(o2, o1, rtol=rtol, atol=atol)
    atol, rtol = fp32_kernel_tol(1e-4, 1e-3, grad=True)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_fused_layout_has_every_entry_of_the_three_parts_once():
    cfg = AttentionConfig(kind="dcw", block_size=16, window=8, buffer_window=24, stride=4)
    doc, tiers = packed()
    plan = build_dcw_plan(cfg, doc, tiers)
    fused = fused_layout(plan)
    assert fused.nnz == plan.local.nnz + plan.buffer.nnz + plan.strided.nnz
    assert fused.num_k_blocks == plan.local.num_k_blocks + plan.strided.num_k_blocks
    mask = fused.token_mask()
    NK = plan.local.num_k_blocks * 16
    both = plan.local.token_mask() | plan.buffer.token_mask()
    assert torch.equal(mask[..., :NK], both)
    assert torch.equal(mask[..., NK:], plan.strided.token_mask())
    assert fused_layout(plan) is fused  # built once per plan


def test_summary_key_blocks_group_core_blocks_without_changing_what_is_read():
    blk, pool = 16, 4  # 4 summaries per core block, 16 core blocks per key block
    doc, tiers = packed(T=512)
    core = tiers == 0
    lay, core_idx, valid = summary_layout(doc, blk, core, ~core, pool)
    per = blk // pool
    assert lay.k_block == 64 and core_idx.shape[1] % (64 // per) == 0
    mask = lay.token_mask()[:, 0]  # [B, T, NC * per]
    NQ = doc.shape[1] // blk
    for b in range(doc.shape[0]):
        for i in range(doc.shape[1]):
            qb = i // blk
            want = torch.zeros(mask.shape[-1], dtype=torch.bool)
            if not core[b, qb]:
                for c in range(core_idx.shape[1]):
                    cb = int(core_idx[b, c])
                    if valid[b, c] and cb < qb and doc[b, cb * blk] == doc[b, i]:
                        want[c * per:(c + 1) * per] = True
            assert torch.equal(mask[b, i], want), (b, i)
    assert NQ > 0


def test_content_summary_sources_keep_the_model_causal():
    """segmentation.summary_source=content: a block's own content decides whether later blocks
    read its summaries, so sources that are not core exist; perturbing tokens after p changes
    no logit before p (learned scorer, random init: tau_core 0.55 splits its two heads)."""
    from dcwdist.config import load_config
    from dcwdist.data_pipelines import SyntheticRows
    from dcwdist.eval.positions import context_for
    from dcwdist.train.trainer import build_model
    from tests.conftest import REPO
    cfg = load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"), [
        "attention.kind=dcw", "attention.block_size=16", "model.dim=32", "model.n_layers=2",
        "segmentation.scorer_layers=1", "segmentation.scorer_dim=16",
        "segmentation.summary_source=content", "segmentation.tau_core=0.55",
        "data.num_facts=1", "data.min_doc_len=60"])
    torch.manual_seed(0)
    model = build_model(cfg, AttentionConfig(**vars(cfg.attention))).eval()
    batch = SyntheticRows(cfg.data, 256, align=16).batch(0, 1)
    with torch.no_grad():
        ctx = context_for(batch)
        base = model(batch.tokens, ctx)
        assert (ctx.cache["summary_blocks"] & (ctx.tiers != 0)).any()  # content-only sources
        p = 150
        tokens = batch.tokens.clone()
        tokens[:, p:] = (tokens[:, p:] + 7) % cfg.model.vocab_size
        other = model(tokens, context_for(batch))
    torch.testing.assert_close(other[:, :p], base[:, :p], rtol=0, atol=1e-6)
    assert not torch.allclose(other[:, p:], base[:, p:])
