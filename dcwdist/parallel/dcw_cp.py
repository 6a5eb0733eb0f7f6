"""DCW attention under context parallelism, equal to the single-process pattern.

Shapes: q_BTHD [B, Tl, H, D] this rank's shard (Tl = T / P); k/v [B, Tl, Hkv, D]; tiers and
block scores are global [B, NB] on every rank (the scorer runs on the gathered sequence).
Which tokens a rank holds is shard.sharding (balance.py: zigzag, or whole blocks dealt by their
work with parallel.cp_balance = "doc", re-dealt by the tiers after the scorer); every lookup of
another rank's tokens goes through shard.index(rank) / shard.owner(tok), so nothing here
depends on the scheme beyond blocks dividing the sharding unit.

Every rank builds the same global DCWPlan from the global doc ids and tiers, then takes its own
query rows of each layout. What the pattern needs from other ranks, and how it gets here:

| part                        | how                                  | bytes sent / rank / layer (fwd)    |
|-----------------------------|--------------------------------------|------------------------------------|
| core prefix + windows/halos | parallel.cp_core, chosen per layer   |                                    |
|   (layouts local, buffer)   | by bytes (core_choice; qship.py):    |                                    |
|   cp_core = "ring"          | K/V around the ring (ring.py): the   | (P-1) * 2 * Tl * Hkv * D * b       |
|                             | global layouts split by source rank  | bwd: again + P * 2 * Tl*Hkv*D * 4  |
|   cp_core = "qship"         | queries shipped (qship.py): each     | sum_p n[r,p] * blk*H*D*b (Q out)   |
|                             | query block to the ranks whose keys  | + sum_p n[p,r] * blk*H*(D*b + L)   |
|                             | it reads, (O, LSE) back, merged by   |   (O + LSE back, L = max(4, b))    |
|                             | LSE; all_to_all                      | bwd: the same bytes, mirrored      |
|   cp_core = "auto"          | the fewer fwd + bwd bytes on the     | min of the two (ties: ring)        |
|                             | busiest rank (default)               |                                    |
| strided keys                | all-gather of each rank's strided    | (P-1) * 2 * M_s * Hkv * D * b      |
|                             | K/V, reordered to the plan's compact |   M_s = max strided keys on a rank |
|                             | order (read with MODE_FAR)           | bwd: all-reduce of the gathered    |
| core summaries (cross-tier) | all-gather of pooled K/V of each     | (P-1) * 2 * M_c * (B/pool) * Hkv*D*b|
|                             | rank's core blocks                   |   M_c = max core blocks on a rank  |
| block scores / tiers        | none: computed on every rank         | 0 (scorer input: see segmenter)    |

n[r, p] = query blocks of rank r that read at least one key of rank p (from the global plan: the
same on every rank, so every rank makes the same choice without communicating); the choice per
layer is in ctx.cache["cp_core"][layer_idx]. Core rows (~20% of blocks) read the whole document
prefix and so go to every rank holding earlier blocks of their document; window and buffer rows
go only to the ranks holding their halo. The ring moves all of every rank's K/V instead, and
its backward sends the fp32 dK/dV P times: with 20% core blocks, Hkv = 8, D = 128, bf16
(benchmarks/cp_comm.py) shipping sends 3-5x fewer core bytes at 32 query heads; the ring wins
from ~128 query heads (H / Hkv = 16). Halos ride with the core keys either way (the ring:
windows read whichever step holds the preceding blocks). Memory per rank: local K/V + one
in-flight K/V (ring) or the served query rows and their partials (qship) + the gathered strided
and summary sets + the plan's int layouts (built globally; qship also rebuilds the rows other
ranks send it: a later version builds only this rank's rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dcwdist.attention.dcw import (build_dcw_plan, pool_summaries, summary_sources,
                                  summary_weight_scores)
from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.layout import BlockLayout
from dcwdist.parallel.balance import Sharding
from dcwdist.parallel.comm import all_gather, keep_in_graph
from dcwdist.parallel.qship import (block_hits, choose_core, core_bytes, qship_attention,
                                    qship_plan, ship_counts)
from dcwdist.parallel.ring import ring_attention
from dcwdist.parallel.zigzag import CPShard


def local_blocks(shard: CPShard, blk: int) -> torch.Tensor:
    """Global block indices of this rank's tokens, in local order (blk divides shard.unit)."""
    return shard.index()[::blk] // blk


def _rows(layout: BlockLayout, q_blocks: torch.Tensor):
    """Entries of the rows (b, g, q_blocks) of a layout: (new row of entry, entry index, rows)."""
    BG, NQ, dev = layout.batch * layout.groups, layout.num_q_blocks, layout.indptr.device
    rows = (torch.arange(BG, device=dev)[:, None] * NQ + q_blocks[None, :]).reshape(-1)
    return *layout.row_entries(rows), rows.numel()


def _bound(layout: BlockLayout, entry: torch.Tensor, keep=None):
    """layout.entry_bound of the selected entries (then of `keep` among them), or None."""
    if layout.entry_bound is None:
        return None
    bound = layout.entry_bound[entry]
    return bound if keep is None else bound[keep]


def _q_side(layout: BlockLayout, shard: CPShard):
    idx = shard.index()
    return layout.q_pos[:, idx], None if layout.q_doc is None else layout.q_doc[:, idx]


def select_rows(layout: BlockLayout, shard: CPShard) -> BlockLayout:
    """This rank's query rows of a global layout (every head group); its key set is unchanged."""
    q_blocks = local_blocks(shard, layout.q_block)
    new_row, entry, R = _rows(layout, q_blocks)
    indptr = F.pad(torch.cumsum(torch.bincount(new_row, minlength=R), 0), (1, 0))
    q_pos, q_doc = _q_side(layout, shard)
    return BlockLayout(indptr=indptr, kv_block=layout.kv_block[entry], mode=layout.mode[entry],
                       batch=layout.batch, groups=layout.groups, num_q_blocks=q_blocks.numel(),
                       num_k_blocks=layout.num_k_blocks, q_block=layout.q_block,
                       k_block=layout.k_block, q_pos=q_pos, k_pos=layout.k_pos,
                       window=layout.window, far=layout.far, q_doc=q_doc, k_doc=layout.k_doc,
                       entry_bound=_bound(layout, entry))


def split_by_source(layout: BlockLayout, shard: CPShard) -> list[BlockLayout]:
    """A global (full sequence x full sequence) layout as ring steps: entry s holds this rank's
    rows (every head group) over the key blocks of rank (r - s) mod P, renumbered into that
    rank's local blocks. Key blocks must divide the sharding's unit (whole blocks per rank)."""
    blk, P, r = layout.k_block, shard.size, shard.rank
    if shard.unit % blk or shard.unit % layout.q_block:
        raise ValueError(f"layout blocks ({layout.q_block}, {blk}) must divide the cp "
                         f"sharding unit ({shard.unit} tokens)")
    q_blocks = local_blocks(shard, layout.q_block)
    new_row, entry, R = _rows(layout, q_blocks)
    owner, local_tok = shard.owner(layout.kv_block[entry].long() * blk)
    kv_local = local_tok // blk
    q_pos, q_doc = _q_side(layout, shard)
    steps = []
    for s in range(P):
        src = (r - s) % P
        m = owner == src
        indptr = F.pad(torch.cumsum(torch.bincount(new_row[m], minlength=R), 0), (1, 0))
        k_idx = shard.index(src)
        steps.append(BlockLayout(
            indptr=indptr, kv_block=kv_local[m].to(torch.int32), mode=layout.mode[entry][m],
            batch=layout.batch, groups=layout.groups, num_q_blocks=q_blocks.numel(),
            num_k_blocks=k_idx.numel() // blk, q_block=layout.q_block, k_block=blk,
            q_pos=q_pos, k_pos=layout.k_pos[:, k_idx], window=layout.window, far=layout.far,
            q_doc=q_doc, k_doc=None if layout.k_doc is None else layout.k_doc[:, k_idx],
            entry_bound=_bound(layout, entry, m)))
    return steps


def slot_routing(owner_BS: torch.Tensor, valid_BS: torch.Tensor, size: int):
    """For compact slots owned by ranks: each slot's index in its owner's send list, and the
    send list length M (max over ranks and rows; every rank computes the same)."""
    onehot = F.one_hot(owner_BS.clamp_min(0), size) * valid_BS[..., None]  # [B, S, P]
    within = ((onehot.cumsum(1) - onehot) * onehot).sum(-1)
    return within, max(1, int(onehot.sum(1).max()) if onehot.numel() else 1)


def gather_slots(units_BU: torch.Tensor, local_unit_BS: torch.Tensor, owner_BS: torch.Tensor,
                 valid_BS: torch.Tensor, shard: CPShard, label: str) -> torch.Tensor:
    """Compact global set [B, S, ...] from units held by their owners (differentiable).

    units_BU [B, U, ...] this rank's units; slot (b, j) is unit local_unit_BS[b, j] of rank
    owner_BS[b, j]. Each rank sends only its own slots (M per row), one all-gather.
    """
    within, M = slot_routing(owner_BS, valid_BS, shard.size)
    B, dev = units_BU.shape[0], units_BU.device
    mine = valid_BS & (owner_BS == shard.rank)
    send_idx = torch.zeros(B, M + 1, dtype=torch.long, device=dev)
    slot = torch.where(mine, within, M)  # others land in a spare column
    send_idx.scatter_(1, slot, torch.where(mine, local_unit_BS, 0))
    bi = torch.arange(B, device=dev)[:, None]
    send = units_BU[bi, send_idx[:, :M]]  # [B, M, ...]
    got = all_gather(send, shard.group, shard.counter, label)  # [P, B, M, ...]
    out = got[owner_BS.clamp_min(0), bi, within.clamp_max(M - 1)]
    return out * valid_BS.view(B, -1, *([1] * (out.dim() - 2))).to(out.dtype)


def compact_routes(sharding: Sharding, blk: int, strided_idx, strided_valid, core_idx,
                   core_valid) -> dict:
    """(local unit, owner, valid) of every strided-key slot and core-summary slot."""
    s_owner, s_local = sharding.owner(strided_idx)
    c_owner, c_local = sharding.owner(core_idx * blk)
    return {"strided": (s_local, s_owner, strided_valid),
            "summary": (c_local // blk, c_owner, core_valid)}


def gather_sizes(routes: dict, size: int) -> dict:
    """Slots each rank sends per row (M) for every compact set: what the all-gathers move."""
    return {name: slot_routing(owner, valid, size)[1]
            for name, (_, owner, valid) in routes.items()}


def dcw_cp_plan(cfg, ctx):
    """Global plan + this rank's compact-set routes, cached for every layer (the ring steps or
    the qship plan are added by core_attention when first used)."""
    shard: CPShard = ctx.cache["cp_shard"]
    key = ("cp_dcw_plan", cfg.block_size, cfg.window, cfg.buffer_window, cfg.stride,
           cfg.summary_pool)
    hit = ctx.cache.get(key)
    if hit is not None and hit["tiers"] is ctx.tiers and hit["sharding"] is shard.sharding:
        return hit
    if ctx.tiers is None:
        raise ValueError("attention.kind='dcw' needs ctx.tiers (global [B, T / block_size] "
                         "under context parallelism); got None")
    plan = build_dcw_plan(cfg, shard.doc_ids, ctx.tiers, summary_sources(ctx))
    routes = compact_routes(shard.sharding, cfg.block_size, plan.strided_idx,
                            plan.strided.k_doc >= 0, plan.core_idx, plan.core_valid)
    hit = {"tiers": ctx.tiers, "sharding": shard.sharding, "plan": plan, "choice": {},
           "strided": select_rows(plan.strided, shard), "strided_route": routes["strided"],
           "summary": select_rows(plan.summary, shard), "summary_route": routes["summary"]}
    ctx.cache[key] = hit
    return hit


def core_choice(p: dict, shard: CPShard, q_BTHD, k_BTKD) -> str:
    """"ring" or "qship" for this layer: shard.core, or for "auto" the fewer bytes by the byte
    model (qship.py) on the plan's ship counts, cached per (H, Hkv, D, element size)."""
    if shard.core != "auto":
        return choose_core(shard.core, {}, [])
    B, _, H, D = q_BTHD.shape
    key = (H, k_BTKD.shape[2], D, q_BTHD.element_size())
    if key not in p["choice"]:
        blk = p["plan"].local.q_block
        if "block_hits" not in p:  # every rank computes the same from the global layouts
            p["block_hits"] = block_hits([p["plan"].local, p["plan"].buffer], shard.sharding)
        counts = ship_counts(p["block_hits"], shard.sharding, blk)
        p["choice"][key] = choose_core("auto", *core_bytes(counts, B, shard.seq_len, blk, *key))
    return p["choice"][key]


def core_attention(p: dict, shard: CPShard, q_BTHD, k_BTKD, v_BTKD, cfg, choice: str):
    """(out, lse) of the local + buffer layouts: K/V around the ring, or queries shipped."""
    plan = p["plan"]
    if choice == "ring":
        if "steps" not in p:
            p["steps"] = [list(s) for s in zip(split_by_source(plan.local, shard),
                                               split_by_source(plan.buffer, shard))]
        return ring_attention(q_BTHD, k_BTKD, v_BTKD, p["steps"], shard, None, cfg.impl,
                              cfg.chunk_size)
    if "qship" not in p:
        p["qship"] = qship_plan([plan.local, plan.buffer], shard.sharding, shard.rank,
                                p.get("block_hits"))
    return qship_attention(q_BTHD, k_BTKD, v_BTKD, p["qship"], shard, None, cfg.impl,
                           cfg.chunk_size)


def dcw_cp_attention(module, q_BTHD, k_BTKD, v_BTKD, ctx, cfg=None) -> torch.Tensor:
    """DCWAttention.forward for this rank's shard (ctx.group set); cfg: the layer's own settings
    (per-layer background window), default module.cfg."""
    cfg, shard = cfg or module.cfg, ctx.cache["cp_shard"]
    p = dcw_cp_plan(cfg, ctx)
    blk, pool = cfg.block_size, cfg.summary_pool
    run = lambda q, k, v, lay: attend_layout(q, k, v, lay, None, cfg.impl, cfg.chunk_size)  # noqa: E731
    choice = core_choice(p, shard, q_BTHD, k_BTKD)
    ctx.cache.setdefault("cp_core", {})[module.layer_idx] = choice  # for logs and tests
    core = core_attention(p, shard, q_BTHD, k_BTKD, v_BTKD, cfg, choice)
    kv_s = gather_slots(torch.stack([k_BTKD, v_BTKD], 2), *p["strided_route"], shard, "strided")
    local, _ = merge_partials([core, run(q_BTHD, kv_s[:, :, 0], kv_s[:, :, 1], p["strided"])])
    # Pool every local block (cheap); each rank then sends the summaries of its core blocks.
    B, NBl = q_BTHD.shape[0], q_BTHD.shape[1] // blk
    all_local = torch.arange(NBl, device=q_BTHD.device).expand(B, NBl)
    per = blk // pool
    k_pool = pool_summaries(k_BTKD, ctx.doc_ids, all_local, blk, pool)
    v_pool = pool_summaries(v_BTKD, ctx.doc_ids, all_local, blk, pool)
    units = torch.stack([k_pool, v_pool], 2).unflatten(1, (NBl, per))  # [B, NBl, per, 2, K, D]
    kv_sum = gather_slots(units, *p["summary_route"], shard, "summary").flatten(1, 2)
    k_sum, v_sum = kv_sum[:, :, 0], kv_sum[:, :, 1]
    weight_scores = summary_weight_scores(ctx)
    if weight_scores is not None:
        s = weight_scores.gather(1, p["plan"].core_idx).to(v_sum.dtype)
        weight = (1 + s - s.detach()).repeat_interleave(per, 1)
        v_sum = v_sum * weight[:, :, None, None]
    cross, _ = run(q_BTHD, k_sum, v_sum, p["summary"])
    # every rank runs both gathers' backward all-reduce, even if none of its rows read the sets
    return keep_in_graph(local + module.alpha.to(local.dtype) * cross, kv_s, kv_sum)


# -- the scorer under CP ------------------------------------------------------------------------
def install_cp_segmenter(segmenter: torch.nn.Module) -> None:
    """Make `segmenter` score the whole sequence when its ctx is a CP shard (idempotent).

    The Transformer calls segmenter(h_local, tokens_local, ctx). Under CP a pre-hook swaps in
    the all-gathered embeddings and tokens and a global AttnContext sharing ctx.cache, so tiers,
    block scores, aux losses and metrics are those of the whole sequence, identical on every cp
    rank; a post-hook hands the global tiers / block scores to the local ctx. Gathering the
    [B, T, model dim] embeddings costs O(T) memory per rank (the scorer itself projects to 128
    dims first); a sharded scorer with a halo is the scalable follow-up.
    """
    if getattr(segmenter, "_cp_hooks", False):
        return
    from dcwdist.attention.context import AttnContext

    def pre(module, args):
        h, tokens, ctx = args
        if ctx.group is None:
            return None
        shard: CPShard = ctx.cache["cp_shard"]
        g = AttnContext(doc_ids=shard.doc_ids, positions=shard.positions, roles=shard.roles,
                        group=None, cache=ctx.cache)
        ctx.cache["cp_local_ctx"] = ctx
        return (shard.gather_sequence(h.detach(), "scorer_input"),
                shard.gather_sequence(tokens, "scorer_tokens"), g)

    def post(module, args, output):
        g = args[2]
        local = g.cache.pop("cp_local_ctx", None)
        if local is not None:
            local.tiers, local.block_scores = g.tiers, g.block_scores

    segmenter.register_forward_pre_hook(pre)
    segmenter.register_forward_hook(post)
    segmenter._cp_hooks = True
