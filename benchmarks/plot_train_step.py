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
          "dcwdist_dense_zero1": "dcwdist dense, DeepSpeed ZeRO-1 bf16",
          "dcwdist_sdpa_zero1": "dcwdist dense (torch SDPA), DeepSpeed ZeRO-1 bf16"}
STYLE = {"qwen2_100m": "-", "llama3.2_1b": "--"}
COLOR = {"hf_sdpa": "tab:gray", "dcwdist_dense": "tab:blue", "dcwdist_dcw": "tab:red",
         "hf_liger": "tab:green", "hf_liger_offload": "tab:olive",
         "dcwdist_dcw_zero1": "tab:purple", "dcwdist_dense_zero1": "tab:cyan",
         "dcwdist_sdpa_zero1": "tab:brown"}


def variant(r: dict) -> str:
    """impl plus the dcwdist memory options the row ran with (one plotted series each)."""
    impl = r["impl"]
    if impl.startswith("dcwdist_"):
        impl += "_offload" if r.get("offload_activations") else ""
        impl += "_tiled" if r.get("tiled_mlp") else ""
        impl += "_recompute" if r.get("keep_attention_outputs") is False else ""
        core = r.get("tier_core")
        if core is not None and abs(core - 0.2) > 0.02:  # a core tier other than the default
            impl += f"_core{round(core * 100)}%"
    return impl


def base_impl(v: str) -> str:
    """The impl a series name starts with (variant() appends the memory options)."""
    if not v.startswith("dcwdist_"):
        return v
    return next((k for k in sorted(LABELS, key=len, reverse=True)
                 if v == k or v.startswith(k + "_")), v)


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
                r = dict(r, series=variant(r))
                cold = r.get("warmup_steps") == 0
                rows[(r["model"], r["series"], r["length"], cold)] = r
    return list(rows.values()), profiles, metas


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--png", required=True)
    ap.add_argument("--json", default="")
    ap.add_argument("--capacity-gib", type=float, default=79.2)
    args = ap.parse_args()
    rows, profiles, metas = load(args.inputs)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 7))
    series = sorted({(r["model"], r["series"]) for r in rows})
    for model, ser in series:
        impl = base_impl(ser)
        pts = sorted((r for r in rows if (r["model"], r["series"]) == (model, ser)),
                     key=lambda r: r["length"])
        ok = [r for r in pts if r.get("status") == "ok" and r.get("warmup_steps") != 0]
        cold = [r for r in pts if r.get("status") == "ok" and r.get("warmup_steps") == 0]
        extra = ser.removeprefix(impl).replace("_", " + ")
        label = f"{model} · {LABELS.get(impl, impl)}{extra}"
        kw = dict(color=COLOR.get(impl), linestyle=STYLE.get(model, "-"),
                  marker="s" if extra else "o")
        short = {"qwen2_100m": "100M", "llama3.2_1b": "1B"}.get(model, model)
        for ax, key in ((ax_t, "tokens_per_s"), (ax_m, "peak_gib")):
            # a first step (pinned host allocation, compiling, tuning): hollow, labelled marker
            pts_c = [r for r in cold if r.get(key) is not None]
            if not pts_c:
                continue
            ax.plot([r["length"] for r in pts_c], [r[key] for r in pts_c], marker="D",
                    fillstyle="none", color=COLOR.get(impl), linestyle="none",
                    label=f"{label} (cold first step)" if ax is ax_t else None)
            for r in pts_c:
                ax.annotate(short, (r["length"], r[key]), fontsize=7, xytext=(5, 3),
                            textcoords="offset points")
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
    ax_t.set_yscale("log")  # 100M at 128k and 1B at 1M differ by 20x
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=2)
    device = next((r["device"] for r in rows if r.get("device")), "")
    fig.suptitle(f"dcwdist train step: fwd + bwd + AdamW, bf16 autocast, activation "
                 f"checkpointing — {device}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.025 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(args.png, dpi=120)
    if args.json:
        order = {"qwen2_100m": 0, "llama3.2_1b": 1}
        rows.sort(key=lambda r: (order.get(r["model"], 9), r["impl"], r["length"]))
        with open(args.json, "w") as f:
            json.dump({"meta": metas, "rows": rows, "profiles": profiles}, f, indent=1)


if __name__ == "__main__":
    main()
