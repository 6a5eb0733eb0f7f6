"""Loss by position bucket: does the model use long context (later positions get lower loss)?"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dcwdist.attention.context import ROLE_ANSWER, AttnContext
from dcwdist.data_pipelines.packing import IGNORE, Batch


def bucket_edges(max_len: int, first: int = 128, factor: int = 4) -> list[int]:
    """[0, 128, 512, 2048, ...] up to max_len (last edge = max_len)."""
    edges = [0]
    e = first
    while e < max_len:
        edges.append(e)
        e *= factor
    return edges + [max_len]


def context_for(batch: Batch) -> AttnContext:
    return AttnContext(doc_ids=batch.doc_ids, positions=batch.positions, roles=batch.roles,
                       cache={"relevance": batch.relevance})


@torch.no_grad()
def loss_by_position(model, batches: list[Batch], max_len: int, chunk: int = 1024,
                     totals: Optional[dict] = None) -> list[dict]:
    """Mean next-token loss per bucket of position-within-document, over all given batches.

    `totals` (optional dict) receives "loss" (all loss tokens) and "answer_loss" (tokens
    predicted at answer positions: the retrieval part of the synthetic task; NaN if none).
    """
    edges = bucket_edges(max_len)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.float64)
    ans_sum, ans_n = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in batches:
        hidden = model(batch.tokens, context_for(batch))
        for s in range(0, hidden.shape[1], chunk):
            logits = model.logits(hidden[:, s:s + chunk]).float()
            labels = batch.labels[:, s:s + chunk]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0),
                                                   reduction="none")
            valid = labels != IGNORE
            pos = batch.positions[:, s:s + chunk]
            idx = torch.bucketize(pos, torch.tensor(edges[1:-1], device=pos.device), right=True)
            sums.index_add_(0, idx[valid].cpu(), ce[valid].double().cpu())
            counts.index_add_(0, idx[valid].cpu(), torch.ones_like(ce[valid]).double().cpu())
            if batch.roles is not None:
                ans = valid & (batch.roles[:, s:s + chunk] == ROLE_ANSWER)
                ans_sum += float(ce[ans].double().sum())
                ans_n += int(ans.sum())
    model.train(was_training)
    if totals is not None:
        totals["loss"] = float(sums.sum() / counts.sum().clamp_min(1))
        totals["answer_loss"] = ans_sum / ans_n if ans_n else float("nan")
    table = []
    for i in range(len(edges) - 1):
        if counts[i] == 0:
            continue
        mean = float(sums[i] / counts[i])
        table.append({"positions": f"{edges[i]}-{edges[i + 1] - 1}", "tokens": int(counts[i]),
                      "loss": round(mean, 4), "ppl": round(math.exp(min(mean, 50.0)), 3)})
    return table


def format_table(rows: list[dict]) -> str:
    """Markdown table of dict rows (same keys)."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    line = lambda vals: "| " + " | ".join(str(v).rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(keys), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([r[k] for k in keys]) for r in rows]
    return "\n".join(out)


class AnswerLoss:
    """Teacher-forced loss of a prompt's answer (nats/token over the answer tokens and <eos>,
    as the training's eval/answer_loss): the prompt packed as one training row (same roles,
    relevance and document ids, so oracle tiers and answer_core see what they see in
    training), padded to the prompt's length rounded up to the attention block."""

    def __init__(self, model, tok, align: int = 1):
        self.model, self.tok, self.align = model, tok, align

    def __call__(self, prompt) -> float:
        from dcwdist.data_pipelines.packing import encode_example, pack_row
        from dcwdist.data_pipelines.synthetic import Example

        seg = encode_example(self.tok, Example(prompt.instruction, prompt.document, prompt.answer,
                                               list(prompt.relevant_spans)))
        n = max(len(seg.tokens), prompt.length)
        n += (-n) % self.align
        batch = pack_row([seg], n, self.align, self.tok.pad_id, "answer")
        totals: dict = {}
        loss_by_position(self.model, [batch.to(self.model.norm.weight.device)], n, totals=totals)
        return totals["answer_loss"]
