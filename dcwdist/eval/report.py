"""`dcwdist report RUN_DIRS... --out DIR`: one comparison table and plots over finished runs.

Reads, per run directory: config.yaml (name, attention kind, tier ratios, pool, lambda_eff,
instruction specificity), TensorBoard scalars (eval/loss and eval/answer_loss at each stage's
end, train/tokens_per_s, train/scorer/flops_realised) and, when `dcwdist eval` ran,
eval_suite/results.json (needle / kv retrieval grids, QA EM/F1/ROUGE-L/hallucination, prefill
attention FLOPs against dense). Writes DIR/report.md, DIR/report.json, DIR/val_loss.png,
DIR/quality_vs_flops.png and copies each run's retrieval heat-maps as DIR/<run>_<task>.png.
A missing piece (no eval yet, no TensorBoard) leaves an empty cell, never a failure.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Optional

import yaml

from dcwdist.eval.positions import format_table
from dcwdist.train.logging import read_scalars

EVAL_DIR = "eval_suite"


def _mean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _tail_mean(series: list[tuple[int, float]], frac: float = 0.25) -> Optional[float]:
    """Mean over the last `frac` of a scalar's points (steady-state throughput)."""
    if not series:
        return None
    n = max(1, int(len(series) * frac))
    return _mean([v for _, v in series[-n:]])


def _retrieval(rows: list[dict], length: Optional[int] = None) -> Optional[float]:
    rows = [r for r in rows if length is None or r["length"] == length]
    return None if not rows else 100 * _mean([r["score"] for r in rows])


def run_summary(run_dir: str) -> dict:
    """Everything the report shows about one run (None where a piece is missing)."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a dcwdist run directory")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    attn, seg, data = cfg["attention"], cfg["segmentation"], cfg["data"]
    kind = attn["kind"]
    label = kind
    if kind == "dcw":
        label += " (oracle)" if seg.get("scorer") == "oracle" else " (learned)"
    out = {"run": os.path.basename(os.path.normpath(run_dir)), "name": cfg["name"],
           "seed": cfg.get("seed"), "kind": kind, "label": label, "run_dir": run_dir,
           "tiers": (f"{100 * seg['core_ratio']:.0f}/{100 * seg['buffer_ratio']:.0f}/"
                     f"{100 * (1 - seg['core_ratio'] - seg['buffer_ratio']):.0f}"
                     if kind == "dcw" else ""),
           "summary_pool": attn["summary_pool"] if kind == "dcw" else None,
           "lambda_eff": seg["lambda_eff"] if kind == "dcw" else None,
           "specificity": data["specificity"]}
    sc = read_scalars(run_dir, missing_ok=True)
    stage_len = dict(sc.get("eval/seq_len", []))
    # Only this config's stage lengths: a run directory reused by an earlier run keeps that
    # run's event files beside the new ones (the later value of a length wins).
    lengths = {int(st["seq_len"]) for st in cfg.get("stages", [])}
    for key, tag in (("val_loss", "eval/loss"), ("val_answer_loss", "eval/answer_loss")):
        out[key] = {n: v for n, v in ((int(stage_len.get(s, 0)), v) for s, v in sc.get(tag, []))
                    if n in lengths}
    out["tokens_per_s"] = _tail_mean(sc.get("train/tokens_per_s", []))
    out["train_flops_realised"] = _tail_mean(sc.get("train/scorer/flops_realised", []))
    out["core_recall"] = _tail_mean(sc.get("train/scorer/core_recall", []))
    res_path = os.path.join(run_dir, EVAL_DIR, "results.json")
    res = {}
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
    out["lengths"] = sorted({r["length"] for r in res.get("needle", []) + res.get("kv", [])})
    for task in ("needle", "kv", "fact"):
        out[task] = _retrieval(res.get(task, []))
        out[f"{task}_by_length"] = {n: _retrieval(res[task], n) for n in out["lengths"]
                                    if task in res}
        hm = os.path.join(run_dir, EVAL_DIR, f"{task}_heatmap.png")
        out[f"{task}_heatmap"] = hm if os.path.exists(hm) else None
    fact = [r["answer_loss"] for r in res.get("fact", []) if "answer_loss" in r]
    out["fact_answer_loss"] = _mean(fact) if fact else None
    qa = res.get("qa", [])
    for key in ("em", "f1", "rouge_l", "hallucination_rate"):
        out[f"qa_{key}"] = _mean([r[key] for r in qa]) if qa else None
    out["qa_em_by_length"] = {r["length"]: r["em"] for r in qa}
    speed = res.get("speed", [])
    out["attn_density"] = {r["length"]: r["density"] for r in speed}
    out["prefill_tok_s"] = {r["length"]: r["prefill_tok_s"] for r in speed}
    return out


def _fmt(v, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def report_rows(runs: list[dict]) -> list[dict]:
    lengths = sorted({n for r in runs for n in r["val_loss"]})
    dens_len = max((n for r in runs for n in r["attn_density"]), default=None)
    rows = []
    for r in runs:
        row = {"run": r["run"], "attention": r["label"], "tiers": r["tiers"] or "–",
               "pool": _fmt(r["summary_pool"]), "λ_eff": _fmt(r["lambda_eff"], 2),
               "instr.": r["specificity"]}
        for n in lengths:
            row[f"val loss {_len(n)}"] = _fmt(r["val_loss"].get(n), 3)
        for n in lengths:
            row[f"answer loss {_len(n)}"] = _fmt(r["val_answer_loss"].get(n), 3)
        row["needle %"] = _fmt(r["needle"])
        row["kv %"] = _fmt(r["kv"])
        row["fact answer loss"] = _fmt(r.get("fact_answer_loss"), 3)
        row["QA EM"] = _fmt(r["qa_em"])
        row["QA F1"] = _fmt(r["qa_f1"])
        row["ROUGE-L"] = _fmt(r["qa_rouge_l"])
        row["halluc. %"] = _fmt(r["qa_hallucination_rate"])
        row[f"attn FLOPs % dense{f' @{_len(dens_len)}' if dens_len else ''}"] = _fmt(
            None if dens_len is None or dens_len not in r["attn_density"]
            else 100 * r["attn_density"][dens_len])
        row["train tok/s"] = _fmt(r["tokens_per_s"], 0)
        rows.append(row)
    return rows


def _spread(values: list) -> str:
    """'mean ± std (n)' of the values that exist; '–' when none."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "–"
    m = sum(v) / len(v)
    if len(v) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def seed_rows(runs: list[dict]) -> list[dict]:
    """One row per recipe (config name and what the report shows of its settings) over its seeds: answer loss at each stage's end and QA
    exact match at each eval length as mean ± sample std, and how many seeds retrieve (answer
    loss below RETRIEVES at the last stage). Recipes with a single run are listed too."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["name"], r["label"], r["tiers"], r["summary_pool"], r["lambda_eff"],
               r["specificity"])
        groups.setdefault(key, []).append(r)
    lengths = sorted({n for r in runs for n in r["val_answer_loss"]})
    qa_lengths = sorted({n for r in runs for n in r.get("qa_em_by_length", {})})
    dens_len = max((n for r in runs for n in r["attn_density"]), default=None)
    rows = []
    for (name, *_), rs in groups.items():
        row = {"recipe": name, "attention": rs[0]["label"],
               "seeds": ",".join(str(r["seed"]) for r in rs)}
        for n in lengths:
            row[f"answer loss {_len(n)}"] = _spread([r["val_answer_loss"].get(n) for r in rs])
        if lengths:
            last = [r["val_answer_loss"].get(lengths[-1]) for r in rs]
            row[f"retrieving @{_len(lengths[-1])}"] = (
                f"{sum(1 for v in last if v is not None and v < RETRIEVES)}/{len(rs)}")
        for n in qa_lengths:
            row[f"QA EM {_len(n)}"] = _spread([r.get("qa_em_by_length", {}).get(n) for r in rs])
        if dens_len is not None:
            row[f"attn FLOPs % dense @{_len(dens_len)}"] = _fmt(_mean(
                [100 * r["attn_density"][dens_len] for r in rs if dens_len in r["attn_density"]]))
        rows.append(row)
    return rows


RETRIEVES = 1.2
"""Answer loss (nats/token) under which a run counts as retrieving: chance on the synthetic
key-section answers is ~1.52 (4 uniform digits + space + <eos>)."""


def _plots(runs: list[dict], out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    if any(r["val_loss"] for r in runs):
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for r in runs:
            for a, key in zip(ax, ("val_loss", "val_answer_loss")):
                pts = sorted(r[key].items())
                if pts:
                    a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r["run"])
        for a, title in zip(ax, ("validation loss (all tokens)", "validation loss (answer tokens)")):
            a.set_xscale("log", base=2)
            a.set_xlabel("stage sequence length")
            a.set_title(title)
            a.grid(alpha=0.3)
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "val_loss.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    pts = [(r, max(r["attn_density"].items())[1]) for r in runs if r["attn_density"]]
    if pts:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for a, key, title in ((ax[0], "kv", "key-value retrieval %"),
                              (ax[1], "qa_f1", "QA F1")):
            for r, dens in pts:
                if r[key] is not None:
                    a.scatter(100 * dens, r[key])
                    a.annotate(r["run"], (100 * dens, r[key]), fontsize=7)
            a.set_xlabel("attention FLOPs, % of dense (longest eval length)")
            a.set_title(title)
            a.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, "quality_vs_flops.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


def build_report(run_dirs: list[str], out_dir: str, title: str = "dcwdist report") -> str:
    """Write report.md / report.json / plots under out_dir; returns the markdown."""
    missing = [d for d in run_dirs if not os.path.isdir(d)]
    if missing:
        raise FileNotFoundError(f"run directory {missing[0]} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    runs = [run_summary(d) for d in run_dirs]
    rows = report_rows(runs)
    plots = _plots(runs, out_dir)
    lines = [f"# {title}", "", format_table(rows), ""]
    by_seed = seed_rows(runs)
    if len(by_seed) < len(runs):  # some recipe ran with several seeds
        lines += ["## Over seeds (mean ± sample std)", "", format_table(by_seed), ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    heat = []
    for r in runs:
        for task in ("needle", "kv", "fact"):
            if r.get(f"{task}_heatmap"):
                name = f"{r['run']}_{task}.png"
                shutil.copyfile(r[f"{task}_heatmap"], os.path.join(out_dir, name))
                heat.append(f"![{r['run']} {task}]({name})")
    if heat:
        lines += ["", "## Retrieval heat-maps", ""] + heat
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"rows": rows, "seed_rows": by_seed, "runs": runs}, f, indent=1, default=str)
    return md
