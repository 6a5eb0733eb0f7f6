"""Per-rank attention work under context parallelism on packed rows: zigzag vs cp_balance="doc".

    python benchmarks/cp_balance.py [--blocks 64,128,256] [--cp 2,4] [--trials 4] [--block 64]

Rows (one per trial, B = 1): documents with log-normal token lengths (median --median blocks,
sigma --sigma: long-tailed), packed as data_pipelines/packing does for block kinds (every
document starts at a block boundary, the previous one padded), until the row is full.

Per (row blocks, cp, kind, scheme), over the trials:
  pairs  per-rank allowed query-key pairs: the FLOPs counter's layout_pairs over the kind's
         global layouts, restricted to each rank's query tokens (x 4 * head_dim = FLOPs)
  tiles  per-rank executor work: nnz x tile size of the rank's own CP layouts (ring steps,
         compact sets), what a block-sparse kernel visits
  spread max / min - 1 over ranks (the brief's "within 10%" is spread <= 0.10)
  eff    mean / max: speed relative to perfect balance (the slowest rank sets the step)
Kinds: dense; dcw/prefix and dcw/causal (tiers from the segmentation tier rules on random
scores; prefix roles mark an instruction and an answer block in documents of >= 4 blocks; the
"doc" scheme is the one `rebalance` picks after the scorer); caa (its pair counts depend on the
document lengths only: random pooled scores). Attention settings are AttentionConfig defaults.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from dcwdist.attention.caa import caa_local_layouts
from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import ROLE_ANSWER, ROLE_DOCUMENT, ROLE_INSTRUCTION, ROLE_PAD
from dcwdist.attention.dcw import build_dcw_plan
from dcwdist.attention.layouts import doc_position, local_layout, topk_layout
from dcwdist.parallel.balance import load_spread, make_sharding, rank_pairs, zigzag_sharding
from dcwdist.parallel.dcw_cp import select_rows, split_by_source
from dcwdist.parallel.ring import dense_step_layouts
from dcwdist.parallel.zigzag import CPShard
from dcwdist.segmentation.tiers import block_info, causal_tiers, prefix_tiers

KINDS = ("dense", "dcw/prefix", "dcw/causal", "caa")


def packed_row(num_blocks: int, blk: int, g: torch.Generator, median: float = 6.0,
               sigma: float = 1.2) -> torch.Tensor:
    """[1, num_blocks * blk] doc ids of one packed row (-1 padding)."""
    T = num_blocks * blk
    doc = torch.full((T,), -1, dtype=torch.long)
    t = d = 0
    while t < T:
        n = int(math.exp(math.log(median * blk) + sigma * float(torch.randn(1, generator=g))))
        n = max(1, min(n, T - t))
        doc[t:t + n] = d
        t, d = t + -(-n // blk) * blk, d + 1
    return doc[None]


def roles_for(doc_BT: torch.Tensor, blk: int) -> torch.Tensor:
    """Instruction tokens open and answer tokens close every document of >= 4 blocks."""
    roles = torch.where(doc_BT >= 0, ROLE_DOCUMENT, ROLE_PAD)
    for d in doc_BT[0].unique().tolist():
        idx = (doc_BT[0] == d).nonzero().squeeze(1)
        if d >= 0 and idx.numel() >= 4 * blk:
            roles[0, idx[:blk // 2]] = ROLE_INSTRUCTION
            roles[0, idx[-(blk // 2):]] = ROLE_ANSWER
    return roles


def kind_case(kind: str, doc: torch.Tensor, blk: int, g: torch.Generator, n_kv: int = 2):
    """(attention config, tiers or None, global layouts, rank-local layouts builder)."""
    base, _, mode = kind.partition("/")
    cfg = AttentionConfig(kind=base, block_size=blk)
    NB = doc.shape[1] // blk
    if base == "dense":
        lays = [local_layout(doc, blk)]
        return cfg, None, lays, lambda sh: [(lay, blk * blk) for step in dense_step_layouts(
            sh, blk) for lay in step]
    if base == "caa":
        local, k = caa_local_layouts(cfg, doc)
        glob = topk_layout(doc, blk, torch.rand(1, n_kv, NB, NB, generator=g), k)
        return cfg, None, local + [glob], lambda sh: [
            (lay, blk * blk) for full in local + [glob] for lay in split_by_source(full, sh)]
    scores = torch.rand(1, NB, generator=g)
    roles = roles_for(doc, blk) if mode == "prefix" else None
    info = block_info(doc, roles, blk)
    tiers = (prefix_tiers(scores, info, 0.2, 0.3) if mode == "prefix" else
             causal_tiers(scores, info, 0.2, 0.3, 0.5, 0.2, 1.0))
    plan = build_dcw_plan(cfg, doc, tiers)
    return cfg, tiers, [plan.local, plan.buffer, plan.strided, plan.summary], lambda sh: (
        [(lay, blk * blk) for full in (plan.local, plan.buffer)
         for lay in split_by_source(full, sh)]
        + [(select_rows(plan.strided, sh), blk * blk), (select_rows(plan.summary, sh), blk * plan.summary.k_block)])


def rank_tiles(local_layouts, doc: torch.Tensor, sharding) -> torch.Tensor:
    P, T = sharding.size, doc.shape[1]
    out = []
    for r in range(P):
        shard = CPShard(None, P, r, T, doc, doc_position(doc), sharding=sharding)
        out.append(sum(lay.nnz * tile for lay, tile in local_layouts(shard)))
    return torch.tensor(out, dtype=torch.float64)


def measure(num_blocks: int, P: int, kind: str, trials: int, blk: int, seed: int = 0,
            median: float = 6.0, sigma: float = 1.2) -> dict:
    """Per-scheme lists of pairs/tiles spread and efficiency over `trials` packed rows."""
    g = torch.Generator().manual_seed(seed)
    res: dict = {}
    for _ in range(trials):
        doc = packed_row(num_blocks, blk, g, median, sigma)
        cfg, tiers, lays, local = kind_case(kind, doc, blk, g)
        for scheme in ("zigzag", "doc"):
            sh = (zigzag_sharding(doc.shape[1], P) if scheme == "zigzag"
                  else make_sharding(doc, P, "doc", cfg, tiers))
            for what, loads in (("pairs", rank_pairs(lays, sh).double()),
                                ("tiles", rank_tiles(local, doc, sh))):
                r = res.setdefault(f"{scheme}_{what}", {"spread": [], "eff": []})
                r["spread"].append(load_spread(loads))
                r["eff"].append(float(loads.mean() / loads.max()))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="64,128,256")
    ap.add_argument("--cp", default="2,4")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--block", type=int, default=64, help="attention block size")
    ap.add_argument("--median", type=float, default=6.0, help="median document length, blocks")
    ap.add_argument("--sigma", type=float, default=1.2, help="log-normal sigma of lengths")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    sink = open(args.out, "w") if args.out else None
    for nb in (int(x) for x in args.blocks.split(",")):
        for P in (int(x) for x in args.cp.split(",")):
            for kind in args.kinds.split(","):
                res = measure(nb, P, kind, args.trials, args.block, median=args.median,
                              sigma=args.sigma)
                row = {"blocks": nb, "block_size": args.block, "cp": P, "kind": kind,
                       "trials": args.trials}
                for key, v in res.items():
                    row[f"{key}_spread_max"] = round(max(v["spread"]), 4)
                    row[f"{key}_spread_mean"] = round(sum(v["spread"]) / len(v["spread"]), 4)
                    row[f"{key}_eff_min"] = round(min(v["eff"]), 4)
                line = json.dumps(row)
                print(line, flush=True)
                if sink:
                    sink.write(line + "\n")
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
