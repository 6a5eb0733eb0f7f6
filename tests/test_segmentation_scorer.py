"""The segmenter end to end: causality, the L_task gradient path, FLOPs, L_eff, phases."""
import pytest
import torch

from dcwdist.attention import AttentionConfig, AttnContext, attention_flops
from dcwdist.attention.context import (ROLE_ANSWER, ROLE_DOCUMENT, ROLE_INSTRUCTION, ROLE_PAD,
                                       TIER_CORE)
from dcwdist.segmentation import (SegmentationConfig, apply_phase, build_segmenter,
                                  segmenter_parameter_names)

BLK, M = 8, 32
ATTN = AttentionConfig(kind="dcw", block_size=BLK, window=4, buffer_window=8, stride=2,
                       summary_pool=2)


def small_cfg(**kw):
    return SegmentationConfig(scorer_layers=2, scorer_dim=32, scorer_heads=2, scorer_window=8, **kw)


def packed(lengths=(12, 9, 7), instr=(11, 0, 5), answer=(2, 0, 1), pad_blocks=1):
    """doc ids, positions, roles [2, T] for documents of the given block counts."""
    doc, pos, roles = [], [], []
    for d, (n, ni, na) in enumerate(zip(lengths, instr, answer)):
        T = n * BLK
        doc += [d] * T
        pos += list(range(T))
        roles += [ROLE_INSTRUCTION] * ni + [ROLE_DOCUMENT] * (T - ni - na) + [ROLE_ANSWER] * na
    doc += [-1] * BLK * pad_blocks
    pos += list(range(BLK * pad_blocks))
    roles += [ROLE_PAD] * BLK * pad_blocks
    t = lambda x: torch.tensor([x, x])  # noqa: E731
    return t(doc), t(pos), t(roles)


def run(seg, emb, doc, pos, roles, relevance=None):
    ctx = AttnContext(doc_ids=doc, positions=pos, roles=roles,
                      cache={} if relevance is None else {"relevance": relevance})
    seg(emb, None, ctx)
    return ctx


@pytest.mark.parametrize("p", [5, 40, 100, 161])  # inside doc 0's instruction, mid-docs, doc 2
def test_causal_mode_nothing_before_p_depends_on_later_tokens(p):
    torch.manual_seed(0)
    seg = build_segmenter(small_cfg(mode="causal", tau_core=0.5, tau_buffer=0.45), M, ATTN)
    doc, pos, roles = packed()
    emb = torch.randn(*doc.shape, M)
    a = run(seg, emb, doc, pos, roles)
    emb2 = emb.clone()
    emb2[:, p + 1:] = torch.randn_like(emb2[:, p + 1:]) * 3
    b = run(seg, emb2, doc, pos, roles)
    sa, sb = a.cache["token_scores"], b.cache["token_scores"]
    assert torch.equal(sa[:, :p + 1], sb[:, :p + 1])
    assert not torch.allclose(sa[:, p + 1:], sb[:, p + 1:])  # the perturbation is visible later
    upto = p // BLK + 1  # blocks up to and including p's block
    assert torch.equal(a.tiers[:, :upto], b.tiers[:, :upto])
    assert torch.equal(a.block_scores[:, :upto], b.block_scores[:, :upto])
    assert len(set(a.tiers.flatten().tolist())) == 3  # the case exercises every tier


def test_prefix_mode_scorer_never_reads_the_answer():
    torch.manual_seed(0)
    seg = build_segmenter(small_cfg(mode="prefix"), M, ATTN)
    doc, pos, roles = packed()
    emb = torch.randn(*doc.shape, M)
    a = run(seg, emb, doc, pos, roles)
    emb2 = torch.where((roles == ROLE_ANSWER)[..., None], torch.randn_like(emb), emb)
    b = run(seg, emb2, doc, pos, roles)
    read = roles != ROLE_ANSWER
    assert torch.equal(a.cache["token_scores"][read], b.cache["token_scores"][read])
    assert torch.equal(a.tiers, b.tiers) and torch.equal(a.block_scores, b.block_scores)


@pytest.mark.parametrize("mode", ["prefix", "causal"])
def test_unlabelled_task_loss_reaches_the_scorer_through_block_scores(mode):
    """No labels, no L_eff: only the DCW straight-through weight s / s.detach() carries gradient."""
    torch.manual_seed(0)
    seg = build_segmenter(small_cfg(mode=mode, lambda_eff=0.0), M, ATTN)
    doc, pos, roles = packed()
    ctx = run(seg, torch.randn(*doc.shape, M), doc, pos, roles)
    assert ctx.cache.get("aux_losses", {}) == {}
    core = ctx.tiers == TIER_CORE  # DCW weights the summaries of core blocks
    s = ctx.block_scores[core]
    assert s.requires_grad and (s > 0).all()
    f = torch.randn(s.shape)  # stands for <dL/dV_summary, V_summary> of each core block
    loss = (f * s / s.detach()).sum()
    assert loss.item() == pytest.approx(f.sum().item(), rel=1e-5)  # the weight's value is 1
    loss.backward()
    sc = seg.scorer
    for name in ("in_proj.weight", "encoder.layers.0.attn.qkv.weight", "w_h.weight",
                 "w_g.weight", "w_i.weight"):
        grad = dict(sc.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_frozen_phase_runs_without_gradient_or_losses():
    seg = build_segmenter(small_cfg(mode="causal", phase="frozen", lambda_eff=1.0), M, ATTN)
    doc, pos, roles = packed()
    ctx = run(seg, torch.randn(*doc.shape, M), doc, pos, roles, relevance=(roles == 0).float())
    assert not ctx.block_scores.requires_grad and ctx.cache["aux_losses"] == {}


@pytest.mark.parametrize("mode", ["prefix", "causal"])
def test_realised_flops_equal_the_attention_layouts_count(mode):
    torch.manual_seed(0)
    seg = build_segmenter(small_cfg(mode=mode, tau_core=0.5, tau_buffer=0.4), M, ATTN)
    doc, pos, roles = packed(lengths=(20, 14, 9))
    ctx = run(seg, torch.randn(*doc.shape, M), doc, pos, roles)
    want = attention_flops(ATTN, ctx, 1, 1)["density"]
    assert ctx.cache["metrics"]["flops_realised"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mode", ["prefix", "causal"])
def test_l_eff_lowers_the_expected_flops_toward_the_target(mode):
    torch.manual_seed(0)
    cfg = small_cfg(mode=mode, phase="scorer", lambda_seg=0.0, lambda_eff=1.0, eff_target=0.3)
    seg = build_segmenter(cfg, M, ATTN)
    doc, pos, roles = packed(lengths=(30, 20, 12))
    emb = torch.randn(*doc.shape, M)
    opt = torch.optim.Adam(seg.parameters(), lr=3e-3)
    fracs = []
    for _ in range(30):
        ctx = run(seg, emb, doc, pos, roles)
        fracs.append(ctx.cache["metrics"]["flops_expected"])
        opt.zero_grad()
        sum(ctx.cache["aux_losses"].values()).backward()
        opt.step()
    start, end = fracs[0], fracs[-1]
    assert start > 0.3 + 0.1, fracs
    assert end < start - 0.5 * (start - 0.3), fracs  # closed at least half the gap
    assert end > 0.3 - 0.05, fracs  # relu: no push below the target


def test_scorer_phase_trains_only_the_segmenter():
    from dcwdist.model.config import ModelConfig
    from dcwdist.model.transformer import Transformer
    seg = build_segmenter(small_cfg(), M, ATTN)
    model = Transformer(ModelConfig(dim=M, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=64,
                                    ffn_dim=64), ATTN, seg)
    names = segmenter_parameter_names(model)
    assert names and all(n.startswith("segmenter.") for n in names)
    trained = {id(p) for p in apply_phase(model, "scorer")}
    assert trained == {id(p) for n, p in model.named_parameters() if n in names}
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    apply_phase(model, "frozen")
    assert all(p.requires_grad == (n not in names) for n, p in model.named_parameters())


def test_instruction_pooling_gradient_equals_the_plain_gather():
    """pool_instruction's running mean backward (run sums from chunked prefix sums) equals
    autograd's index backward to fp32 rounding; the forward is bit-identical."""
    from dcwdist.segmentation import scorer as sc
    g = torch.Generator().manual_seed(0)
    B, T, D = 2, 40, 6
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 15:] = 1
    doc[1, 8:30] = 1
    doc[1, 30:] = -1
    instr = torch.rand(B, T, generator=g) < 0.3
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    e, has = sc.pool_instruction(h, doc, instr, True)
    (grad,) = torch.autograd.grad((e * w).sum(), h)
    plain = sc._SortedGather.apply
    try:
        sc._SortedGather.apply = lambda src, idx: src[idx]
        e2, _ = sc.pool_instruction(h, doc, instr, True)
        (grad2,) = torch.autograd.grad((e2 * w).sum(), h)
    finally:
        sc._SortedGather.apply = plain
    torch.testing.assert_close(e, e2, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad2, rtol=1e-6, atol=1e-6)
    assert has.any() and grad.abs().sum() > 0


def test_run_sums_keep_fp32_accuracy_of_their_chunk_after_a_long_prefix():
    """A run's gradient sum is a difference of prefix sums. With fp32 prefixes inside 1024-row
    chunks and fp64 carries, a 3-row run after 100k rows is as accurate as an fp32 sum over one
    chunk: the rounding of the rows before its chunk does not reach it."""
    from dcwdist.segmentation import scorer as sc
    g = torch.Generator().manual_seed(0)
    N, D = 100_003, 3
    x = torch.randn(N, D, generator=g) + 0.5  # a drift: the whole-row prefix grows to ~5e4
    pos = torch.tensor([0, 1023, 1024, 50_000, N - 4, N - 1])
    want = x.double().cumsum(0)[pos]
    got = sc._prefix_sums_at(x, pos, chunk=1024)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-4)
    short_run = got[-1] - got[-2]
    torch.testing.assert_close(short_run, x[-3:].double().sum(0), rtol=0, atol=2e-5)
    whole = x[:2048]  # a whole number of chunks: no padding
    at = torch.tensor([0, 1023, 1024, 2047])
    torch.testing.assert_close(sc._prefix_sums_at(whole, at, chunk=1024),
                               whole.double().cumsum(0)[at], rtol=1e-7, atol=1e-4)
    # idx runs of every length, chunk boundaries inside and between runs
    idx = torch.repeat_interleave(torch.arange(7), torch.tensor([1, 1500, 3, 1024, 2, 700, 9]))
    src = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(idx.numel(), D, dtype=torch.float64)
    (a,) = torch.autograd.grad((sc._SortedGather.apply(src, idx) * w).sum(), src)
    (b,) = torch.autograd.grad((src[idx] * w).sum(), src)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_scorer_checkpointing_changes_no_gradient_and_keeps_one_input_per_layer():
    """segmentation.scorer_checkpointing recomputes each encoder layer in backward: the scorer's
    loss and gradients equal the plain scorer's (fp64), with less memory kept for backward."""
    from dcwdist.model.activations import LiveBytes
    from dcwdist.segmentation.scorer import InstructionScorer
    doc, pos, roles = packed()
    emb = torch.randn(*doc.shape, M, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        scorer = InstructionScorer(small_cfg(mode="causal", scorer_checkpointing=ckpt), M).double()
        scorer.train()
        with LiveBytes() as live:
            out = scorer(emb, doc, pos, roles)
            kept = live.current
        out.pow(2).sum().backward()
        got[ckpt] = (out.detach(), {n: p.grad for n, p in scorer.named_parameters()}, kept)
    (out0, g0, kept0), (out1, g1, kept1) = got[False], got[True]
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-12, atol=1e-12, msg=name)
    assert kept1 < 0.6 * kept0, (kept1, kept0)
