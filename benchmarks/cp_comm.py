"""Bytes sent per rank per attention layer under context parallelism: dense ring vs DCW.

    python benchmarks/cp_comm.py [--out benchmarks/results/cp_comm.jsonl]

One JSON line per (sequence length, cp degree, kind). The numbers come from the implementation's
own shapes: zigzag shards of T / P tokens, the ring's K/V (input dtype) and dK/dV (fp32) hops,
and for DCW the all-gather send lists that dcwdist.parallel.dcw_cp routes (its compact_routes /
gather_sizes on the plan builders' strided-key and core-block sets). The byte conventions are
those of dcwdist.parallel.comm (ring all-gather / all-reduce); tests/test_cp_comm.py checks this
model against the bytes counted in a real multi-process run.

Workload: one document per row, B = 1, Hkv = 8, head dim 128, bf16, block 64, stride 8, pool 4,
tiers cycling 2 core / 3 buffer / 5 background per 10 blocks (the contract's 20/30/50 ratios).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import TIER_BACKGROUND, TIER_BUFFER, TIER_CORE
from dcwdist.attention.layouts import compact_far_layout, doc_position, pad_doc, summary_layout
from dcwdist.parallel.balance import zigzag_sharding
from dcwdist.parallel.dcw_cp import compact_routes, gather_sizes


def _ar(nbytes: int, P: int) -> int:
    return 2 * (P - 1) * nbytes // P


def ring_bytes(B: int, T: int, P: int, n_kv: int, head_dim: int, elem: int) -> dict:
    """dense CP (and DCW's core/window part): K/V around the ring, dK/dV back in fp32."""
    kv = 2 * B * (T // P) * n_kv * head_dim
    return {"ring_kv_fwd": (P - 1) * kv * elem, "ring_kv_bwd": (P - 1) * kv * elem,
            "ring_dkv_bwd": P * kv * 4}


def dcw_compact_sets(cfg: AttentionConfig, doc_BT: torch.Tensor, tiers_BN: torch.Tensor):
    """The plan's strided-key and core-block slots (same builders as build_dcw_plan)."""
    blk = cfg.block_size
    sel = doc_position(pad_doc(doc_BT, blk)) % cfg.stride == 0
    strided, strided_idx = compact_far_layout(doc_BT, blk, sel, tiers_BN == TIER_BUFFER,
                                              cfg.buffer_window)
    _, core_idx, core_valid = summary_layout(doc_BT, blk, tiers_BN == TIER_CORE,
                                             tiers_BN != TIER_CORE, cfg.summary_pool)
    return strided_idx, strided.k_doc >= 0, core_idx, core_valid


def dcw_bytes(cfg: AttentionConfig, doc_BT, tiers_BN, P: int, n_kv: int, head_dim: int,
              elem: int, sets=None) -> dict:
    B, T = doc_BT.shape
    sets = dcw_compact_sets(cfg, doc_BT, tiers_BN) if sets is None else sets
    M = gather_sizes(compact_routes(zigzag_sharding(T, P), cfg.block_size, *sets), P)
    unit = {"strided": 2 * n_kv * head_dim,
            "summary": (cfg.block_size // cfg.summary_pool) * 2 * n_kv * head_dim}
    out = ring_bytes(B, T, P, n_kv, head_dim, elem)
    for name in ("strided", "summary"):
        send = B * M[name] * unit[name] * elem
        out[f"{name}_fwd"] = (P - 1) * send
        out[f"{name}_bwd"] = _ar(P * send, P)
    return out


def synthetic_tiers(T: int, blk: int) -> torch.Tensor:
    C, F, G = TIER_CORE, TIER_BUFFER, TIER_BACKGROUND
    cycle = torch.tensor([C, F, G, F, G, C, F, G, G, G])
    return cycle.repeat(-(-T // blk // 10) + 1)[None, :T // blk]


def cases(lengths, degrees, n_kv=8, head_dim=128, elem=2):
    cfg = AttentionConfig(kind="dcw", block_size=64)
    for T in lengths:
        doc = torch.zeros(1, T, dtype=torch.long)
        tiers = synthetic_tiers(T, cfg.block_size)
        sets = dcw_compact_sets(cfg, doc, tiers)
        for P in degrees:
            for kind in ("dense", "dcw"):
                b = (ring_bytes(1, T, P, n_kv, head_dim, elem) if kind == "dense" else
                     dcw_bytes(cfg, doc, tiers, P, n_kv, head_dim, elem, sets))
                fwd = sum(v for k, v in b.items() if k.endswith("_fwd"))
                yield {"seq_len": T, "cp": P, "kind": kind, "n_kv_heads": n_kv,
                       "head_dim": head_dim, "dtype_bytes": elem, "fwd_bytes": fwd,
                       "bwd_bytes": sum(b.values()) - fwd, "total_bytes": sum(b.values()),
                       "breakdown": b}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072,1048576")
    ap.add_argument("--cp", default="2,4,8,16,32,64")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    degrees = [int(x) for x in args.cp.split(",")]
    sink = open(args.out, "w") if args.out else None
    for row in cases(lengths, degrees):
        line = json.dumps(row)
        print(line)
        if sink:
            sink.write(line + "\n")
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
