"""DCW with a multi-window background tier (attention.dcw_background_windows): each kv-head group
is exactly DCW with that group's window (checked against the brute-force DCW oracle), on the
kernel too, with exact FLOPs; one-line errors for what it cannot run."""
import pytest
import torch

from dcwdist.attention import AttentionConfig, AttnContext, attention_flops, build_attention
from tests.test_attention_kinds import CFG, D, DOCS, HKV, TIERS, H, inputs, oracle

WINDOWS = [2, 7]  # one window per kv head (HKV = 2)


def ctx_for(doc=DOCS, tiers=TIERS):
    return AttnContext(doc_ids=doc, positions=torch.zeros_like(doc), tiers=tiers)


def multi_module(impl="torch"):
    cfg = AttentionConfig(kind="dcw", impl=impl, dcw_background_windows=WINDOWS,
                          **{**CFG, "window": 3})
    m = build_attention(cfg, 0, H, HKV, D)
    with torch.no_grad():
        m.alpha.fill_(0.7)
    return m


def test_each_head_group_is_dcw_with_its_window_against_the_oracle():
    q, k, v = (x.detach().double().requires_grad_() for x in inputs(3))
    out = multi_module()(q, k, v, ctx_for())
    out.backward(torch.ones_like(out))
    hq, hk = H // len(WINDOWS), HKV // len(WINDOWS)
    for g, w in enumerate(WINDOWS):
        single = build_attention(AttentionConfig(kind="dcw", **{**CFG, "window": w}), 0, hq, hk, D)
        with torch.no_grad():
            single.alpha.fill_(0.7)
        qs, ks, vs = (x.detach()[:, :, g * n:(g + 1) * n].clone().requires_grad_()
                      for x, n in ((q, hq), (k, hk), (v, hk)))
        want = oracle("dcw", single, qs, ks, vs)
        torch.testing.assert_close(out[:, :, g * hq:(g + 1) * hq], want, atol=1e-10, rtol=1e-10)
        want.backward(torch.ones_like(want))
        torch.testing.assert_close(q.grad[:, :, g * hq:(g + 1) * hq], qs.grad, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(k.grad[:, :, g * hk:(g + 1) * hk], ks.grad, atol=1e-10, rtol=1e-10)


def test_kernel_equals_reference():
    # the kernel tiles blocks of >= 16 tokens with head dim >= 16
    doc = torch.tensor([[0] * 64, [0] * 32 + [1] * 32])
    tiers = torch.tensor([[0, 2, 1, 2], [0, 1, 0, 2]])
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 64, h, 16, generator=g, requires_grad=True) for h in (H, HKV, HKV))
    outs, grads = [], []
    for impl in ("torch", "triton"):
        cfg = AttentionConfig(kind="dcw", impl=impl, block_size=16, window=4, buffer_window=8,
                              stride=3, summary_pool=4, dcw_background_windows=[5, 20])
        m = build_attention(cfg, 0, H, HKV, 16)
        with torch.no_grad():
            m.alpha.fill_(0.7)
        out = m(q, k, v, ctx_for(doc, tiers))
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-4, rtol=2e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)


def test_flops_are_the_groups_own_dcw_flops():
    ctx = ctx_for()
    multi = attention_flops(multi_module().cfg, ctx, H, D)
    per_group = sum(attention_flops(AttentionConfig(kind="dcw", **{**CFG, "window": w}),
                                    ctx_for(), H, D)["computed"] for w in WINDOWS) / len(WINDOWS)
    assert multi["computed"] == pytest.approx(per_group, rel=1e-12)


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ValueError, match="must divide n_kv_heads=2"):
        build_attention(AttentionConfig(kind="dcw", dcw_background_windows=[4, 8, 16], **CFG),
                        0, H, HKV, D)
    with pytest.raises(ValueError, match="must be >= 1"):
        AttentionConfig(kind="dcw", dcw_background_windows=[0])
    from dcwdist.parallel.stage import check_cp_stage
    with pytest.raises(ValueError, match="cp=1 only"):
        check_cp_stage(multi_module().cfg, 64, 2, None)


def test_per_layer_background_windows_make_each_layer_dcw_with_its_window():
    """window_schedule on dcw: layer l's background tier reads window_schedule[l]."""
    q, k, v = (x.detach().double() for x in inputs(6))
    schedule = [2, 7]
    for layer, w in enumerate(schedule):
        cfg = AttentionConfig(kind="dcw", window_schedule=schedule, **{**CFG, "window": 3})
        m = build_attention(cfg, layer, H, HKV, D, n_layers=len(schedule))
        single = build_attention(AttentionConfig(kind="dcw", **{**CFG, "window": w}), 0, H, HKV, D)
        with torch.no_grad():
            m.alpha.fill_(0.7)
            single.alpha.fill_(0.7)
        torch.testing.assert_close(m(q, k, v, ctx_for()), oracle("dcw", single, q, k, v),
                                   atol=1e-10, rtol=1e-10)


def check_per_layer_windows_cp(rank, world, group):
    from tests.cp_helpers import assert_cp_equals_single, tiny_cp_model
    from dcwdist.parallel.stage import check_cp_stage
    from tests.test_cp_balance import BLK, T, VOCAB, forward, packed_batch
    batch = packed_batch(7)
    kw = dict(window_growth="linear", window=4, window_max=12)
    ref_model = tiny_cp_model("dcw", "causal", BLK, VOCAB, **kw)
    model = tiny_cp_model("dcw", "causal", BLK, VOCAB, **kw)
    check_cp_stage(model.attn_cfg, T, world, model.segmenter)
    ref, _ = forward(ref_model, batch, None, "doc", True)
    ref.backward()
    loss, _ = forward(model, batch, group, "doc", True)
    loss.backward()
    assert_cp_equals_single(loss, ref, model, ref_model, group, dict(rtol=1e-6, atol=1e-8),
                            dict(rtol=1e-5, atol=1e-7), "dcw per-layer windows")


def test_per_layer_background_windows_under_cp2_equal_one_process():
    from tests.cp_helpers import spawn
    spawn(2, [(check_per_layer_windows_cp, ())])
