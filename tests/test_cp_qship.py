"""Query shipping (parallel.cp_core = "qship", parallel/qship.py) on real gloo groups.

DCW layers whose core/window rows ship their queries give the single-process output and the
q / k / v / block-score / alpha gradients to fp64 rounding (atol 1e-10), and the ring's (1e-5:
the ring accumulates in fp32), under zigzag and the doc deal; the bytes counted per label equal
the byte model (benchmarks/cp_comm.py, through qship.core_bytes) for both paths; "auto" picks
the path with fewer bytes (qship at H = 4, the ring at H = 16 query heads over Hkv = 2); the
Transformer with cp_core = "qship" (causal and prefix scorers, blocks re-dealt by the tiers)
gives the single-process loss and parameter gradients. One spawn per world size; the ship
plan itself is checked against the ring's steps and the global masks in one process.
"""
import pytest
import torch
import torch.distributed as dist

from dcwdist.attention.context import AttnContext
from dcwdist.attention.dcw import DCWAttention, build_dcw_plan
from dcwdist.parallel.balance import block_work, doc_sharding, zigzag_sharding
from dcwdist.parallel.comm import CommCounter
from dcwdist.parallel.dcw_cp import split_by_source
from dcwdist.parallel.qship import block_hits, choose_core, qship_plan, ship_counts
from dcwdist.parallel.stage import check_cp_stage
from dcwdist.parallel.zigzag import CPShard, cp_context, shard_tensor
from tests.cp_helpers import assert_cp_equals_single, gather_full, spawn
from tests.test_cp_attention import B, D, HKV, T, _dcw_setup, packed_docs
from tests.test_cp_balance import BLK, make_model, packed_batch
from tests.test_cp_comm import bench

EXACT = dict(rtol=0, atol=1e-10)  # fp64 end to end: only summation order differs
RING = dict(rtol=1e-5, atol=1e-5)  # the ring merges and accumulates dK/dV in fp32


def _inputs(n_heads):
    g = torch.Generator().manual_seed(1)
    mk = lambda h: torch.randn(B, T, h, D, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, g_out = mk(n_heads), mk(HKV), mk(HKV), mk(n_heads)
    return q, k, v, g_out * (packed_docs(T, 8) >= 0)[:, :, None, None]


def _dcw_run(group, sharding, core, n_heads=4):
    """One DCW layer (alpha 0.7, block scores with grad): single process (group None) or this
    rank's shard. Returns (full tensors by name, counter, ctx)."""
    cfg, doc, tiers, scores = _dcw_setup(torch.float64)
    q, k, v, g_out = _inputs(n_heads)
    mod = DCWAttention(cfg, 0, n_heads, HKV, D).double()
    with torch.no_grad():
        mod.alpha.fill_(0.7)
    s = scores.clone().requires_grad_()
    counter = CommCounter()
    if group is None:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mod(*leaves, AttnContext(doc_ids=doc, positions=doc * 0, tiers=tiers,
                                       block_scores=s))
        (out * g_out).sum().backward()
        grads = {"scores": s.grad, "alpha": mod.alpha.grad}
        return {"out": out, **dict(zip(("dq", "dk", "dv"), (x.grad for x in leaves))),
                **grads}, counter, None
    P, r = dist.get_world_size(group), dist.get_rank(group)
    shard = CPShard(group, P, r, T, doc, doc * 0, counter=counter, sharding=sharding, core=core)
    leaves = [shard_tensor(t, P, r, sharding).requires_grad_() for t in (q, k, v)]
    ctx = AttnContext(doc_ids=shard_tensor(doc, P, r, sharding), positions=doc * 0, tiers=tiers,
                      block_scores=s, group=group, cache={"cp_shard": shard})
    out = mod(*leaves, ctx)
    (out * shard_tensor(g_out, P, r, sharding)).sum().backward()
    res = {"out": out, **dict(zip(("dq", "dk", "dv"), (x.grad for x in leaves)))}
    res = {name: gather_full(x, group, sharding) for name, x in res.items()}
    for name, g in (("scores", s.grad), ("alpha", mod.alpha.grad)):  # partial on each rank
        res[name] = g.clone()
        dist.all_reduce(res[name], group=group)
    return res, counter, ctx


def _model_bytes(group, sharding, core, n_heads=4):
    cfg, doc, tiers, _ = _dcw_setup(torch.float64)
    P, r = dist.get_world_size(group), dist.get_rank(group)
    return bench().dcw_bytes(cfg, doc, tiers, P, n_heads, HKV, D, 8, core=core, rank=r,
                             sharding=sharding)


def _close(got, want, tol, what):
    real = (packed_docs(T, 8) >= 0)[:, :, None, None]
    for name in want:
        g, w = got[name], want[name]
        if name == "out":  # padding queries: no keys, any output
            g, w = g * real, w * real
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{what} {name}: {m}")


def check_layer(rank, world, group, balance):
    cfg, doc, tiers, _ = _dcw_setup(torch.float64)
    sh = (zigzag_sharding(T, world) if balance == "zigzag"
          else doc_sharding(block_work(cfg, doc, tiers), world, cfg.block_size))
    if balance == "doc":
        assert not torch.equal(sh.order, zigzag_sharding(T, world).order)
    ref, _, _ = _dcw_run(None, None, None)
    got = {}
    for core in ("qship", "ring"):
        got[core], counter, ctx = _dcw_run(group, sh, core)
        assert ctx.cache["cp_core"] == {0: core}
        want = _model_bytes(group, sh, core)["breakdown"]
        assert dict(counter.bytes) == want, (core, dict(counter.bytes), want)
    assert all(_model_bytes(group, sh, "qship")["breakdown"][k] > 0
               for k in ("qship_q_fwd", "qship_olse_fwd", "qship_dolse_bwd", "qship_dq_bwd"))
    _close(got["qship"], ref, EXACT, f"qship/{balance} vs one process")
    _close(got["qship"], got["ring"], RING, f"qship/{balance} vs ring")


def check_auto(rank, world, group):
    """auto = the fewer fwd + bwd bytes on the busiest rank; same choice on every rank."""
    sh = zigzag_sharding(T, world)
    picked = set()
    for n_heads in (4, 16):
        model = _model_bytes(group, sh, "auto", n_heads)
        core = model["core"]
        cheaper = "qship" if core["qship"]["total"] < core["ring"]["total"] else "ring"
        assert model["cp_core"] == cheaper
        res, counter, ctx = _dcw_run(group, sh, "auto", n_heads)
        assert ctx.cache["cp_core"] == {0: cheaper}
        assert dict(counter.bytes) == model["breakdown"]
        ref, _, _ = _dcw_run(None, None, None, n_heads)
        _close(res, ref, RING, f"auto H={n_heads}")
        picked.add(cheaper)
    assert picked == {"qship", "ring"}
    assert choose_core("auto", {"x": 5}, [{"x": 5}]) == "ring"  # ties go to the ring


def check_model(rank, world, group, seg_mode):
    """Transformer with cp_core=qship and the doc deal: single-process loss and gradients."""
    batch = packed_batch(5, prefix=seg_mode == "prefix")
    ref_model, model = make_model("dcw", seg_mode), make_model("dcw", seg_mode)
    check_cp_stage(model.attn_cfg, T, world, model.segmenter)  # installs the CP scorer hooks

    def loss_of(m, ctx, tokens, labels, cp):
        loss = m(tokens, ctx, labels) / batch.num_loss_tokens
        return loss + sum(v / cp for v in ctx.cache.get("aux_losses", {}).values())

    ctx = AttnContext(doc_ids=batch.doc_ids, positions=batch.positions, roles=batch.roles,
                      cache={"relevance": batch.relevance})
    ref = loss_of(ref_model, ctx, batch.tokens, batch.labels, 1)
    ref.backward()
    local, ctx = cp_context(batch, "dcw", group, BLK, balance="doc", attn_cfg=model.attn_cfg,
                            core="qship")
    loss = loss_of(model, ctx, local.tokens, local.labels, world)
    loss.backward()
    assert set(ctx.cache["cp_core"].values()) == {"qship"}
    assert ctx.cache["cp_shard"].sharding.scheme == "doc"
    # grad rtol 1e-6: the scorer's gradients differ by ~5e-8 relative (fp32 parts in its path)
    assert_cp_equals_single(loss, ref, model, ref_model, group, dict(rtol=1e-10, atol=1e-12),
                            dict(rtol=1e-6, atol=1e-9), seg_mode)


def test_ship_plan_agrees_with_ring_steps_and_global_masks():
    """n[r, p] counts the rows with entries in the ring step of source p; send and receive lists
    pair up; the flat local layouts give the global token masks (zigzag and the doc deal)."""
    cfg, doc, tiers, _ = _dcw_setup(torch.float64)
    plan = build_dcw_plan(cfg, doc, tiers)
    lays, blk = [plan.local, plan.buffer], cfg.block_size
    masks = [lay.token_mask()[:, 0] for lay in lays]  # [B, T, T]
    for P in (2, 4):
        for sh in (zigzag_sharding(T, P), doc_sharding(block_work(cfg, doc, tiers), P, blk)):
            counts = ship_counts(block_hits(lays, sh), sh, blk)
            plans = [qship_plan(lays, sh, r) for r in range(P)]
            for r in range(P):
                shard = CPShard(None, P, r, T, doc, doc * 0, sharding=sh)
                steps = [split_by_source(lay, shard) for lay in lays]
                for s in range(1, P):
                    rows = sum(st[s].indptr.diff().view(B, -1) for st in steps) > 0
                    assert counts[r, (r - s) % P] == rows.sum()
                    assert plans[r].send_splits[(r - s) % P] == rows.sum()
                assert [plans[p].send_splits[r] for p in range(P)] == plans[r].recv_splits
                qi, Tl = sh.index(r), T // P
                for lay, full in zip(plans[r].local, masks):
                    want = torch.zeros(B * Tl, B * Tl, dtype=torch.bool)
                    for b in range(B):
                        want[b * Tl:(b + 1) * Tl, b * Tl:(b + 1) * Tl] = full[b][qi][:, qi]
                    assert torch.equal(lay.token_mask()[0, 0], want)


@pytest.mark.parametrize("world", [2, 4])
def test_qship_equals_single_process_and_ring(world):
    checks = [(check_layer, ("zigzag",)), (check_layer, ("doc",)), (check_auto, ())]
    if world == 2:
        checks += [(check_model, ("causal",)), (check_model, ("prefix",))]
    spawn(world, checks)
