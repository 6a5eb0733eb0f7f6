"""Does retrieval learned at a short length survive a longer one? Answer loss of a trained run
on held-out rows, by length, RoPE setting and fact-to-answer distance. One JSON line per case.

The quality study (benchmarks/results/quality.md) sees every kind leave chance at 256 tokens and
fall back near it at 2k / 8k. This separates the suspects without training: the RoPE change
(same distances, scaled RoPE), the longer distances (unscaled RoPE, far facts) and neither
(short distances at the trained length).

    python benchmarks/length_transfer.py RUN_DIR [--checkpoint TAG] --lengths 256,2k \
        --rope none,yarn:8 --rows 64

    python benchmarks/length_transfer.py --plot RESULTS.jsonl --png out.png [--lengths 2k]

A case is (length, rope); each prints answer loss over all answers and per distance bucket
(tokens from the fact's last token to the answer's first), with the number of answers, and the
attention FLOPs of those forwards as a percentage of dense (exact pair counting).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

EDGES = (0, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30)


def parse_rope(text: str, base, original: int, stage_rope):
    """stage | none | yarn:F | linear:F | ntk:F -> RopeConfig (scaled from `original` tokens);
    stage is the RoPE the recipe trains this length with."""
    from dcwdist.model.rope import RopeConfig

    if text == "stage":
        return stage_rope
    if text == "none":
        return RopeConfig(base=base.base)
    kind, _, factor = text.partition(":")
    if not factor:
        raise ValueError(f"--rope {text!r}: expected none or KIND:FACTOR, e.g. yarn:8")
    return RopeConfig(base=base.base, scaling=kind, factor=float(factor),
                      original_max_len=original)


def load_weights(run_dir: str, checkpoint: str):
    """Model state dict: model.pt of a finished run, or a checkpoint tag's state.pt."""
    if not checkpoint:
        path = os.path.join(run_dir, "model.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist; pass --checkpoint TAG")
        return torch.load(path, map_location="cpu", weights_only=True)
    path = checkpoint if os.sep in checkpoint else os.path.join(run_dir, "checkpoints",
                                                                 checkpoint)
    state = os.path.join(path, "state.pt")
    if not os.path.exists(state):
        raise FileNotFoundError(f"{state} does not exist (only single-process torch-backend "
                                "checkpoints are read here)")
    return torch.load(state, map_location="cpu", weights_only=False)["model"]


def answer_distances(batch) -> torch.Tensor:
    """Per answer token: tokens from its document's last fact token to the answer's first
    token; -1 on other tokens and where the document holds no fact."""
    from dcwdist.attention.context import ROLE_ANSWER, ROLE_DOCUMENT

    rel = (batch.relevance > 0.5) & (batch.roles == ROLE_DOCUMENT)  # not the instruction
    idx = torch.arange(rel.shape[1]).expand_as(rel)
    none = torch.full_like(idx, -1)
    last = torch.where(rel, idx, none).cummax(dim=1).values
    # a fact of an earlier document does not count: the attention is masked per document
    same_doc = torch.gather(batch.doc_ids, 1, last.clamp_min(0)) == batch.doc_ids
    dist = torch.where((last >= 0) & same_doc, idx - last, none)
    ans = batch.roles == ROLE_ANSWER
    start = ans & ~torch.cat([torch.zeros_like(ans[:, :1]), ans[:, :-1]], dim=1)
    latest_start = torch.where(start, idx, none).cummax(dim=1).values
    return torch.where(ans, torch.gather(dist, 1, latest_start.clamp_min(0)), none)


def per_answer(ce: torch.Tensor, correct: torch.Tensor, ans: torch.Tensor,
               dist: torch.Tensor) -> list[tuple[int, bool, float]]:
    """One row's answers (runs of answer tokens): (distance of its first token, whether every
    token is predicted, mean loss over its tokens)."""
    out, i, n = [], 0, int(ans.numel())
    while i < n:
        if not ans[i]:
            i += 1
            continue
        j = i
        while j < n and ans[j]:
            j += 1
        out.append((int(dist[i]), bool(correct[i:j].all()), float(ce[i:j].double().mean())))
        i = j
    return out


@torch.no_grad()
def measure(model, rows, n_rows: int, device) -> dict:
    from dcwdist.attention.context import ROLE_ANSWER
    from dcwdist.attention.flops import attention_flops
    from dcwdist.data_pipelines.packing import IGNORE
    from dcwdist.eval.positions import context_for

    sums = [0.0] * (len(EDGES) - 1)
    counts = [0] * (len(EDGES) - 1)
    total, total_n = 0.0, 0
    computed = dense = 0.0
    answers = []  # per answer: (distance, every token argmax-correct, mean loss)
    model.eval()
    for i in range(n_rows):
        batch = rows.batch(i, 1)
        dist = answer_distances(batch)
        batch = batch.to(device)
        ctx = context_for(batch)
        hidden = model(batch.tokens, ctx)
        # the tiers this forward chose: the attention work it did, against dense
        fl = attention_flops(model.attn_cfg, ctx, model.cfg.n_heads, model.cfg.head_dim)
        computed, dense = computed + fl["computed"], dense + fl["dense"]
        logits = model.logits(hidden).float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2),
                                               batch.labels.clamp_min(0), reduction="none").cpu()
        labels, roles = batch.labels.cpu(), batch.roles.cpu()
        ans = (labels != IGNORE) & (roles == ROLE_ANSWER)
        total += float(ce[ans].double().sum())
        total_n += int(ans.sum())
        answers += per_answer(ce[0], logits[0].argmax(-1).cpu() == labels[0], ans[0], dist[0])
        for b in range(len(EDGES) - 1):
            sel = ans & (dist >= EDGES[b]) & (dist < EDGES[b + 1])
            sums[b] += float(ce[sel].double().sum())
            counts[b] += int(sel.sum())
    losses = torch.tensor([a[2] for a in answers], dtype=torch.float64)
    out = {"answer_loss": round(total / total_n, 4) if total_n else math.nan,
           "answer_tokens": total_n,
           # retrieval accuracy: % of answers whose every token is the argmax (teacher-forced
           # exact match); the loss's standard error over answers says what a difference means
           "answer_acc": round(100 * sum(a[1] for a in answers) / len(answers), 2)
           if answers else math.nan,
           "answers": len(answers),
           "answer_loss_se": round(float(losses.std() / math.sqrt(len(answers))), 4)
           if len(answers) > 1 else math.nan,
           "attn_flops_pct_dense": round(100 * computed / dense, 2) if dense else math.nan,
           "by_distance": {}}
    for b in range(len(EDGES) - 1):
        if counts[b]:
            hi = EDGES[b + 1] if EDGES[b + 1] < (1 << 30) else "inf"
            got = [a[1] for a in answers if EDGES[b] <= a[0] < EDGES[b + 1]]
            out["by_distance"][f"{EDGES[b]}-{hi}"] = {
                "loss": round(sums[b] / counts[b], 4), "tokens": counts[b],
                "acc": round(100 * sum(got) / len(got), 2) if got else math.nan,
                "answers": len(got)}
    return out


CHANCE = 1.52  # nats per answer token: 4 uniform digits, then the space and <eos>


def plot(jsonl: str, png: str, lengths: list[int], select: list[str] = (),
         metric: str = "loss") -> None:
    """Answer loss (or retrieval accuracy, metric="acc") by fact-to-answer distance, one line
    per (run, checkpoint, rope) at each length; the last line for a case wins. `select`: keep
    labels starting with one of these (or equal to one that ends in $)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = {}
    for line in open(jsonl):
        if line.strip():
            r = json.loads(line)
            if r["length"] in lengths:
                ac = any("answer_core=true" in o for o in r.get("overrides", []))
                key = (r["length"], f"{r['run']}@{r['checkpoint'].replace('step0000', '')} "
                                    f"rope {r['rope']}" + (" +answer_core" if ac else ""))
                if not select or any(key[1] == x[:-1] if x.endswith("$")
                                     else key[1].startswith(x) for x in select):
                    cases[key] = r
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for (n, label), r in cases.items():
            if n != length:
                continue
            b = r["by_distance"]
            xs = [EDGES.index(int(k.split("-")[0])) for k in b]
            overall = r["answer_acc"] if metric == "acc" else r["answer_loss"]
            ax.plot(xs, [v[metric] for v in b.values()], marker="o",
                    ls=("-", "--", ":")[len(ax.lines) // 10 % 3],
                    label=f"{label} ({overall:.2f})")
        if metric == "loss":
            ax.axhline(CHANCE, color="gray", ls=":", label="chance")
        n_buckets = sum(1 for e in EDGES[1:] if e <= length)
        ax.set_xticks(range(n_buckets), [f"{EDGES[i]}-{EDGES[i + 1]}" for i in range(n_buckets)])
        ax.set_xlabel("fact-to-answer distance (tokens)")
        ax.set_ylabel("retrieval accuracy (% answers exact)" if metric == "acc"
                      else "answer loss (nats/token)")
        ax.set_title(f"held-out rows of {length} tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def checkpoints(run_dir: str, spec: str) -> list[str]:
    """--checkpoint: "" (model.pt), TAG[,TAG...], or all (every stepNNNNNNNN tag, in order)."""
    if spec != "all":
        return spec.split(",") if spec else [""]
    folder = os.path.join(run_dir, "checkpoints")
    tags = sorted(t for t in (os.listdir(folder) if os.path.isdir(folder) else [])
                  if t.startswith("step") and os.path.exists(os.path.join(folder, t, "state.pt")))
    if not tags:
        raise FileNotFoundError(f"{folder} holds no step checkpoints (checkpoint.every=N saves them)")
    return tags


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", help="a dcwdist run directory (not with --plot)")
    ap.add_argument("--checkpoint", default="",
                    help="checkpoint tag or path, a comma list of them, or 'all' (every saved "
                         "step, in order: answer loss over training); default model.pt")
    ap.add_argument("--lengths", default="256,2k")
    ap.add_argument("--rope", default="stage,none",
                    help="comma list: stage (the recipe's RoPE at that length) | none | yarn:F | "
                         "linear:F | ntk:F (scaled from the first stage's length)")
    ap.add_argument("--rows", type=int, default=32, help="held-out rows per case")
    ap.add_argument("--max-doc-len", type=int, default=0,
                    help="cap documents at this many tokens (0: the row length)")
    ap.add_argument("--out", default="", help="also append the JSON lines to this file")
    ap.add_argument("--plot", default="", help="plot this JSON-lines file instead (with --png)")
    ap.add_argument("--png", default="length_transfer.png")
    ap.add_argument("--metric", default="loss", choices=("loss", "acc"),
                    help="--plot: answer loss or retrieval accuracy (lines measured with it)")
    ap.add_argument("--select", default="",
                    help="--plot: comma list of label prefixes to keep (RUN@STEP), e.g. dcw@1000; "
                         "a trailing $ asks for the whole label")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. device=cpu")
    args = ap.parse_intermixed_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dcwdist.eval.suite import parse_lengths

    if args.plot:
        plot(args.plot, args.png, parse_lengths(args.lengths),
             [x for x in args.select.split(",") if x], args.metric)
        return 0
    if not args.run_dir:
        ap.error("a run directory is required (or --plot RESULTS.jsonl)")
    from dcwdist.attention.config import AttentionConfig
    from dcwdist.config import load_config
    from dcwdist.data_pipelines import build_rows
    from dcwdist.train.trainer import build_model

    cfg = load_config(os.path.join(args.run_dir, "config.yaml"), list(args.overrides))
    if args.max_doc_len:
        cfg.data.max_doc_len = args.max_doc_len
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    original = cfg.stages[0].seq_len
    base_rope = cfg.stages[0].rope or cfg.model.rope
    lines = []
    for checkpoint in checkpoints(args.run_dir, args.checkpoint):
        for length in parse_lengths(args.lengths):
            # the attention settings of the stage trained at this length, else the last one's
            stage = next((s for s in cfg.stages if s.seq_len == length), cfg.stages[-1])
            attn_cfg = AttentionConfig(**vars(cfg.stage_attention(stage)))
            model = build_model(cfg, attn_cfg)
            model.load_state_dict(load_weights(args.run_dir, checkpoint))
            model.to(device)
            align = attn_cfg.block_size if attn_cfg.block_based else 1
            rows = build_rows(cfg.data, length, align, held_out=True)
            for rope in args.rope.split(","):
                model.set_rope(parse_rope(rope, base_rope, original,
                                          stage.rope or cfg.model.rope))
                res = {"run": os.path.basename(os.path.normpath(args.run_dir)),
                       "checkpoint": checkpoint or "model.pt", "kind": attn_cfg.kind,
                       "length": length, "rope": rope, "max_doc_len": args.max_doc_len,
                       "rows": args.rows, "overrides": list(args.overrides)}
                line = json.dumps(res | measure(model, rows, args.rows, device))
                print(line, flush=True)
                lines.append(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
