"""Bytes sent per rank per attention layer under context parallelism: dense ring vs DCW, whose
core/window keys go around the ring or ship the queries (parallel.cp_core; auto's pick shown).

    python benchmarks/cp_comm.py [--heads 32] [--out benchmarks/results/cp_comm.jsonl]

One JSON line per (sequence length, cp degree, kind). The numbers come from the implementation's
own shapes and functions: zigzag shards of T / P tokens; the ring's K/V (input dtype) and dK/dV
(fp32) hops (ring.ring_bytes); query shipping's per-rank-pair block counts from the plan's
global layouts (qship.block_hits / ship_counts / core_bytes, the same calls the runtime choice
makes); and for DCW the all-gather send lists that dcwdist.parallel.dcw_cp routes (its
compact_routes / gather_sizes on the plan's strided-key and core-block sets). The byte
conventions are those of dcwdist.parallel.comm; tests/test_cp_comm.py and tests/test_cp_qship.py
check this model against the bytes counted in real multi-process runs.

dcw rows: "cp_core" is auto's pick and fwd/bwd/total_bytes and "breakdown" are that path's;
"core" has both paths' fwd/bwd/total bytes (qship: the busiest rank, plus the mean over ranks).
qship's bytes differ between ranks (the ring's do not); auto compares the busiest rank's.

Workload: one document per row, B = 1, 32 query heads, Hkv = 8, head dim 128, bf16, block 64,
stride 8, pool 4, tiers cycling 2 core / 3 buffer / 5 background per 10 blocks (the contract's
20/30/50 ratios).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import TIER_BACKGROUND, TIER_BUFFER, TIER_CORE
from dcwdist.attention.dcw import build_dcw_plan
from dcwdist.parallel.balance import Sharding, zigzag_sharding
from dcwdist.parallel.dcw_cp import compact_routes, gather_sizes
from dcwdist.parallel.qship import block_hits, choose_core, core_bytes, ship_counts
from dcwdist.parallel.ring import ring_bytes  # noqa: F401  (dense CP's model; tests use it here)


def _ar(nbytes: int, P: int) -> int:
    return 2 * (P - 1) * nbytes // P


def dcw_bytes(cfg: AttentionConfig, doc_BT, tiers_BN, P: int, n_heads: int, n_kv: int,
              head_dim: int, elem: int, plan=None, core: str = "auto",
              rank: Optional[int] = None, sharding: Optional[Sharding] = None) -> dict:
    """{"breakdown": bytes `rank` sends per DCW layer by CommCounter label (None: qship's busiest
    rank), "cp_core": the path `core` resolves to, "core": both paths' fwd / bwd / total bytes
    (qship: the busiest rank's, which auto compares, and the mean over ranks)}."""
    B, T = doc_BT.shape
    blk = cfg.block_size
    plan = build_dcw_plan(cfg, doc_BT, tiers_BN) if plan is None else plan
    sh = zigzag_sharding(T, P) if sharding is None else sharding
    counts = ship_counts(block_hits([plan.local, plan.buffer], sh), sh, blk)
    ring, qship = core_bytes(counts, B, T, blk, n_heads, n_kv, head_dim, elem)
    totals = [sum(b.values()) for b in qship]
    busiest = max(range(P), key=totals.__getitem__)
    r = busiest if rank is None else rank
    choice = choose_core(core, ring, qship)
    side = lambda b: {"fwd": sum(v for k, v in b.items() if k.endswith("_fwd")),  # noqa: E731
                      "bwd": sum(v for k, v in b.items() if k.endswith("_bwd")),
                      "total": sum(b.values())}
    out = dict(ring if choice == "ring" else qship[r])
    M = gather_sizes(compact_routes(sh, blk, plan.strided_idx, plan.strided.k_doc >= 0,
                                    plan.core_idx, plan.core_valid), P)
    unit = {"strided": 2 * n_kv * head_dim,
            "summary": (blk // cfg.summary_pool) * 2 * n_kv * head_dim}
    for name in ("strided", "summary"):
        send = B * M[name] * unit[name] * elem
        out[f"{name}_fwd"] = (P - 1) * send
        out[f"{name}_bwd"] = _ar(P * send, P)
    return {"breakdown": out, "cp_core": choice,
            "core": {"ring": side(ring),
                     "qship": {**side(qship[busiest]), "mean_total": sum(totals) // P}}}


def synthetic_tiers(T: int, blk: int) -> torch.Tensor:
    C, F, G = TIER_CORE, TIER_BUFFER, TIER_BACKGROUND
    cycle = torch.tensor([C, F, G, F, G, C, F, G, G, G])
    return cycle.repeat(-(-T // blk // 10) + 1)[None, :T // blk]


def cases(lengths, degrees, n_heads=32, n_kv=8, head_dim=128, elem=2):
    cfg = AttentionConfig(kind="dcw", block_size=64)
    for T in lengths:
        doc = torch.zeros(1, T, dtype=torch.long)
        tiers = synthetic_tiers(T, cfg.block_size)
        plan = build_dcw_plan(cfg, doc, tiers)
        for P in degrees:
            for kind in ("dense", "dcw"):
                row = {"seq_len": T, "cp": P, "kind": kind, "n_heads": n_heads,
                       "n_kv_heads": n_kv, "head_dim": head_dim, "dtype_bytes": elem}
                if kind == "dense":
                    b = ring_bytes(1, T, P, n_kv, head_dim, elem)
                else:
                    d = dcw_bytes(cfg, doc, tiers, P, n_heads, n_kv, head_dim, elem, plan)
                    b = d["breakdown"]
                    row.update(cp_core=d["cp_core"], core=d["core"])
                fwd = sum(v for k, v in b.items() if k.endswith("_fwd"))
                row.update(fwd_bytes=fwd, bwd_bytes=sum(b.values()) - fwd,
                           total_bytes=sum(b.values()), breakdown=b)
                yield row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072,1048576")
    ap.add_argument("--cp", default="2,4,8,16,32,64")
    ap.add_argument("--heads", type=int, default=32, help="query heads (Hkv = 8)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    degrees = [int(x) for x in args.cp.split(",")]
    sink = open(args.out, "w") if args.out else None
    for row in cases(lengths, degrees, n_heads=args.heads):
        line = json.dumps(row)
        print(line)
        if sink:
            sink.write(line + "\n")
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
