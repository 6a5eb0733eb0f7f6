"""Registers and spills of the block-sparse kernels' tile configs, compiled offline (no GPU).

Each candidate config of kernels/block_sparse.py is compiled by Triton for a CUDA target
(default sm_90a) and its PTX assembled with the ptxas that ships with Triton, `-v`; one JSON line
per (kernel, head dim, block, config): registers per thread, spill stores / loads, shared memory.
A config that spills is slow on the GPU whatever the tuner says, so candidates are checked here
before they are added. Runs on any machine with the pinned triton:

    python benchmarks/kernel_registers.py --head-dims 64,128 --blocks 64,128
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _signature(kernel, consts: dict, dtype: str) -> tuple[dict, dict]:
    """Triton signature of one of our kernels: tensors are pointers (fp32 for LSE / DELTA /
    the fp32 dQ accumulator, int32 for the plan's index arrays), strides and sizes int32,
    scales fp32, constexprs as given."""
    fp32_ptrs = {"LSE", "DELTA", "DLSE", "DQACC"}
    int_ptrs = {"row_order", "col_order", "indptr", "split", "ent_blk", "ent_lo", "ent_hi",
                "q_pos", "k_pos", "q_doc", "k_doc"}
    floats = {"qk_scale", "scale"}
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in fp32_ptrs:
            sig[name] = "*fp32"
        elif name in int_ptrs:
            sig[name] = "*i32"
        elif name in floats:
            sig[name] = "fp32"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig, consts


def _ptxas(ptx: str, arch: str) -> dict:
    import triton.backends.nvidia as nv
    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    smem = re.search(r"(\d+) bytes smem", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None,
            "static_smem": int(smem.group(1)) if smem else None,
            "ptxas_ok": out.returncode == 0}


def check(kernel, consts: dict, cfg: tuple, dtype: str, capability: int, arch: str,
          heads: int = 12, kv_heads: int = 4) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    bm, bn, warps, stages = cfg
    consts = dict(consts, BLOCK_M=bm, BLOCK_N=bn)
    D = consts["HEAD_DIM"]
    # Token strides are constexpr in the kernels: [B, T, H, D] contiguous tensors.
    for name, h in (("s_qt", heads), ("s_ot", heads), ("s_dt", heads), ("s_kt", kv_heads),
                    ("s_vt", kv_heads)):
        if name in kernel.arg_names:
            consts[name] = h * D
    sig, consts = _signature(kernel, consts, dtype)
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": warps, "num_stages": stages})
    row = _ptxas(compiled.asm["ptx"], arch)
    row["shared"] = compiled.metadata.shared
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--blocks", default="64,128", help="layout block sizes (q_block = k_block)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--capability", type=int, default=90)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--kernels", default="fwd,dq,dkdv,dkdv_atomic_dq")
    ap.add_argument("--configs", default="",
                    help="check these 'BM,BN,warps,stages;...' instead of the kernels' lists")
    args = ap.parse_args(argv)
    given = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c]
    from dcwdist.kernels import _block_sparse_triton as k
    from dcwdist.kernels import block_sparse as bs
    table = {"fwd": (k._fwd_kernel, bs._FWD_CONFIGS, {}),
             "dq": (k._bwd_dq_kernel, bs._DQ_CONFIGS, {}),
             "dkdv": (k._bwd_dkdv_kernel, bs._DKDV_CONFIGS, {"ATOMIC_DQ": False}),
             "dkdv_atomic_dq": (k._bwd_dkdv_kernel, bs._DKDV_CONFIGS, {"ATOMIC_DQ": True})}
    for name in args.kernels.split(","):
        kernel, configs, extra = table[name]
        for D in (int(x) for x in args.head_dims.split(",")):
            for blk in (int(x) for x in args.blocks.split(",")):
                for cfg in given or configs:
                    dkdv = name.startswith("dkdv")  # which side's tile may span blocks
                    if not bs._fits(cfg, blk, blk, 0 if dkdv else 1 << 10,
                                    1 << 10 if dkdv else 0):
                        continue
                    consts = dict(Q_BLOCK=blk, K_BLOCK=blk, HEAD_DIM=D, HAS_DOC=True, **extra)
                    row = {"kernel": name, "head_dim": D, "block": blk, "config": list(cfg),
                           "dtype": args.dtype, "arch": args.arch}
                    try:
                        row.update(check(kernel, consts, cfg, args.dtype, args.capability,
                                         args.arch))
                    except Exception as err:  # report and go on: one bad tile is a finding
                        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
