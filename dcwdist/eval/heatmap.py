"""Depth x length heat-map of retrieval scores (needle / key-value) or of teacher-forced answer
loss (fact), as a PNG (matplotlib Agg)."""
from __future__ import annotations

import os

import numpy as np


def score_matrix(rows: list[dict], key: str = "score") -> tuple[np.ndarray, list, list]:
    """[depths, lengths] matrix of `key` from grid rows, with the sorted axis values."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    m = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        m[depths.index(r["depth"]), lengths.index(r["length"])] = r[key]
    return m, depths, lengths


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_heatmap(rows: list[dict], path: str, title: str, key: str = "score",
                 chance: float = 0.0) -> str:
    """Write the heat-map of grid rows (length, depth, `key`) to `path`; returns it.
    key="score": share retrieved in [0, 1], shown in %; key="answer_loss": nats/token, green
    at 0, red from `chance` up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, depths, lengths = score_matrix(rows, key)
    loss = key != "score"
    shown = m if loss else 100 * m
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(shown, cmap="RdYlGn_r" if loss else "RdYlGn", vmin=0,
                   vmax=(chance or np.nanmax(shown)) if loss else 100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{shown[i, j]:.2f}" if loss else f"{shown[i, j]:.0f}",
                        ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label=(f"answer loss (nats/token; chance {chance:.2f})" if chance
                                   else "answer loss (nats/token)") if loss else "score (%)")
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
