"""Bring-your-own RULER task files: read the jsonl and score it by string match, as RULER does.

Each line holds `input` (the whole prompt: context and question), `outputs` (list of reference
strings) and `length` (the prompt's length in the generator's tokens); an optional
`answer_prefix` is appended to the prompt (RULER's templates end with one). RULER's metrics:
`string_match_all` (share of references found in the prediction; its synthetic tasks) and
`string_match_part` (1 if any is found; its QA tasks), case-insensitive, reported x100.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

from dcwdist.eval.metrics import string_match_all, string_match_part
from dcwdist.eval.tasks import Predictor, Prompt

METRICS = {"all": string_match_all, "part": string_match_part}


@dataclass
class RulerSample:
    input: str
    outputs: list[str]
    length: int = 0
    answer_prefix: str = ""
    extra: dict = field(default_factory=dict)

    def prompt(self) -> Prompt:
        """RULER's input is one block of text: it is the document; there is no instruction."""
        return Prompt(instruction="", document=self.input + self.answer_prefix,
                      answer=self.outputs[0] if self.outputs else "", length=self.length)


def read_ruler(path: str, limit: int = 0) -> list[RulerSample]:
    """Samples of a RULER-style jsonl file (at most `limit` if > 0)."""
    samples = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                outputs = rec.pop("outputs")
                text = rec.pop("input")
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{n}: not a RULER record (needs input, outputs): {e}") \
                    from None
            if isinstance(outputs, str):
                outputs = [outputs]
            samples.append(RulerSample(input=text, outputs=[str(o) for o in outputs],
                                       length=int(rec.pop("length", 0)),
                                       answer_prefix=rec.pop("answer_prefix", ""), extra=rec))
            if limit and len(samples) >= limit:
                break
    if not samples:
        raise ValueError(f"{path}: no RULER records")
    return samples


def score_ruler(samples: list[RulerSample], predictor: Predictor, metric: str = "all",
                progress: Optional[Callable[[], None]] = None) -> tuple[list[dict], list[dict]]:
    """Per-length rows (score x100, n) plus an "all" row, and per-sample records."""
    if metric not in METRICS:
        raise ValueError(f"RULER metric must be one of {sorted(METRICS)}, got {metric!r}")
    fn = METRICS[metric]
    by_len: dict[int, list[float]] = defaultdict(list)
    records = []
    for i, s in enumerate(samples):
        pred = predictor(s.prompt())
        score = fn(pred, s.outputs)
        by_len[s.length].append(score)
        records.append({"index": s.extra.get("index", i), "length": s.length,
                        "prediction": pred, "outputs": s.outputs, "score": score})
        if progress:
            progress()
    rows = [{"length": k, "n": len(v), "score": round(100 * sum(v) / len(v), 2)}
            for k, v in sorted(by_len.items())]
    every = [r["score"] for r in records]
    rows.append({"length": "all", "n": len(every),
                 "score": round(100 * sum(every) / len(every), 2)})
    return rows, records
