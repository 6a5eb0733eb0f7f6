"""hierarchical / compressed_memory attention under context parallelism, equal to one process.

Shapes: q_BTHD [B, Tl, H, D] this rank's shard (Tl = T / P; zigzag or any balance.Sharding);
k/v [B, Tl, Hkv, D]; pooled partials [B, R, C, Hkv, 2D] (R runs on this rank, C slots per unit).

Every rank builds the same global MemoryPlan from the global doc ids (memory.py), then:
- own segment: the global local layout split by source rank (`split_by_source`) and run with
  `ring_attention`. Segments are short, so most steps read nothing, but ring_attention still
  passes the whole local K/V around: (P-1) * 2 * Tl * Hkv * D * b bytes / rank / layer forward
  (backward: again plus the fp32 dK/dV ring), as dense CP. A halo exchange (at most S - blk
  tokens from the rank holding the preceding chunk) would cut this; not implemented.
- pooled units: a unit (or a learned-memory segment) may straddle shards, so each rank pools
  the *runs* it holds (a unit's globally consecutive tokens on this rank) with `pool_units`,
  giving a partial (avg, lse); `gather_slots` all-gathers every run to every rank, and the
  partials of a unit merge by LSE into exactly the single-process unit. Bytes / rank / layer
  per pooled set: (P-1) * B * R_max * C * Hkv * 2D * b, R_max = the most runs one rank holds
  in a row ~ U / P + the runs cut by shard edges (U units; for hierarchical level l
  U ~ T / p_l, for compressed_memory U * C = T * M / S). Mean pooling's
  lse is log(run length), known from the doc ids on every rank; the learned compressor's lse is
  gathered too (+ (P-1) * B * R_max * C * Hkv * 4 bytes, fp32). Every rank then holds the whole
  compact set and reads its own query rows of the global layout (`select_rows`).
Backward of the all-gathers is an all-reduce of the gathered gradients (comm.py). A rank whose
query rows read no pooled unit (it holds only documents' first segments) would never reach its
all-gather node in autograd and skip that all-reduce while the others wait in it, so every
gathered set is tied into the output with zero weight (comm.keep_in_graph), as in dcw_cp.py.
"""
from __future__ import annotations

import torch

from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.memory import pool_units
from dcwdist.parallel.comm import keep_in_graph
from dcwdist.parallel.dcw_cp import gather_slots, select_rows, split_by_source
from dcwdist.parallel.ring import ring_attention
from dcwdist.parallel.zigzag import CPShard

_TINY = 1e-30


def local_runs(unit_BT: torch.Tensor, shard: CPShard, rank: int):
    """Runs of `rank`'s tokens (local order): one unit, globally consecutive tokens.

    Any sharding works (zigzag chunks, the balanced block deal): a run breaks wherever the next
    local token is not the next global one. Returns (run id [B, Tl] (-1: no unit), unit of each
    run [B, R] (-1: padding), run length [B, R]); R = the most runs a row of this rank has.
    """
    idx = shard.index(rank)
    u = unit_BT[:, idx]
    B, Tl = u.shape
    new = torch.ones_like(u, dtype=torch.bool)
    new[:, 1:] = (u[:, 1:] != u[:, :-1]) | (idx[1:] != idx[:-1] + 1)[None]
    new &= u >= 0
    run = torch.where(u >= 0, torch.cumsum(new.long(), 1) - 1, -1)
    R = max(1, int(new.sum(1).max()))
    idx = torch.where(run >= 0, run, R)
    run_unit = torch.full((B, R + 1), -1, dtype=torch.long, device=u.device).scatter_reduce_(
        1, idx, torch.where(u >= 0, u, -1), "amax")[:, :R]
    run_len = torch.zeros(B, R + 1, dtype=torch.long, device=u.device).scatter_add_(
        1, idx, (u >= 0).long())[:, :R]
    return run, run_unit, run_len


def unit_routes(unit_BT: torch.Tensor, shard: CPShard) -> dict:
    """Every rank's runs as gather_slots slots: (local run, owner, valid), their unit and length,
    and this rank's run ids."""
    owner, local, unit, length = [], [], [], []
    mine = None
    for r in range(shard.size):
        run, run_unit, run_len = local_runs(unit_BT, shard, r)
        if r == shard.rank:
            mine = (run, run_unit.shape[1])
        R = run_unit.shape[1]
        owner.append(torch.full_like(run_unit, r))
        local.append(torch.arange(R, device=run_unit.device).expand_as(run_unit))
        unit.append(run_unit)
        length.append(run_len)
    unit = torch.cat(unit, 1)
    return {"slot": (torch.cat(local, 1), torch.cat(owner, 1), unit >= 0), "unit": unit,
            "length": torch.cat(length, 1), "run": mine[0], "num_runs": mine[1]}


def merge_runs(avg_BSCKE: torch.Tensor, lse_BSCK: torch.Tensor, unit_BS: torch.Tensor,
               U: int) -> torch.Tensor:
    """Partial pools of the same unit (runs, any order) merged by LSE -> [B, U, C, K, E]."""
    B, S, C, K, E = avg_BSCKE.shape
    acc = torch.promote_types(avg_BSCKE.dtype, torch.float32)
    idx = torch.where(unit_BS >= 0, unit_BS, U)
    lse = torch.where(unit_BS[:, :, None, None] >= 0, lse_BSCK.to(acc),
                      torch.full_like(lse_BSCK, float("-inf"), dtype=acc))
    idx4 = idx[:, :, None, None].expand(B, S, C, K)
    m = torch.full((B, U + 1, C, K), float("-inf"), dtype=acc, device=lse.device)
    m = m.scatter_reduce(1, idx4, lse.detach(), "amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m.gather(1, idx4))  # [B, S, C, K]; 0 for empty / invalid runs
    total = torch.zeros_like(m).scatter_add(1, idx4, w)
    out = torch.zeros(B, U + 1, C, K, E, dtype=acc, device=lse.device).scatter_add(
        1, idx4[..., None].expand(B, S, C, K, E), w[..., None] * avg_BSCKE.to(acc))
    return (out / total.clamp_min(_TINY)[..., None])[:, :U].to(avg_BSCKE.dtype)


def memory_cp_plan(module, ctx) -> dict:
    """Global plan + this rank's ring steps, selected rows and run routes, cached per forward."""
    cfg, shard = module.cfg, ctx.cache["cp_shard"]
    plan = module.plan(cfg, ctx, shard.doc_ids)
    key = ("cp_" + cfg.kind, id(plan))
    hit = ctx.cache.get(key)
    if hit is None or hit["sharding"] is not getattr(shard, "sharding", None):
        T = shard.seq_len
        hit = {"sharding": getattr(shard, "sharding", None),
               "steps": [[s] for s in split_by_source(plan.local, shard)],
               "sets": [(s, select_rows(s.layout, shard), unit_routes(s.unit_BT[:, :T], shard))
                        for s in plan.sets]}
        ctx.cache[key] = hit
    return hit


def memory_cp_attention(module, q_BTHD, k_BTKD, v_BTKD, ctx) -> torch.Tensor:
    """_SegmentMemory.forward for this rank's shard (ctx.group set)."""
    cfg, shard = module.cfg, ctx.cache["cp_shard"]
    p = memory_cp_plan(module, ctx)
    D = q_BTHD.shape[3]
    parts = [ring_attention(q_BTHD, k_BTKD, v_BTKD, p["steps"], shard, None, cfg.impl,
                            cfg.chunk_size)]
    x = torch.cat([k_BTKD, v_BTKD], -1)  # [B, Tl, Hkv, 2D]
    queries = module.queries()
    gathered = []
    for s, rows, route in p["sets"]:
        avg, lse = pool_units(x, route["run"], route["num_runs"], s.size, queries)
        avg_S = gather_slots(avg, *route["slot"], shard, s.name)
        gathered.append(avg_S)
        if queries is None:  # mean: a run's weight is its length, known on every rank
            lse_S = torch.log(route["length"].clamp_min(1).to(torch.float32))
            lse_S = lse_S[:, :, None, None].expand(avg_S.shape[:4])
        else:
            lse_S = gather_slots(lse, *route["slot"], shard, s.name + "_lse")
            gathered.append(lse_S)
        kv = merge_runs(avg_S, lse_S, route["unit"], s.num_units).flatten(1, 2)
        parts.append(attend_layout(q_BTHD, kv[..., :D], kv[..., D:], rows, None, cfg.impl,
                                   cfg.chunk_size))
    out, _ = merge_partials(parts)
    # every rank runs the gathers' backward all-reduce, even if none of its rows read a unit
    # (e.g. it holds only documents' first segments)
    return keep_in_graph(out, *gathered)
