"""Plot + markdown table of benchmarks/attention_kinds.py output.

    python benchmarks/plot_attention_kinds.py results/attention_kinds_h100.jsonl \
        --png results/attention_kinds_h100.png --md results/attention_kinds_h100.md
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("jsonl")
    p.add_argument("--png", required=True)
    p.add_argument("--md", required=True)
    args = p.parse_args(argv)
    rows, meta = [], {}
    for line in open(args.jsonl):
        r = json.loads(line)
        if "meta" in r:
            meta = r["meta"]
        elif "error" not in r:
            rows.append(r)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    get = {(r["kind"], r["length"]): r for r in rows}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(lengths)
    for i, n in enumerate(lengths):
        ax.bar([j + i * width for j in range(len(kinds))],
               [get[(k, n)]["fwd_bwd_ms"] if (k, n) in get else 0 for k in kinds], width,
               label=f"{n // 1024}k")
    ax.set_xticks([j + width * (len(lengths) - 1) / 2 for j in range(len(kinds))], kinds,
                  rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("fwd+bwd ms (one layer, log)")
    ax.set_title(f"attention kinds, {meta.get('device', '')}, H={meta.get('H')}/{meta.get('Hkv')}"
                 f" D={meta.get('D')} bf16")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    lines = ["| kind | settings | " + " | ".join(
        f"{n // 1024}k ms | {n // 1024}k FLOPs % dense | {n // 1024}k layouts ms | "
        f"{n // 1024}k peak GiB" for n in lengths) + " |",
             "|---|---|" + "---|---|---|---|" * len(lengths)]
    for k in kinds:
        first = next(get[(k, n)] for n in lengths if (k, n) in get)
        cells = []
        for n in lengths:
            r = get.get((k, n))
            if r is None:
                cells += ["–"] * 4
                continue
            dens = "–" if r.get("density") is None else f"{100 * r['density']:.1f}"
            cells += [f"{r['fwd_bwd_ms']:.1f}", dens, f"{r['layout_ms']:.1f}",
                      f"{r['peak_mem_gib']:.2f}"]
        settings = ", ".join(f"{a}={b}" for a, b in first["settings"].items() if a != "kind")
        lines.append(f"| {k} | {settings or '–'} | " + " | ".join(cells) + " |")
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
