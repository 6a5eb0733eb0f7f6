"""Attention FLOPs per kind and per DCW tier: what the layouts compute vs dense causal attention.

FLOPs of one query-key pair for one head: 4 * D (QK^T and PV, a multiply-add each). `computed`
counts the pairs the kind's layouts allow (exactly, tile by tile, as the executor masks them);
`dense` counts causal pairs within each document, the dense-equivalent for the same row.
Counts are summed over the batch for one layer; multiply by the number of layers for a step.
"""
from __future__ import annotations

import torch

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.executor import tile_allowed
from dcwdist.attention.layout import BlockLayout
from dcwdist.attention.layouts import ROW_CAUSAL, ROW_WINDOW, doc_position, local_layout, pad_doc

TIER_NAMES = ("core", "buffer", "background")


def layout_pairs(layout: BlockLayout, entries_per_chunk: int = 4096) -> torch.Tensor:
    """[B, G, Tq] int64: allowed keys of every query token under `layout` (chunked over entries)."""
    B, G, NQ, qb, kb = (layout.batch, layout.groups, layout.num_q_blocks, layout.q_block,
                        layout.k_block)
    dev = layout.indptr.device
    counts = torch.zeros(B * G, NQ * qb, dtype=torch.int64, device=dev)
    rows = torch.repeat_interleave(torch.arange(B * G * NQ, device=dev),
                                   layout.indptr[1:] - layout.indptr[:-1])
    q_pos, k_pos = layout.q_pos.view(B, NQ, qb), layout.k_pos.view(B, -1, kb)
    q_doc = None if layout.q_doc is None else layout.q_doc.view(B, NQ, qb)
    k_doc = None if layout.k_doc is None else layout.k_doc.view(B, -1, kb)
    for s in range(0, rows.numel(), entries_per_chunk):
        r = rows[s:s + entries_per_chunk]
        kv = layout.kv_block[s:s + entries_per_chunk].long()
        mode = layout.mode[s:s + entries_per_chunk].long()[:, None].expand(-1, kb)
        bound = (None if layout.entry_bound is None else
                 layout.entry_bound[s:s + entries_per_chunk].long()[:, None].expand(-1, kb))
        b, qbk = r // (G * NQ), r % NQ
        allowed = tile_allowed(layout, q_pos[b, qbk], k_pos[b, kv], mode,
                               None if q_doc is None else q_doc[b, qbk],
                               None if k_doc is None else k_doc[b, kv], bound)  # [E, qb, kb]
        cols = qbk[:, None] * qb + torch.arange(qb, device=dev)
        counts.view(-1).index_add_(0, ((r // NQ)[:, None] * NQ * qb + cols).view(-1),
                                   allowed.sum(-1).view(-1))
    return counts.view(B, G, NQ * qb)


def _head_pairs(layout: BlockLayout, n_heads: int) -> torch.Tensor:
    """[B, Tq] allowed pairs summed over query heads (head h uses group h // (H / G))."""
    return layout_pairs(layout).sum(1) * (n_heads // layout.groups)


def _kind_layouts(cfg: AttentionConfig, ctx: AttnContext) -> dict[str, list[BlockLayout]]:
    """Name -> layouts of one layer (data-dependent kinds: every layer cached by the last forward)."""
    blk, doc = cfg.block_size, ctx.doc_ids
    rows = lambda kind: torch.full_like(doc[:, ::blk], kind)  # noqa: E731
    if cfg.kind == "dense":
        return {"local": [local_layout(doc, blk, rows(ROW_CAUSAL))]}
    if cfg.kind == "window":
        return {"local": [local_layout(doc, blk, rows(ROW_WINDOW), cfg.window)]}
    if cfg.kind == "static_sparse":
        from dcwdist.attention.kinds import static_sparse_layouts
        local, glob, _ = static_sparse_layouts(cfg, ctx)
        return {"local": [local, glob]}
    if cfg.kind == "dcw":
        from dcwdist.attention.dcw import dcw_plan
        plan = dcw_plan(cfg, ctx)
        if cfg.dcw_background_windows:  # one local layout per head group: each has 1/G heads
            from dcwdist.attention.dcw import background_layouts
            return {"local": [plan.buffer, plan.strided], "cross": [plan.summary],
                    "background": background_layouts(cfg, ctx, plan)}
        return {"local": [plan.local, plan.buffer, plan.strided], "cross": [plan.summary]}
    from dcwdist.attention.kinds import ATTENTION_KINDS
    module = ATTENTION_KINDS.get(cfg.kind)
    if hasattr(module, "flop_layouts"):  # kinds in their own modules say what they compute
        return module.flop_layouts(cfg, ctx)
    names = {"block_topk": ("block_topk",), "caa": ("caa_global",)}[cfg.kind]
    per_layer = [v for k, v in ctx.cache.items() if isinstance(k, tuple) and k[0] in names]
    if not per_layer:
        raise ValueError(f"attention_flops for kind={cfg.kind} needs the layouts of a forward "
                         "pass (ctx.cache); run the model on ctx first")
    out = {"local": [], "global": per_layer}
    if cfg.kind == "caa":
        out["local"] = [lay for k, v in ctx.cache.items()
                        if isinstance(k, tuple) and k[0] == "caa_local" for lay in v[0]]
    return out


def attention_flops(cfg: AttentionConfig, ctx: AttnContext, n_heads: int, head_dim: int) -> dict:
    """FLOPs of one attention layer over ctx's batch: computed vs dense-equivalent, by tier.

    Returns {"computed", "dense", "density", "by_part": {name: flops}, "by_tier": {tier: flops}}
    where by_tier (DCW only) splits local + cross-tier FLOPs by the query token's tier. For
    block_topk / caa, whose layouts depend on each layer's q/k, the layers of the last forward
    (cached in ctx.cache) are averaged.
    """
    per_pair = 4 * head_dim
    doc = pad_doc(ctx.doc_ids, cfg.block_size)
    real = doc >= 0
    dense = float(((doc_position(doc) + 1) * real).sum()) * n_heads * per_pair
    by_part, by_token = {}, torch.zeros(doc.shape, dtype=torch.float64, device=doc.device)
    for name, layouts in _kind_layouts(cfg, ctx).items():
        if not layouts:
            continue
        # global layouts of block_topk / caa are one per layer: average them.
        # "background" (DCW multi-window): each layout covers 1/G of the heads.
        scale = 1.0 / len(layouts) if name in ("global", "background") else 1.0
        pairs = sum(_head_pairs(lay, n_heads)[:, :doc.shape[1]].double() for lay in layouts)
        by_token += pairs * scale * per_pair
        by_part[name] = float(pairs.sum()) * scale * per_pair
    computed = float(by_token.sum())
    result = {"computed": computed, "dense": dense, "density": computed / max(dense, 1.0),
              "by_part": by_part}
    if cfg.kind == "dcw":
        tier_tok = ctx.tiers.repeat_interleave(cfg.block_size, 1)[:, :doc.shape[1]]
        result["by_tier"] = {n: float(by_token[(tier_tok == t) & real].sum())
                             for t, n in enumerate(TIER_NAMES)}
    return result
