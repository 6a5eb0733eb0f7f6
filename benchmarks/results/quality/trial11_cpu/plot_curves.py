"""Trial 11's training curves: train/loss (answer tokens) by step, from the runs' TensorBoard
logs into curves.json, and curves.png from that file.

    python plot_curves.py --runs DIR... --json curves.json   # read the logs
    python plot_curves.py --json curves.json --png curves.png
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4))

ap = argparse.ArgumentParser()
ap.add_argument("--runs", nargs="*", default=[])
ap.add_argument("--json", required=True)
ap.add_argument("--png", default="")
args = ap.parse_args()
if args.runs:
    from dcwdist.train.logging import read_scalars
    curves = {}
    for d in args.runs:
        sc = read_scalars(d)
        curves[os.path.basename(os.path.normpath(d))] = {
            tag: [(step, round(v, 4)) for step, v in sc[tag]]
            for tag in ("train/loss", "train/seq_len") if tag in sc}
    with open(args.json, "w") as f:
        json.dump(curves, f)
if args.png:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = json.load(open(args.json))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, c in curves.items():
        steps, loss = zip(*c["train/loss"])
        ax.plot(steps, loss, label=name, lw=1)
    ax.axvline(600, color="grey", ls=":", lw=1)
    ax.axhline(1.30, color="grey", ls="--", lw=1)
    ax.text(605, 3.6, "copy stage (128) | key-section stage (256)", fontsize=8, color="grey")
    ax.text(5, 1.33, "chance on the key-section answers (train loss counts <answer>: 1.30)",
            fontsize=8, color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss on answer tokens (nats/token)")
    ax.set_ylim(0, 4)
    ax.legend(fontsize=8)
    ax.set_title("Trial 11 (CPU): a copy stage before the 256-token stage")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
