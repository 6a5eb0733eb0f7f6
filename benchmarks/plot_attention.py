"""Plot benchmarks/attention.py JSON lines: fwd+bwd ms vs length (log-log), one line per impl.

    python benchmarks/plot_attention.py results.jsonl out.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rows = [json.loads(line) for line in open(src) if line.strip()]
    rows = [r for r in rows if "fwd_bwd_ms" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"),
                           (axes[1], "fwd_bwd_ms", "forward + backward")):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["length"], r[key]) for r in rows if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{title}: H=16, D=128, bf16, causal")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
