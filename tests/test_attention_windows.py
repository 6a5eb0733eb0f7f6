"""Window family (attention/windows.py) against the contract: each kind equals a dense masked
softmax under its brute-force token mask on packed rows; the Triton kernel equals the torch
executor; causality; packed rows equal documents alone; cp=2 equals one process; per-layer
windows; the random draw; one-line config errors; FLOPs; the model trains with each kind.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from dcwdist.attention import AttentionConfig, attention_flops, build_attention  # noqa: E402
from dcwdist.attention.windows import (layer_window, random_block_offsets,  # noqa: E402
                                       random_window_layout)
from dcwdist.config import ConfigError, load_config  # noqa: E402
from dcwdist.model import ModelConfig, Transformer  # noqa: E402
from dcwdist.parallel.zigzag import cp_kinds  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.cp_helpers import spawn  # noqa: E402
from tests.kernel_helpers import KERNEL_DEV, fp32_kernel_tol  # noqa: E402
from tests.windows_helpers import (BLK, D, HKV, KINDS, N_LAYERS, H,  # noqa: E402
                                   check_attention_cp, check_model_loss_cp, cfg_for, ctx_for,
                                   head_group_masks, module_for, oracle, packed_docs, plan_masks,
                                   qkv)

DOC = packed_docs()
REAL = (DOC >= 0)[..., None, None]


@pytest.mark.parametrize("kind", KINDS)
def test_kind_equals_bruteforce_mask_on_packed_rows(kind):
    """Both layers (per-layer windows and random draws differ). The pattern exactly: the union of
    the kind's layout token masks is the brute-force mask, each key once. The numbers: fp64 out and
    grads equal masked_attention under that mask to 1e-10 (the executor keeps fp64 inputs in fp64)."""
    q, k, v = qkv(0)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=q.dtype) * REAL
    for layer in range(N_LAYERS):
        mod = module_for(kind, layer)
        want = [head_group_masks(kind, mod.cfg, row.tolist(), layer) for row in DOC]
        for g, got in enumerate(plan_masks(mod, DOC)):
            assert torch.equal(got, torch.stack([m[g] for m in want])), (kind, layer, g)
        out = mod(q, k, v, ctx_for(DOC))
        ref = oracle(kind, mod.cfg, q, k, v, DOC, layer)
        tol = dict(atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out * REAL, ref * REAL, **tol)
        got = torch.autograd.grad((out * w).sum(), (q, k, v))
        exp = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for name, a, b in zip("qkv", got, exp):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{kind} layer {layer} d{name}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernel_equals_torch_executor(kind):
    pytest.importorskip("triton")
    T_, blk, d = 64, 8, 16
    doc = packed_docs(T_, blk)
    real = (doc >= 0)[..., None, None]
    kw = dict(block_size=blk, window=10, head_windows=[5, 20], s2_group=16, num_global=12)
    if kind in ("window", "random_global"):
        kw["window_schedule"] = [7, 13]
    q, k, v = [x.detach().to(KERNEL_DEV).requires_grad_()
               for x in qkv(2, T_, dtype=torch.float32, d=d)]
    doc, real = doc.to(KERNEL_DEV), real.to(KERNEL_DEV)
    g_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q) * real
    res = {}
    for impl in ("torch", "triton"):
        mod = build_attention(cfg_for(kind, impl=impl, **kw), 1, H, HKV, d,
                              n_layers=N_LAYERS).to(KERNEL_DEV)
        out = mod(q, k, v, ctx_for(doc))
        res[impl] = (out * real,) + torch.autograd.grad((out * g_out).sum(), (q, k, v))
    for name, a, b in zip(("out", "dq", "dk", "dv"), res["triton"], res["torch"]):
        diff = (a - b).abs()
        atol, rtol = fp32_kernel_tol(2e-4, 2e-4, grad=name != "out")
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: (
            f"{kind} {name}: max {diff.max():.2e} mean {diff.mean():.2e}: {m}"))


@pytest.mark.parametrize("kind", KINDS)
def test_perturbing_tokens_after_p_changes_nothing_before_p(kind):
    q, k, v = (x.detach() for x in qkv(4))
    mod = module_for(kind)
    out = mod(q, k, v, ctx_for(DOC))
    for p in (17, 24):  # inside a block, at a block boundary
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        g = torch.Generator().manual_seed(p)
        for x in (q2, k2, v2):
            x[:, p:] = torch.randn(x[:, p:].shape, generator=g, dtype=x.dtype)
        out2 = mod(q2, k2, v2, ctx_for(DOC))
        assert torch.equal(out[:, :p], out2[:, :p]), (kind, p)
        assert not torch.allclose(out[:, p:], out2[:, p:])


@pytest.mark.parametrize("kind", KINDS)
def test_packed_row_equals_documents_alone(kind):
    q, k, v = (x.detach()[1:] for x in qkv(5))
    mod = module_for(kind)
    out = mod(q, k, v, ctx_for(DOC[1:]))
    for s, e, n in [(0, 12, 10), (12, 36, 22), (36, 48, 12)]:
        doc = DOC[1:, s:e] - DOC[1, s]
        doc[doc < 0] = -1
        qa, ka, va = (x[:, s:e].clone() for x in (q, k, v))
        for x in (qa, ka, va):  # padding content must not matter
            x[:, n:] = 100.0
        alone = mod(qa, ka, va, ctx_for(doc))
        # fp64 inputs, fp32 accumulation in the layout executor: rounding differs with the row
        torch.testing.assert_close(alone[:, :n], out[:, s:s + n], atol=1e-6, rtol=1e-5)


def test_context_parallel_two_ranks_equal_one_process():
    """Attention out + q/k/v grads, and the model's loss + every parameter grad, packed rows."""
    assert set(KINDS) <= set(cp_kinds())
    spawn(2, [(check_attention_cp, (kind,)) for kind in KINDS]
          + [(check_model_loss_cp, (kind, balance)) for kind in KINDS
             for balance in ("zigzag", "doc")])


def test_layer_window_schedule_and_growth():
    lin = AttentionConfig(kind="window", window=8, window_growth="linear", window_max=32)
    geo = AttentionConfig(kind="window", window=8, window_growth="geometric", window_max=32)
    sched = AttentionConfig(kind="random_global", window_schedule=[4, 9, 2])
    assert [layer_window(lin, i, 4) for i in range(4)] == [8, 16, 24, 32]
    assert [layer_window(geo, i, 4) for i in range(4)] == [8, 13, 20, 32]  # 8 * 4**(l/3)
    assert [layer_window(sched, i, 3) for i in range(3)] == [4, 9, 2]
    assert layer_window(lin, 0, 1) == 8 and layer_window(AttentionConfig(window=6), 5) == 6


def test_model_layers_get_their_own_windows():
    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=3, n_heads=H, n_kv_heads=HKV)
    attn = AttentionConfig(kind="window", block_size=BLK, window=4, window_growth="geometric",
                           window_max=16)
    model = Transformer(cfg, attn)
    mods = [layer.self_attn.attn for layer in model.layers]
    assert [m.window for m in mods] == [4, 8, 16]
    q, k, v = (x.detach() for x in qkv(6))
    outs = [m(q, k, v, ctx_for(DOC)) for m in mods]
    assert not torch.allclose(outs[0], outs[2])
    # a later stage's attention override reaches every layer (the config is shared, not copied)
    attn.window_max = 32
    assert [m.window for m in mods] == [4, 11, 32]


def test_random_draw_depends_on_seed_layer_and_block_in_document_only():
    doc = packed_docs(96, 4)
    lay = lambda seed, layer: random_window_layout(doc, 4, 5, 6, 2, seed, layer)  # noqa: E731
    same = lambda a, b: torch.equal(a.indptr, b.indptr) and torch.equal(a.kv_block, b.kv_block)  # noqa
    assert same(lay(3, 0), lay(3, 0))
    assert not same(lay(3, 0), lay(3, 1)) and not same(lay(3, 0), lay(4, 0))
    # the table behind the draw: row i never depends on how many rows were asked for
    rel = torch.arange(600)[None]
    n = torch.full_like(rel, 50)
    full = random_block_offsets(3, 1, rel, n, 4)
    torch.testing.assert_close(random_block_offsets(3, 1, rel[:, :7], n[:, :7], 4), full[:, :7])
    assert (full[..., 1:] > full[..., :-1]).all() and full.min() >= 0 and full.max() < 50


@pytest.mark.parametrize("make, needle", [
    (lambda: AttentionConfig(kind="window", window_schedule=[4], window_growth="linear",
                             window_max=8), "exclusive"),
    (lambda: AttentionConfig(kind="window", window_growth="linear"),
     "window_max (0) must be >= window (32)"),
    (lambda: AttentionConfig(kind="static_sparse", window_schedule=[4]), "apply to kind window,"),
    (lambda: AttentionConfig(kind="dcw", window_schedule=[4], dcw_background_windows=[8]),
     "are exclusive"),
    (lambda: AttentionConfig(kind="s2attn", block_size=8, s2_group=24),
     "s2_group (24) must be a multiple of 2 * block_size (16)"),
    (lambda: AttentionConfig(kind="multi_window", head_windows=[]), "head_windows"),
    (lambda: AttentionConfig(kind="random_global", random_blocks=-1), "random_blocks"),
    (lambda: build_attention(AttentionConfig(kind="multi_window", head_windows=[4, 8, 16]),
                             0, 4, 2, 8), "n_kv_heads=2 is not divisible by len(head_windows)=3"),
    (lambda: build_attention(AttentionConfig(kind="s2attn"), 0, 3, 1, 8), "must be even"),
    (lambda: build_attention(AttentionConfig(kind="window", window_schedule=[4, 8]), 0, 4, 2, 8,
                             n_layers=3), "has 2 entries but the model has 3 layers"),
    (lambda: build_attention(AttentionConfig(kind="window", window_growth="linear",
                                             window_max=64), 1, 4, 2, 8), "model depth"),
    (lambda: module_for("s2attn")(*qkv(7), ctx_for(torch.tensor([[0] * 6 + [1] * 42] * 2))),
     "documents starting at block boundaries"),
    (lambda: load_config(os.path.join(REPO, "recipes/ablations/multi_window.yaml"),
                         ["attention.window_growth=linear"]), "window_schedule / window_growth"),
])
def test_bad_configs_fail_in_one_line(make, needle):
    with pytest.raises((ValueError, ConfigError)) as err:
        make()
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("kind", ["multi_window", "s2attn", "random_global"])
def test_flops_count_the_oracle_pairs(kind):
    cfg = cfg_for(kind)
    flops = attention_flops(cfg, ctx_for(DOC), H, D)
    pairs = 0
    for b in range(DOC.shape[0]):
        masks = head_group_masks(kind, cfg, DOC[b].tolist(), 0)
        pairs += sum(int(m.sum()) for m in masks) * (H // len(masks))
    assert flops["computed"] == pytest.approx(pairs * 4 * D)
    assert 0 < flops["density"] < 1


@pytest.mark.parametrize("kind", KINDS)
def test_model_trains_two_steps(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=N_LAYERS, n_heads=H, n_kv_heads=HKV)
    model = Transformer(cfg, cfg_for(kind))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 32, DOC.shape, generator=torch.Generator().manual_seed(8))
    labels = torch.full_like(tokens, -100)
    same = (DOC[:, 1:] == DOC[:, :-1]) & (DOC[:, 1:] >= 0)
    labels[:, :-1] = torch.where(same, tokens[:, 1:], -100)
    losses = []
    for _ in range(2):
        loss = model(tokens, ctx_for(DOC), labels) / int((labels >= 0).sum())
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0], losses
