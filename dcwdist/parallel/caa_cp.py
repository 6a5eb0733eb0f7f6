"""CAA attention under context parallelism, equal to the single-process pattern.

Shapes: q_BTHD [B, Tl, H, D] this rank's shard (Tl = T / P); k/v [B, Tl, Hkv, D]; pooled means
[B, NB, G, D] (G = Hkv kv-head groups); scores [B, G, NB, NB] global on every rank.

CAA (attention/caa.py) = g * local + (1 - g) * global, two separate softmaxes:
- local windows: their widths depend on the document lengths only, so every rank builds the
  same global per-width layouts from the global doc ids and splits its rows by source rank.
- global top-k: each query block's key blocks come from pooled block means. Each rank pools its
  own blocks (a block's means read that block only), all-gathers them ([B, NB/P, G, 2D] fp32:
  tiny; no gradient, the choice is discrete), puts them in global block order and computes the
  same scores and the same top-k layout (groups = G) as one process; its rows split by source.
- both softmaxes share one trip of K/V around the ring (ring_attention_multi): bytes are those
  of dense CP plus the means' all-gather, (P - 1) * B * (NB/P) * G * 2D * 4 per layer.
- the gate reads each token's own values: local.
"""
from __future__ import annotations

import torch

from dcwdist.attention.caa import caa_local_layouts
from dcwdist.attention.layouts import topk_layout
from dcwdist.attention.topk import pooled_block_means, scores_from_means
from dcwdist.parallel.comm import all_gather
from dcwdist.parallel.dcw_cp import split_by_source
from dcwdist.parallel.ring import ring_attention_multi
from dcwdist.parallel.zigzag import CPShard


def caa_cp_local_steps(cfg, ctx):
    """(ring steps of the per-width window layouts, global k [B, NQ]), cached for every layer."""
    shard: CPShard = ctx.cache["cp_shard"]
    key = ("cp_caa_local", cfg.block_size, tuple(cfg.caa_windows), cfg.caa_c)
    hit = ctx.cache.get(key)
    if hit is None or hit[0] is not shard.sharding:
        local, k = caa_local_layouts(cfg, shard.doc_ids)
        per_width = [split_by_source(lay, shard) for lay in local]
        steps = [[w[s] for w in per_width] for s in range(shard.size)]
        hit = ctx.cache[key] = (shard.sharding, steps, k)
    return hit[1], hit[2]


def global_block_scores(q_BTHD, k_BTKD, shard: CPShard, doc_local_BT, blk: int) -> torch.Tensor:
    """[B, G, NB, NB] the single-process pooled scores, from all-gathered per-rank means."""
    G = k_BTKD.shape[2]
    q_m, k_m = pooled_block_means(q_BTHD, k_BTKD, doc_local_BT, blk, G)  # [B, NBl, G, D]
    # detached: the scores only pick blocks (no gradient), so the all-gather is no autograd
    # node whose backward collective some ranks could skip
    parts = all_gather(torch.cat([q_m, k_m], -1).detach(), shard.group, shard.counter,
                       "caa_means")
    P, B, NBl = parts.shape[:3]
    owner_blocks = torch.cat([shard.index(r)[::blk] // blk for r in range(P)])  # [NB]
    means = torch.empty_like(parts.transpose(0, 1).reshape(B, P * NBl, *parts.shape[3:]))
    means[:, owner_blocks] = parts.transpose(0, 1).reshape(B, P * NBl, *parts.shape[3:])
    D = q_m.shape[-1]
    return scores_from_means(means[..., :D], means[..., D:])


def caa_cp_attention(module, q_BTHD, k_BTKD, v_BTKD, ctx) -> torch.Tensor:
    """CAAAttention.forward for this rank's shard (ctx.group set)."""
    cfg, shard = module.cfg, ctx.cache["cp_shard"]
    blk = cfg.block_size
    local_steps, k = caa_cp_local_steps(cfg, ctx)
    scores = global_block_scores(q_BTHD, k_BTKD, shard, ctx.doc_ids, blk)
    glob = topk_layout(shard.doc_ids, blk, scores, k)
    ctx.cache[("caa_global", module.layer_idx)] = glob  # global layout: what the layer computes
    (local, _), (glob_out, _) = ring_attention_multi(
        q_BTHD, k_BTKD, v_BTKD, [local_steps, [[s] for s in split_by_source(glob, shard)]],
        shard, None, cfg.impl, cfg.chunk_size)
    g = module.gate_values(v_BTKD)
    return (g * local + (1 - g) * glob_out).to(q_BTHD.dtype)
