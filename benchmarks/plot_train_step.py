"""Plot benchmarks/train_step.py results: tokens/s and peak memory vs sequence length (log x).

    python benchmarks/plot_train_step.py RESULTS.jsonl [MORE.jsonl ...] --png train_step_h100.png \
        [--json train_step_h100.json]

Inputs are train_step.py JSON lines (or a combined .json with a "rows" list). A later row for
the same (model, impl, length) replaces an earlier one. Out-of-memory cases are marked with an x
on the memory panel at the device's capacity line. --json writes the merged rows, the profile
rows and the meta lines into one JSON file.
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"hf_sdpa": "transformers SDPA + ckpt", "dcwdist_dense": "dcwdist dense (triton)",
          "dcwdist_dcw": "dcwdist DCW (triton)",
          "hf_liger": "transformers + Liger + ckpt",
          "hf_liger_offload": "transformers + Liger + ckpt + CPU offload",
          "dcwdist_dcw_zero1": "dcwdist DCW, DeepSpeed ZeRO-1 bf16",
          "dcwdist_dense_zero1": "dcwdist dense, DeepSpeed ZeRO-1 bf16"}
STYLE = {"qwen2_100m": "-", "llama3.2_1b": "--"}
COLOR = {"hf_sdpa": "tab:gray", "dcwdist_dense": "tab:blue", "dcwdist_dcw": "tab:red",
         "hf_liger": "tab:green", "hf_liger_offload": "tab:olive",
         "dcwdist_dcw_zero1": "tab:purple", "dcwdist_dense_zero1": "tab:cyan"}


def load(paths):
    rows, profiles, metas = {}, [], []
    for path in paths:
        if path.endswith(".json"):
            data = json.load(open(path))
            items = data.get("rows", []) + data.get("profiles", [])
            metas += data.get("meta", [])
        else:
            items = [json.loads(line) for line in open(path) if line.strip()]
        for r in items:
            if "meta" in r:
                metas.append(r)
            elif r.get("status") == "profile":
                profiles.append(r)
            else:
                rows[(r["model"], r["impl"], r["length"])] = r
    return list(rows.values()), profiles, metas


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--png", required=True)
    ap.add_argument("--json", default="")
    ap.add_argument("--capacity-gib", type=float, default=79.2)
    args = ap.parse_args()
    rows, profiles, metas = load(args.inputs)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    series = sorted({(r["model"], r["impl"]) for r in rows})
    for model, impl in series:
        pts = sorted((r for r in rows if (r["model"], r["impl"]) == (model, impl)),
                     key=lambda r: r["length"])
        ok = [r for r in pts if r.get("status") == "ok"]
        label = f"{model} · {LABELS.get(impl, impl)}"
        kw = dict(color=COLOR.get(impl), linestyle=STYLE.get(model, "-"), marker="o")
        if ok:
            ax_t.plot([r["length"] for r in ok], [r["tokens_per_s"] for r in ok], label=label, **kw)
            mem = [r for r in ok if r.get("peak_gib") is not None]  # none on CPU
            ax_m.plot([r["length"] for r in mem], [r["peak_gib"] for r in mem], label=label, **kw)
        for r in pts:
            if r.get("status") == "oom":
                ax_m.plot([r["length"]], [args.capacity_gib], marker="x", markersize=10,
                          color=COLOR.get(impl), linestyle="none")
                ax_m.annotate("OOM", (r["length"], args.capacity_gib), fontsize=8,
                              xytext=(4, -12), textcoords="offset points")
    for ax, title, ylabel in ((ax_t, "training step throughput (batch 1 row)", "tokens / s"),
                              (ax_m, "peak allocated memory", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        lengths = sorted({r["length"] for r in rows})
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{n // 1024}k" for n in lengths])
    ax_m.axhline(args.capacity_gib, color="k", linewidth=0.8, alpha=0.5)
    ax_t.legend(fontsize=8)
    device = next((r["device"] for r in rows if r.get("device")), "")
    fig.suptitle(f"dcwdist train step: fwd + bwd + AdamW, bf16 autocast, activation "
                 f"checkpointing — {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    if args.json:
        order = {"qwen2_100m": 0, "llama3.2_1b": 1}
        rows.sort(key=lambda r: (order.get(r["model"], 9), r["impl"], r["length"]))
        with open(args.json, "w") as f:
            json.dump({"meta": metas, "rows": rows, "profiles": profiles}, f, indent=1)


if __name__ == "__main__":
    main()
