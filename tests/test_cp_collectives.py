"""Every differentiable collective of the CP paths runs its backward on every rank.

A gathered key set's backward is an all-reduce (comm.all_gather). When none of a rank's query
rows read the gathered set, the executor returns zeros that do not depend on it, autograd never
reaches that rank's all-gather node and the rank skips the all-reduce the others wait in: a
hang. The packed row below puts that in place under the zigzag sharding (T = 32, blocks of 4):

    tokens  0-3  4-7   8 ........ 23   24-27 28-31
    doc      0    1         2            3     4

Documents 0, 1, 3 and 4 are one block long (shorter than the window and than a segment), so
their queries read no random_global global token, no hierarchical unit and no memory slot;
document 2 (16 tokens) reads all of them. cp = 2: rank 0 holds tokens 0-7 and 24-31 (only short
documents), rank 1 holds 8-23. cp = 4: ranks 0 and 1 hold short documents only, ranks 2 and 3
hold document 2. Those ranks' rows also read nothing of another rank's keys through the ring or
query shipping (whose autograd nodes must run anyway).

One spawn of 4 ranks runs every check; the cp = 2 checks run on a 2-rank subgroup while ranks
2 and 3 wait. A short collective timeout turns a hang into a failure within TIMEOUT seconds.
"""
import datetime

import torch
import torch.distributed as dist

from dcwdist.attention import AttentionConfig, AttnContext, build_attention
from dcwdist.attention.executor import attend_layout
from dcwdist.attention.windows import random_window_layout
from tests.cp_helpers import gather_full, spawn

TIMEOUT = 20.0  # seconds; every check here takes well under a second per rank
H, HKV, D, BLK, T = 4, 2, 8, 4, 32
DOC = torch.tensor([[0] * 4 + [1] * 4 + [2] * 16 + [3] * 4 + [4] * 4])
CFGS = {
    "random_global": dict(kind="random_global", window=5, num_global=2, random_blocks=1,
                          random_seed=3),
    "hierarchical": dict(kind="hierarchical", segment_size=8, segment_pool=2, hier_levels=2,
                         hier_factor=2, hier_near=1),
    "mem_mean": dict(kind="compressed_memory", segment_size=8, segment_pool=2, memory_slots=4,
                     memory_budget=6),
    "mem_learned": dict(kind="compressed_memory", segment_size=8, segment_pool=2,
                        memory_slots=4, memory_budget=6, compressor="learned"),
}
TOL = dict(rtol=1e-5, atol=1e-6)  # fp64 inputs; the ring merges partials in fp32


def _cp_group(rank, world, group, cp):
    """`cp` ranks of the spawned group (a subgroup made on every rank), or None off it."""
    if cp == world:
        return group
    sub = dist.new_group(list(range(cp)), timeout=datetime.timedelta(seconds=TIMEOUT))
    return sub if rank < cp else None


def _qkv(seed=11):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(1, T, n, D, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = mk(H), mk(HKV), mk(HKV)
    g_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    return q, k, v, g_out


def _local_reads(layout, shard) -> int:
    """Entries of this rank's query rows in a global layout (0: its rows read nothing)."""
    from dcwdist.parallel.dcw_cp import select_rows
    return select_rows(layout, shard).nnz


def check_kind(rank, world, group, name, cp):
    """Output, dq / dk / dv and parameter gradients of the shard equal one process, with the
    ranks of short documents reading none of the gathered units."""
    from dcwdist.parallel.zigzag import CPShard, shard_tensor
    grp = _cp_group(rank, world, group, cp)
    if grp is None:
        return
    cfg = AttentionConfig(block_size=BLK, chunk_size=16, **CFGS[name])
    torch.manual_seed(0)
    mod = build_attention(cfg, 1, H, HKV, D, n_layers=2).double()
    q, k, v, g_out = _qkv()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    params = list(mod.parameters())
    ref = mod(*leaves, AttnContext(doc_ids=DOC, positions=torch.zeros_like(DOC)))
    ref_grads = torch.autograd.grad((ref * g_out).sum(), leaves + params)

    shard = CPShard(grp, cp, rank, T, DOC, torch.zeros_like(DOC))
    doc_l = shard_tensor(DOC, cp, rank)
    ctx = AttnContext(doc_ids=doc_l, positions=torch.zeros_like(doc_l), group=grp,
                      cache={"cp_shard": shard})
    loc = [shard_tensor(x, cp, rank).requires_grad_() for x in (q, k, v)]
    out = mod(*loc, ctx)
    # the hang condition holds: the short-document ranks' rows read no gathered unit
    if name == "random_global":
        plan = mod.plan(cfg, DOC, BLK, 1, mod.window)
        reads = [_local_reads(lay, shard) for hg in plan for lay, _ in hg.compact]
    else:
        reads = [_local_reads(s.layout, shard) for s in mod.plan(cfg, ctx, DOC).sets]
    short = rank < cp // 2
    assert all(n == 0 for n in reads) if short else any(n > 0 for n in reads), (cp, rank, reads)
    grads = torch.autograd.grad((out * shard_tensor(g_out, cp, rank)).sum(), loc + params,
                                allow_unused=True)  # completes on every rank
    torch.testing.assert_close(gather_full(out.detach(), grp), ref.detach(), **TOL,
                               msg=lambda m: f"{name} cp={cp} out: {m}")
    for n, got, want in zip("qkv", grads[:3], ref_grads[:3]):
        torch.testing.assert_close(gather_full(got, grp), want, **TOL,
                                   msg=lambda m: f"{name} cp={cp} d{n}: {m}")
    for p, got, want in zip(params, grads[3:], ref_grads[3:]):
        total = torch.zeros_like(p) if got is None else got.clone()
        dist.all_reduce(total, group=grp)
        torch.testing.assert_close(total, want, **TOL, msg=lambda m: f"{name} cp={cp}: {m}")


def check_qship(rank, world, group, cp):
    """Query shipping where some ranks ship and serve no row: its all_to_all backward still
    runs on every rank (the _QShip node is always on the output's graph)."""
    from dcwdist.parallel.qship import qship_attention, qship_plan
    from dcwdist.parallel.zigzag import CPShard, shard_tensor
    grp = _cp_group(rank, world, group, cp)
    if grp is None:
        return
    lay = random_window_layout(DOC, BLK, 5, 0, 0, 0, 0)  # windows only: reads stay near
    q, k, v, g_out = _qkv(5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref, _ = attend_layout(*leaves, lay)
    ref_grads = torch.autograd.grad((ref * g_out).sum(), leaves)
    shard = CPShard(grp, cp, rank, T, DOC, torch.zeros_like(DOC))
    plan = qship_plan([lay], shard.sharding, rank)
    if rank < cp // 2:  # short documents: nothing shipped either way
        assert sum(plan.send_splits) == sum(plan.recv_splits) == 0, (cp, rank)
    loc = [shard_tensor(x, cp, rank).requires_grad_() for x in (q, k, v)]
    out, _ = qship_attention(*loc, plan, shard)
    grads = torch.autograd.grad((out * shard_tensor(g_out, cp, rank)).sum(), loc)
    torch.testing.assert_close(gather_full(out.detach(), grp), ref.detach(), **TOL)
    for n, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(gather_full(got, grp), want, **TOL,
                                   msg=lambda m: f"qship cp={cp} d{n}: {m}")


def test_gathered_sets_backward_runs_on_every_rank_cp2_cp4():
    spawn(4, [(check_kind, (name, cp)) for cp in (2, 4) for name in CFGS]
          + [(check_qship, (cp,)) for cp in (2, 4)], timeout=TIMEOUT)
