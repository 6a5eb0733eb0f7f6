"""`dcwdist eval RUN_DIR --suite ...`: the evaluation suite of a trained run.

Suites: needle and kv (retrieval over lengths x depths, heat-map PNGs), fact (the training
task's fact sentence at each depth, scored by greedy answer and by teacher-forced answer loss,
which moves long before greedy answers are right; heat-map of the loss), qa (held-out synthetic
QA: EM / F1 / ROUGE-L / hallucination rate), ppl (loss by position bucket), speed (prefill
tokens/s, peak memory, attention FLOPs vs dense per tier), plus a RULER jsonl file if given.
Answers are greedy decodes on a KV cache under one eviction policy (`CacheConfig`). Writes
OUT/results.json and OUT/report.md (and the PNGs).
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from tqdm import tqdm

from dcwdist.eval.generate import ModelPredictor
from dcwdist.eval.heatmap import plot_heatmap
from dcwdist.eval.kvcache import CacheConfig, HeadBudget
from dcwdist.eval.positions import AnswerLoss, format_table, loss_by_position
from dcwdist.eval.tasks import fact_prompt, kv_prompt, needle_prompt, qa_eval, retrieval_grid

SUITES = ("needle", "kv", "fact", "qa", "ppl", "speed")
ANSWER_CHANCE = 1.52
"""Answer loss (nats/token) of a model that knows the format but not the fact: the space and
<eos> are certain, the four digits uniform (the first 1-9): (ln 9 + 3 ln 10) / 6."""


def parse_lengths(text: str) -> list[int]:
    """"2k,8k,512" -> [2048, 8192, 512] (k = 1024, m = 1024**2)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        mult = {"k": 1024, "m": 1024 ** 2}.get(item[-1:], 1)
        try:
            n = int(float(item[:-1] if mult > 1 else item) * mult)
        except ValueError:
            raise ValueError(f"bad length {item!r} in {text!r} (use e.g. 512,2k,8k)") from None
        if n < 64:
            raise ValueError(f"eval length {n} is too short (>= 64)")
        out.append(n)
    return out


@dataclass
class SuiteConfig:
    """What `dcwdist eval --suite` runs and where it writes."""

    suites: list[str] = field(default_factory=lambda: list(SUITES))
    """Any of needle, kv, fact, qa, ppl, speed."""
    lengths: list[int] = field(default_factory=lambda: [2048, 8192])
    """Prompt / row lengths in tokens."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Needle depths (fraction of the document)."""
    samples: int = 1
    """Needle / kv prompts per (length, depth) cell."""
    qa_samples: int = 8
    """Held-out QA examples per length."""
    max_new_tokens: int = 8
    """Greedy tokens decoded per answer (answers are ' NNNN' + eos)."""
    seed: int = 0
    """Seed of the needle / kv prompts (QA uses the held-out data seed)."""
    ruler: str = ""
    """Optional RULER-style jsonl file to score as well."""
    ruler_metric: str = "all"
    """RULER metric: all (string_match_all) or part (string_match_part)."""
    ruler_limit: int = 0
    """Score only the first N RULER samples (0: all)."""
    ruler_max_new_tokens: int = 32
    """Greedy tokens per RULER answer."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self):
        bad = [s for s in self.suites if s not in SUITES]
        if bad:
            raise ValueError(f"unknown eval suite(s) {bad}; choose from {', '.join(SUITES)}")
        if not self.suites and not self.ruler:
            raise ValueError("nothing to evaluate: give --suite and/or --ruler")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"needle depths must be in [0, 1], got {self.depths}")
        if min(self.samples, self.qa_samples, self.max_new_tokens) < 1:
            raise ValueError("samples, qa_samples and max_new_tokens must be >= 1")


def load_run(run_dir: str, overrides: list[str] = ()):
    """(model, cfg, tokenizer) of a finished run: config.yaml + overrides, model.pt, the last
    stage's attention settings and RoPE."""
    from dcwdist.attention.config import AttentionConfig
    from dcwdist.config import load_config
    from dcwdist.configtree import ConfigError
    from dcwdist.data_pipelines.tokenizer import build_tokenizer
    from dcwdist.train.trainer import build_model

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{run_dir} has no config.yaml: not a dcwdist run directory")
    weights = os.path.join(run_dir, "model.pt")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} does not exist (did the run finish?)")
    cfg = load_config(cfg_path, list(overrides))
    stage = cfg.stages[-1]
    attn_cfg = AttentionConfig(**vars(cfg.stage_attention(stage)))
    model = build_model(cfg, attn_cfg)
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.set_rope(stage.rope or cfg.model.rope)
    model.to(device).eval()
    return model, cfg, build_tokenizer(cfg.data.tokenizer)


def cache_config_for(model, policy: str, budget: int, scope: str = "head",
                     recent_ratio: float = 0.5) -> CacheConfig:
    """A CacheConfig whose tier windows follow the model's attention settings."""
    a = model.attn_cfg
    return CacheConfig(policy=policy, budget=budget, scope=scope, recent_ratio=recent_ratio,
                       window=a.window, buffer_window=a.buffer_window, stride=a.stride)


def run_suite(model, tok, data_cfg, cfg: SuiteConfig, cache_cfg: CacheConfig, out_dir: str,
              head_budget: Optional[HeadBudget] = None, autocast_bf16: bool = False) -> dict:
    """Run the chosen suites; write results.json, report.md and heat-maps under `out_dir`."""
    from dcwdist.data_pipelines import build_rows
    from dcwdist.eval.ruler import read_ruler, score_ruler
    from dcwdist.eval.speed import prefill_speed

    os.makedirs(out_dir, exist_ok=True)
    dev = model.norm.weight.device
    align = model.attn_cfg.block_size if model.attn_cfg.block_based else 1
    predict = ModelPredictor(model, tok, cache_cfg, cfg.max_new_tokens, align, head_budget)
    ruler = read_ruler(cfg.ruler, cfg.ruler_limit) if cfg.ruler else []
    L, n_cells = len(cfg.lengths), len(cfg.lengths) * len(cfg.depths) * cfg.samples
    total = sum({"needle": n_cells, "kv": n_cells, "fact": n_cells, "qa": L * cfg.qa_samples,
                 "ppl": L,
                 "speed": L}[s] for s in cfg.suites) + len(ruler)
    bar = tqdm(total=total, unit="task", disable=not cfg.progress, dynamic_ncols=True)
    tick = lambda: bar.update(1)  # noqa: E731
    res: dict = {"attention": model.attn_cfg.kind, "cache": asdict(cache_cfg),
                 "suite": asdict(cfg)}
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if autocast_bf16 else nullcontext())
    with amp:
        for name, builder in (("needle", needle_prompt), ("kv", kv_prompt),
                              ("fact", fact_prompt)):
            if name in cfg.suites:
                bar.set_description(name)
                scorer = AnswerLoss(model, tok, align) if name == "fact" else None
                rows = retrieval_grid(predict, tok, builder, cfg.lengths, cfg.depths, cfg.seed,
                                      cfg.samples, tick, answer_loss=scorer)
                res[name] = rows
                res[f"{name}_heatmap"] = plot_heatmap(
                    rows, os.path.join(out_dir, f"{name}_heatmap.png"),
                    f"{name} ({model.attn_cfg.kind}, cache {cache_cfg.policy})",
                    key="answer_loss" if scorer else "score",
                    chance=ANSWER_CHANCE if scorer else 0.0)
        if "qa" in cfg.suites:
            bar.set_description("qa")
            from dcwdist.data_pipelines.stream import EVAL_SEED_OFFSET
            res["qa"], res["qa_answers"] = qa_eval(
                predict, tok, cfg.lengths, data_cfg.seed + EVAL_SEED_OFFSET, cfg.qa_samples,
                tick, num_facts=data_cfg.num_facts, specificity=data_cfg.specificity,
                style=data_cfg.generator, hops=data_cfg.hops)
        if ruler:
            bar.set_description("ruler")
            rpred = ModelPredictor(model, tok, cache_cfg, cfg.ruler_max_new_tokens, align,
                                   head_budget)
            res["ruler"], res["ruler_answers"] = score_ruler(ruler, rpred, cfg.ruler_metric, tick)
        if "ppl" in cfg.suites:
            bar.set_description("ppl")
            res["ppl"] = []
            for n in cfg.lengths:
                rows_src = build_rows(data_cfg, n, align, held_out=True)
                batches = [rows_src.batch(i, 1).to(dev) for i in range(data_cfg.eval_rows)]
                res["ppl"] += [{"length": n, **r} for r in loss_by_position(model, batches, n)]
                tick()
        if "speed" in cfg.suites:
            bar.set_description("speed")
            res["speed"] = []
            for n in cfg.lengths:
                batch = build_rows(data_cfg, n, align, held_out=True).batch(0, 1).to(dev)
                res["speed"].append(prefill_speed(model, batch))
                tick()
    bar.close()
    res["cache_peak_tokens"] = predict.peak_tokens
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(res))
    return res


TITLES = {"needle": "Needle in a haystack (score by length x depth)",
          "kv": "Key-value retrieval (score by length x depth)",
          "fact": "The training task's fact by depth (teacher-forced answer loss, nats/token; "
                  "greedy answers right, %)",
          "qa": "Held-out synthetic QA (%)", "ruler": "RULER file (string match, %)",
          "ppl": "Loss by position within document", "speed": "Prefill speed and attention FLOPs"}


def report_markdown(res: dict) -> str:
    c = res["cache"]
    lines = [f"# dcwdist eval: attention={res['attention']}, cache={c['policy']}"
             f" (budget {c['budget'] or 'unbounded'} per {c['scope']})", ""]
    for key, title in TITLES.items():
        if key not in res:
            continue
        rows = res[key]
        if key in ("needle", "kv"):
            rows = _pivot(rows)
        elif key == "fact":
            rows = _pivot(rows, "answer_loss") + _pivot(rows)
        lines += [f"## {title}", "", format_table(rows), ""]
        if f"{key}_heatmap" in res:
            lines += [f"![{key}]({os.path.basename(res[f'{key}_heatmap'])})", ""]
    return "\n".join(lines)


def _pivot(rows: list[dict], key: str = "score") -> list[dict]:
    """Grid rows -> one row per depth, one column per length (scores in %, losses in nats)."""
    lengths = sorted({r["length"] for r in rows})
    out = []
    for d in sorted({r["depth"] for r in rows}):
        row = {"depth": f"{100 * d:.0f}%" + (" loss" if key != "score" else "")}
        for n in lengths:
            v = next(r[key] for r in rows if r["depth"] == d and r["length"] == n)
            row[str(n)] = round(v, 3) if key != "score" else round(100 * v, 1)
        out.append(row)
    return out
