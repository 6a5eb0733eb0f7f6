"""Window-family kinds (attention/windows.py) under context parallelism, equal to one process.

Shapes: q_BTHD [B, Tl, H, D] this rank's shard (Tl = T / P); k/v [B, Tl, Hkv, D]. Which tokens a
rank holds is shard.sharding (zigzag or the doc-balanced deal); other ranks' tokens are reached
only through split_by_source / select_rows / shard.owner, so any sharding whose unit the layout
block divides works.

Every rank builds the same global plan from the global doc ids (the random draw depends only on
(random_seed, layer, block index within the document), never on the rank), then per head group:

| part                               | how                                  | bytes sent / rank / layer (fwd) |
|------------------------------------|--------------------------------------|---------------------------------|
| windows, S² groups, random blocks  | K/V of the group's heads around the  | (P-1) * 2 * Tl * Hkv * D * b    |
|   (layouts over the full sequence) | ring (ring.py), the global layouts   |   summed over head groups       |
|                                    | split by source rank                 | bwd: again + dK/dV in fp32      |
| random_global's global tokens      | all-gather of each rank's global K/V | (P-1) * 2 * M_g * Hkv * D * b   |
|   (compact set, MODE_FAR)          | slots (gather_slots)                 |   M_g = max global slots a rank |
|                                    |                                      | bwd: all-reduce of the gathered |
|                                    |                                      |   (on every rank: see below)    |

The ring moves every K/V block even where a window only needs a halo from the preceding chunk:
simple and exact, with the ring's compute skipping empty steps; a halo exchange (window tokens
instead of Tl) is the cheaper follow-up for pure window kinds. Head groups (multi_window, s2attn)
each run their own ring over their slice of kv heads: the same bytes in total, one ring latency
per group. Layouts are built globally (int tensors, O(T / blk) rows) and cached per forward.
The gathered global tokens are tied into the output with zero weight (comm.keep_in_graph), so
the backward all-reduce runs on every rank even where no query row reads them (a rank holding
only documents shorter than the window would otherwise skip it and hang the others).
"""
from __future__ import annotations

import torch

from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.parallel.comm import keep_in_graph
from dcwdist.parallel.dcw_cp import gather_slots, select_rows, split_by_source
from dcwdist.parallel.ring import ring_attention
from dcwdist.parallel.zigzag import CPShard


def cp_plan(plan: list, shard: CPShard) -> list:
    """Per head group: (ring step layouts [P][n], [(this rank's rows of a compact layout, its
    gather_slots route)])."""
    out = []
    for hg in plan:
        per_layout = [split_by_source(lay, shard) for lay in hg.seq]
        steps = [[split[s] for split in per_layout] for s in range(shard.size)]
        compact = []
        for lay, idx in hg.compact:
            owner, local = shard.owner(idx)
            compact.append((select_rows(lay, shard), (local, owner, lay.k_doc >= 0)))
        out.append((steps, compact))
    return out


def _run_group_cp(cfg, group_plan, q, k, v, shard: CPShard):
    steps, compact = group_plan
    parts = [ring_attention(q, k, v, steps, shard, None, cfg.impl, cfg.chunk_size)]
    gathered = []
    for lay, route in compact:
        kv = gather_slots(torch.stack([k, v], 2), *route, shard, "window_global")
        gathered.append(kv)
        parts.append(attend_layout(q, kv[:, :, 0], kv[:, :, 1], lay, None, cfg.impl,
                                   cfg.chunk_size))
    if len(parts) == 1:
        return parts[0][0]
    # every rank runs the gathers' backward all-reduce, even if none of its rows read the
    # global tokens (e.g. all its documents are shorter than the window)
    return keep_in_graph(merge_partials(parts)[0], *gathered)


def windows_cp_attention(module, q_BTHD, k_BTKD, v_BTKD, ctx) -> torch.Tensor:
    """A window-family module's forward on this rank's shard (ctx.group set)."""
    from dcwdist.attention.windows import cp_block

    cfg, shard = module.cfg, ctx.cache["cp_shard"]
    blk = cp_block(cfg, shard.unit)
    key = ("windows_cp",) + module.plan_key() + (blk,)
    hit = ctx.cache.get(key)
    if hit is None or hit[0] is not shard.sharding:  # built for this sharding (rank's tokens)
        plan = module.plan(cfg, shard.doc_ids, blk, module.layer_idx, module.window)
        hit = ctx.cache[key] = (shard.sharding, cp_plan(plan, shard))
    return module.run_heads(hit[1], q_BTHD, k_BTKD, v_BTKD,
                            lambda gp, *x: _run_group_cp(cfg, gp, *x, shard))
