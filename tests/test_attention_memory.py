"""The memory family -- hierarchical, compressed_memory, hyena -- against brute force: outputs,
gradients, FLOPs, kernel = torch, causality, packed documents, cp=2 = cp=1, the memory budget,
and two training steps of a tiny model with each kind."""
import os

import pytest
import torch

from dcwdist.attention import AttentionConfig, AttnContext, attention_flops, build_attention
from dcwdist.attention.flops import layout_pairs
from dcwdist.attention.hyena import fft_causal_conv, hyena_reference
from dcwdist.attention.memory import CompressedMemoryAttention
from dcwdist.data_pipelines.packing import IGNORE
from dcwdist.model import ModelConfig, Transformer
from tests.cp_helpers import gather_full, spawn
from tests.memory_helpers import conv_reference, key_counts, oracle

H, HKV, D, BLK, T = 4, 2, 8, 4, 64
BASE = dict(block_size=BLK, segment_size=8, segment_pool=2, chunk_size=16)
VARIANTS = {
    "hier3_f2": dict(kind="hierarchical", hier_levels=3, hier_factor=2, hier_near=1),
    # pools 2 / 8 / 32: a level-3 unit spans four segments
    "hier3_f4": dict(kind="hierarchical", hier_levels=3, hier_factor=4, hier_near=1),
    "hier2_near2": dict(kind="hierarchical", hier_levels=2, hier_factor=2, hier_near=2),
    "hier1": dict(kind="hierarchical", hier_levels=1),
    "mem_mean": dict(kind="compressed_memory", memory_slots=4, memory_budget=6),
    "mem_mean_window": dict(kind="compressed_memory", memory_slots=4, memory_budget=6,
                            memory_window=3),
    "mem_learned": dict(kind="compressed_memory", memory_slots=4, memory_budget=10,
                        compressor="learned"),
}
# Row 0: one 64-token document. Row 1: three documents starting at block boundaries, padded.
DOCS = [[0] * 64, [0] * 21 + [-1] * 3 + [1] * 26 + [-1] * 2 + [2] * 12]
DOC = torch.tensor(DOCS)
# The layout executor keeps fp64 inputs in fp64, so fp64 runs equal the fp64 oracle to 1e-10.
ORACLE_TOL = dict(atol=1e-10, rtol=1e-10)


def cfg_of(name, **kw):
    return AttentionConfig(**{**BASE, **VARIANTS[name], **kw})


def qkv(seed, dtype=torch.float64, T=T, B=2, d=D, h=H, hkv=HKV):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(B, T, n, d, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(h), mk(hkv), mk(hkv)


def ctx_of(doc=DOC):
    return AttnContext(doc_ids=doc, positions=torch.zeros_like(doc))


def real(doc=DOC):
    return (doc >= 0)[..., None, None].to(torch.float64)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_memory_kind_equals_bruteforce_outputs_grads_and_flops(name):
    cfg = cfg_of(name)
    mod = build_attention(cfg, 0, H, HKV, D).double()
    q, k, v = qkv(1)
    ctx = ctx_of()
    out = mod(q, k, v, ctx)
    ref = oracle(q, k, v, DOCS, cfg, mod.queries())
    torch.testing.assert_close(out, ref, **ORACLE_TOL)
    w = torch.randn_like(out) * real()
    params = list(mod.parameters())
    got = torch.autograd.grad((out * w).sum(), [q, k, v] + params)
    exp = torch.autograd.grad((ref * w).sum(), [q, k, v] + params)
    for n, a, b in zip(["q", "k", "v", "slot_queries"], got, exp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{n}: {m}")
    flops = attention_flops(cfg, ctx, H, D)
    assert flops["computed"] == float(key_counts(DOCS, T, cfg).sum()) * H * 4 * D


def test_hierarchical_levels_tile_the_past_fine_near_coarse_far():
    """Every earlier token of the document is in exactly one visible unit; units never get
    finer with distance; each level's units are complete and before the query's segment."""
    cfg = cfg_of("hier3_f2")
    plan = build_attention(cfg, 0, H, HKV, D).plan(cfg, ctx_of())
    for s in plan.sets:
        lay = s.layout
        mask = lay.token_mask()[:, 0]  # [B, T, U]
        first = lay.k_pos  # [B, U] first token of each unit
        for b, doc in enumerate(DOCS):
            for i in (5, 17, 40, 63):
                if doc[i] < 0:
                    continue
                units = mask[b, i].nonzero().squeeze(1)
                seg_start = i - (i - doc.index(doc[i])) % cfg.segment_size
                assert all(first[b, u] + s.size <= seg_start for u in units)
    for b, doc in enumerate(DOCS):
        for i in range(T):
            if doc[i] < 0:
                continue
            ds = doc.index(doc[i])
            seg_start = i - (i - ds) % cfg.segment_size
            cover, sizes = torch.zeros(T, dtype=torch.long), []
            for s in plan.sets:
                for u in s.layout.token_mask()[b, 0, i].nonzero().squeeze(1).tolist():
                    a = int(s.layout.k_pos[b, u])
                    cover[a:a + s.size] += 1
                    sizes.append((a, s.size))
            assert cover[ds:seg_start].eq(1).all() and cover.sum() == seg_start - ds, (b, i)
            by_start = [p for _, p in sorted(sizes, reverse=True)]  # nearest first
            assert by_start == sorted(by_start), (b, i, sizes)


@pytest.mark.parametrize("name", ["hier3_f4", "mem_learned"])
def test_padding_rows_read_nothing(name):
    doc = torch.tensor([[-1] * T, [0] * 30 + [-1] * 34])
    mod = build_attention(cfg_of(name), 0, H, HKV, D).double()
    q, k, v = qkv(8)
    ctx = ctx_of(doc)
    out = mod(q, k, v, ctx)
    assert out[0].abs().max() == 0 and out[1, 30:].abs().max() == 0
    plan = mod.plan(mod.cfg, ctx)
    for lay in [plan.local] + [s.layout for s in plan.sets]:  # the kernel indexes these blocks
        kv = lay.kv_block.long()
        assert lay.nnz == 0 or (kv.min() >= 0 and kv.max() < lay.num_k_blocks)
    torch.testing.assert_close(out, oracle(q, k, v, doc.tolist(), mod.cfg, mod.queries()),
                               **ORACLE_TOL)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), [q, k, v]))


needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU needs TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("name", ["hier3_f4", "mem_learned"])
def test_triton_impl_equals_torch_impl(name):
    cfg = AttentionConfig(**{**VARIANTS[name], "block_size": 8, "segment_size": 16,
                             "segment_pool": 4, "chunk_size": 32})
    docs = torch.tensor([[0] * 21 + [-1] * 3 + [1] * 40])
    q, k, v = qkv(2, torch.float32, B=1, d=16, h=2, hkv=1)
    g_out = torch.randn(1, T, 2, 16, generator=torch.Generator().manual_seed(3))
    results = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        mod = build_attention(AttentionConfig(**{**vars(cfg), "impl": impl}), 0, 2, 1, 16)
        out = mod(q, k, v, ctx_of(docs))
        grads = torch.autograd.grad((out * g_out).sum(), [q, k, v])
        results[impl] = (out, *grads)
    for n, a, b in zip(["out", "dq", "dk", "dv"], results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["hier3_f2", "mem_mean_window", "mem_learned", "hyena"])
@pytest.mark.parametrize("p", [13, 37])
def test_causal_perturbation(name, p):
    cfg = AttentionConfig(kind="hyena", hyena_filter_hidden=8) if name == "hyena" \
        else cfg_of(name)
    mod = build_attention(cfg, 0, H, HKV, D).double()
    q, k, v = qkv(4)
    out = mod(q, k, v, ctx_of())
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    g = torch.Generator().manual_seed(9)
    for x in (q2, k2, v2):
        x[:, p:] = torch.randn(x[:, p:].shape, generator=g, dtype=x.dtype)
    out2 = mod(q2, k2, v2, ctx_of())
    if name == "hyena":  # an FFT mixes every input into round-off: exact up to ~1e-15
        torch.testing.assert_close(out2[:, :p], out[:, :p], atol=1e-12, rtol=0)
    else:
        assert torch.equal(out[:, :p], out2[:, :p])
    assert not torch.allclose(out[:, p:], out2[:, p:])


def test_hyena_fft_equals_direct_convolution_and_documents_do_not_leak():
    cfg = AttentionConfig(kind="hyena", hyena_filter_hidden=16, hyena_decay_len=32)
    mod = build_attention(cfg, 0, H, HKV, D).double()
    with torch.no_grad():  # a filter far from its EMA init
        for p in mod.parameters():
            p.normal_(0, 0.5)
    q, k, v = qkv(5)
    out = mod(q, k, v, ctx_of())
    ref = hyena_reference(mod, q, k, v, DOC)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(out)
    params = [q, k, v] + list(mod.parameters())
    for a, b in zip(torch.autograd.grad((out * w).sum(), params),
                    torch.autograd.grad((ref * w).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # rows that are one whole document take the batched path
    one = torch.zeros_like(DOC)
    torch.testing.assert_close(mod(q, k, v, ctx_of(one)), hyena_reference(mod, q, k, v, one),
                               atol=1e-10, rtol=1e-10)
    # the convolution itself against a loop written here
    h = torch.randn(T, 3, dtype=torch.float64)
    x = torch.randn(2, T, 3, dtype=torch.float64)
    torch.testing.assert_close(fft_causal_conv(x, h), conv_reference(x, h, [[0] * T] * 2),
                               atol=1e-10, rtol=1e-10)
    # document 2 of row 1 (tokens 24..49) does not reach documents 1 and 3
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[1, 24:50] += 1.0
    out2 = mod(q2, k2, v2, ctx_of())
    assert torch.equal(out2[1, :24], out[1, :24]) and torch.equal(out2[1, 50:], out[1, 50:])
    assert torch.equal(out2[0], out[0]) and not torch.allclose(out2[1, 24:50], out[1, 24:50])
    assert out[1, 21:24].abs().max() == 0  # padding outputs 0


def test_hyena_refuses_context_parallel_and_flops():
    mod = build_attention(AttentionConfig(kind="hyena"), 0, H, HKV, D)
    q, k, v = qkv(6, torch.float32)
    ctx = AttnContext(doc_ids=DOC, positions=DOC * 0, group=object())
    with pytest.raises(ValueError, match="hyena has no context-parallel path"):
        mod(q, k, v, ctx)
    with pytest.raises(ValueError, match="hyena has no attention layouts"):
        attention_flops(AttentionConfig(kind="hyena"), ctx_of(), H, D)
    from dcwdist.parallel.zigzag import cp_kinds
    assert {"hierarchical", "compressed_memory"} <= set(cp_kinds()) and "hyena" not in cp_kinds()


def test_memory_budget_bounds_slots_and_learned_compressor_learns():
    Tl = 512
    doc = torch.zeros(1, Tl, dtype=torch.long)
    reads = {}
    for budget in (12, 10 ** 6):
        cfg = cfg_of("mem_mean", memory_budget=budget)
        plan = CompressedMemoryAttention.plan(cfg, ctx_of(doc))
        reads[budget] = layout_pairs(plan.sets[0].layout)[0, 0]  # [T] slots each token reads
        assert plan.sets[0].num_units * plan.sets[0].channels == Tl // 8 * 4
    assert reads[12].max() == 12 and reads[12][-8:].eq(12).all()
    assert reads[10 ** 6].max() == (Tl // 8 - 1) * 4  # unbounded: every earlier slot
    # learned pooling queries receive (finite, non-zero) gradients
    mod = build_attention(cfg_of("mem_learned"), 0, H, HKV, D)
    q, k, v = qkv(7, torch.float32)
    mod(q, k, v, ctx_of()).square().sum().backward()
    g = mod.slot_queries.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().min() > 0


# -- context parallel -----------------------------------------------------------------------------
CP_T = 128
CP_DOCS = torch.tensor([[0] * 128, [0] * 37 + [-1] * 3 + [1] * 50 + [-1] * 2 + [2] * 36])


def block_deal(T, blk, world, seed=0):
    """A non-zigzag sharding: blocks dealt to ranks at random, each rank's kept in order
    (the shape of parallel.cp_balance = "doc")."""
    from dcwdist.parallel.balance import Sharding
    perm = torch.randperm(T // blk, generator=torch.Generator().manual_seed(seed))
    blocks = perm.view(world, -1).sort(1).values
    order = (blocks[..., None] * blk + torch.arange(blk)).reshape(-1)
    return Sharding(order=order, size=world, unit=blk, scheme="doc")


def check_cp_equals_single(rank, world, group, name, dealt=False):
    from dcwdist.parallel.comm import CommCounter
    from dcwdist.parallel.dcw_cp import slot_routing
    from dcwdist.parallel.memory_cp import memory_cp_plan
    from dcwdist.parallel.zigzag import CPShard
    cfg = cfg_of(name)
    torch.manual_seed(0)
    mod = build_attention(cfg, 0, H, HKV, D).double()
    q, k, v = qkv(11, T=CP_T)
    g_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(12),
                        dtype=q.dtype) * real(CP_DOCS)
    ref = mod(q, k, v, ctx_of(CP_DOCS))
    params = list(mod.parameters())
    ref_grads = torch.autograd.grad((ref * g_out).sum(), [q, k, v] + params)
    shard = CPShard(group, world, rank, CP_T, CP_DOCS, CP_DOCS * 0, counter=CommCounter(),
                    sharding=block_deal(CP_T, BLK, world) if dealt else None)
    local = lambda x: shard.sharding.shard(x, rank)  # noqa: E731
    loc = [local(x).detach().requires_grad_() for x in (q, k, v)]
    ctx = AttnContext(doc_ids=local(CP_DOCS), positions=CP_DOCS * 0, group=group,
                      cache={"cp_shard": shard})
    out = mod(*loc, ctx)
    grads = torch.autograd.grad((out * local(g_out)).sum(), loc + params)
    # bytes this rank sent in the forward: the K/V ring and, per pooled set, its runs (fp64)
    B, Tl, b = CP_DOCS.shape[0], CP_T // world, 8
    sent = shard.counter.bytes
    assert sent["ring_kv_fwd"] == (world - 1) * 2 * B * Tl * HKV * D * b
    for pset, _, route in memory_cp_plan(mod, ctx)["sets"]:
        runs = slot_routing(route["slot"][1], route["slot"][2], world)[1]  # sent per row
        assert sent[pset.name + "_fwd"] == (world - 1) * B * runs * pset.channels * HKV * 2 * D * b
        learned = cfg.compressor == "learned" and cfg.kind == "compressed_memory"
        lse_bytes = learned * (world - 1) * B * runs * pset.channels * HKV * b
        assert sent.get(pset.name + "_lse_fwd", 0) == lse_bytes
    tol = dict(atol=1e-5, rtol=1e-5)
    full = lambda x: gather_full(x.detach(), group, shard.sharding)  # noqa: E731
    torch.testing.assert_close(full(out), ref.detach(), **tol)
    for n, a, b in zip(["dq", "dk", "dv"], grads[:3], ref_grads[:3]):
        torch.testing.assert_close(full(a), b, **tol, msg=lambda m: f"{n}: {m}")
    for a, b in zip(grads[3:], ref_grads[3:]):  # parameters: per-rank partials sum to the whole
        total = a.clone()
        torch.distributed.all_reduce(total, group=group)
        torch.testing.assert_close(total, b, **tol)


def test_cp2_equals_cp1():
    spawn(2, [(check_cp_equals_single, (n,)) for n in ("hier3_f4", "mem_mean", "mem_learned")]
          + [(check_cp_equals_single, (n, True)) for n in ("hier3_f2", "mem_learned")])


# -- the model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hierarchical", "compressed_memory", "hyena"])
def test_tiny_model_trains_two_steps(kind):
    torch.manual_seed(0)
    attn = AttentionConfig(kind=kind, block_size=8, segment_size=16, segment_pool=4,
                           memory_slots=4, memory_budget=8, compressor="learned",
                           hyena_filter_hidden=16, chunk_size=32)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2),
                        attn)
    doc = torch.tensor([[0] * 40 + [1] * 56, [0] * 96])
    tokens = torch.randint(0, 64, doc.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(tokens, IGNORE)
    labels[:, :-1] = torch.where(doc[:, 1:] == doc[:, :-1], tokens[:, 1:], IGNORE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    own = [p for n, p in model.named_parameters() if ".attn." in n]
    before = [p.detach().clone() for p in own]
    losses = []
    for _ in range(2):
        loss = model(tokens, ctx_of(doc), labels) / (labels != IGNORE).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert model(tokens, ctx_of(doc), labels).item() / (labels != IGNORE).sum() < losses[0]
    assert (kind == "hierarchical") or any(not torch.equal(a, b) for a, b in zip(before, own))


@pytest.mark.parametrize("bad, match", [
    (dict(kind="hierarchical", segment_size=20, block_size=8), "segment_size"),
    (dict(kind="hierarchical", hier_levels=4), "hier_levels"),
    (dict(kind="hierarchical", segment_size=64, segment_pool=16, hier_factor=3), "segment_pool"),
    (dict(kind="compressed_memory", segment_size=64, memory_slots=5), "memory_slots"),
])
def test_config_rejects_bad_memory_fields(bad, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**bad)
