"""Activation memory of one training forward + backward, with and without the long-sequence
options (model.activation_checkpointing, model.tiled_mlp, model.offload_activations).

    PYTHONPATH=. python benchmarks/activation_memory.py --seq-len 8192 --out act_mem.jsonl

One row (one document) of --seq-len tokens through a small fp32 model (--dim, --layers, --ffn;
dense causal attention: torch SDPA, whose flash path keeps O(T)). Bytes are counted with LiveBytes
(dcwdist/model/activations.py): every tensor storage created during the step and still alive, on
CPU or GPU alike (parameters are not counted; their gradients are, in "peak"). Columns, MiB:

  kept            alive at the end of forward (what autograd keeps for backward, plus the loss)
  offloaded       what the offload hooks moved to host memory (on CPU it stays where it is)
  device_kept     kept - offloaded: what stays on the GPU between forward and backward
  peak            the most alive at once over forward + backward (includes the parameter grads)
  peak_fwd        the most alive at once during forward
On a GPU the row also has cuda_peak_mib (torch.cuda.max_memory_allocated over the step, minus
the memory before it), where offloaded tensors really leave the device.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkout import map_packages  # noqa: E402

map_packages()

from dcwdist.attention import AttentionConfig, AttnContext  # noqa: E402
from dcwdist.model import ModelConfig, Transformer  # noqa: E402
from dcwdist.model.activations import LiveBytes  # noqa: E402

CASES = {  # name: (activation_checkpointing, tiled_mlp, offload_activations)
    "plain": (False, 0, False),
    "tiled_mlp": (False, 1024, False),
    "checkpointing": (True, 0, False),
    "checkpointing+tiled_mlp": (True, 1024, False),
    "checkpointing+offload": (True, 0, True),
    "checkpointing+tiled_mlp+offload": (True, 1024, True),
}


def measure(name: str, args, dev) -> dict:
    ckpt, tile, offload = CASES[name]
    tile = args.tile if tile else 0
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=4,
                      n_kv_heads=2, ffn_dim=args.ffn, activation_checkpointing=ckpt,
                      tiled_mlp=tile, offload_activations=offload)
    model = Transformer(cfg, AttentionConfig(kind=args.attention)).to(dev).train()
    T = args.seq_len
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (1, T + 1), generator=g).to(dev)
    ctx = AttnContext(doc_ids=torch.zeros(1, T, dtype=torch.long, device=dev),
                      positions=torch.arange(T, device=dev)[None])
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with LiveBytes() as live:
        loss = model(tokens[:, :T], ctx, tokens[:, 1:]) / T
        kept, peak_fwd = live.current, live.peak
        loss.backward()
    row = {"case": name, "seq_len": T, "dim": args.dim, "layers": args.layers, "ffn": args.ffn,
           "vocab": args.vocab, "attention": args.attention, "tiled_mlp": tile,
           "device": str(dev), "loss": round(float(loss.detach()), 6)}
    off = ctx.cache.get("offloaded_bytes", 0)
    mib = 2 ** 20
    row.update(kept_mib=round(kept / mib, 2), offloaded_mib=round(off / mib, 2),
               device_kept_mib=round((kept - off) / mib, 2), peak_fwd_mib=round(peak_fwd / mib, 2),
               peak_mib=round(live.peak / mib, 2))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        row["cuda_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / mib, 2)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=192, help="MLP inner size (100M's ratio: 8/3)")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--tile", type=int, default=1024, help="tokens per MLP tile when tiled")
    ap.add_argument("--attention", default="dense", choices=("dense", "window"),
                    help="dense: one document, so torch SDPA (flash on CPU and GPU: O(T) memory); "
                         "window: the torch executor, which keeps far more per layer")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    rows = [measure(name, args, dev) for name in args.cases]
    cols = ("kept_mib", "offloaded_mib", "device_kept_mib", "peak_fwd_mib", "peak_mib")
    print(f"{'case':34s}" + "".join(f"{c:>17s}" for c in cols))
    for row in rows:
        print(f"{row['case']:34s}" + "".join(f"{row[c]:17.2f}" for c in cols))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
