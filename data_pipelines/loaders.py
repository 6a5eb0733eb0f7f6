"""Readers for local copies of the long-context sets seed 000 names, in the format each
publishes, mapped to the instruction / document / answer schema (synthetic.Example).

- CUAD: SQuAD-style json ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}); answer
  character offsets become relevance spans.
- LegalBench: a task folder or file of tsv/jsonl rows with "text" and "answer" (and "question"
  where the task has one; otherwise the instruction names the task).
- SCROLLS: jsonl with "input" / "output"; for QA tasks the input is "question\\n\\ndocument",
  for summarisation tasks (gov_report, summ_screen_fd) it is the document.
- L-Eval: jsonl with "input", "instructions" [...] and "outputs" [...]: one example per pair.
- NaturalQuestions (simplified): jsonl(.gz) with "document_text" (space-separated tokens),
  "question_text" and "annotations"; the long answer becomes the relevance span, the answer is
  the short answer(s), else yes/no, else the long answer; unanswered questions are skipped.
Nothing here contacts a hub: every path is a local copy (sources.local_files checks it).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator

from dcwdist.data_pipelines.sources import DataError, iter_examples, load_records, local_files
from dcwdist.data_pipelines.synthetic import Example

SUMMARY_TASKS = ("gov_report", "govreport", "summ_screen", "qmsum_summary")


def _ex(instruction, document, answer, spans=()) -> Example:
    return Example(instruction=str(instruction), document=str(document), answer=f" {answer}",
                   relevant_spans=list(spans), specificity="")


def load_cuad(path: str) -> Iterator[Example]:
    """One example per question of each contract (SQuAD v2 layout)."""
    for f in local_files(path):
        try:
            with open(f, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise DataError(f"{f}:{e.lineno}: malformed JSON ({e.msg})") from None
        for article in data.get("data", []):
            for para in article.get("paragraphs", []):
                ctx = para["context"]
                for qa in para.get("qas", []):
                    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                    spans = sorted({(a["answer_start"], a["answer_start"] + len(a["text"]))
                                    for a in answers})
                    text = "; ".join(ctx[s:e] for s, e in spans) if spans else "None"
                    yield _ex(qa["question"], ctx, text, spans)


def load_legalbench(path: str, text_field: str = "text",
                    answer_field: str = "answer") -> Iterator[Example]:
    """Rows of one LegalBench task (train.tsv / test.tsv / jsonl)."""
    task = os.path.basename(os.path.normpath(path if os.path.isdir(path)
                                             else os.path.dirname(os.path.abspath(path))))
    for i, rec in enumerate(load_records(path)):
        if text_field not in rec or answer_field not in rec:
            raise DataError(f"{path}: row {i} lacks {text_field!r} or {answer_field!r} "
                            f"(has {sorted(rec)})")
        question = rec.get("question") or f"LegalBench task {task}: answer for the text below."
        yield _ex(question, rec[text_field], rec[answer_field])


def load_scrolls(path: str, task: str | None = None) -> Iterator[Example]:
    """SCROLLS jsonl; `task` defaults to the file or folder name (e.g. gov_report, qasper)."""
    name = (task or os.path.basename(os.path.normpath(path))).lower()
    summary = any(t in name for t in SUMMARY_TASKS)
    for rec in load_records(path):
        text, output = rec["input"], rec.get("output") or ""
        if summary:
            yield _ex("Summarize the document.", text, output)
        else:
            question, sep, document = text.partition("\n\n")
            if not sep:
                raise DataError(f"{path}: SCROLLS QA input {rec.get('id')!r} has no blank line "
                                "between question and document; pass task= a summary task?")
            yield _ex(question.strip(), document, output)


def load_leval(path: str) -> Iterator[Example]:
    """L-Eval jsonl: each document with several instructions and their reference outputs."""
    for rec in load_records(path):
        outputs = rec.get("outputs") or []
        for k, instruction in enumerate(rec.get("instructions") or []):
            yield _ex(instruction, rec["input"], outputs[k] if k < len(outputs) else "")


def load_natural_questions(path: str) -> Iterator[Example]:
    """NaturalQuestions simplified jsonl(.gz)."""
    for rec in load_records(path):
        words = rec["document_text"].split(" ")
        starts, pos = [], 0
        for w in words:
            starts.append(pos)
            pos += len(w) + 1

        def span(a, b):  # token range [a, b) -> character range
            return starts[a], starts[b - 1] + len(words[b - 1])

        answer, spans = None, []
        for ann in rec.get("annotations") or []:
            la = ann.get("long_answer") or {}  # Arrow fills absent fields with None
            a, b = la.get("start_token"), la.get("end_token")
            if a is not None and b is not None and 0 <= a < b:
                spans = [span(a, b)]
            shorts = [" ".join(words[s["start_token"]:s["end_token"]])
                      for s in ann.get("short_answers") or []]
            if shorts:
                answer = "; ".join(shorts)
            elif (ann.get("yes_no_answer") or "NONE") != "NONE":
                answer = ann["yes_no_answer"].lower()
            elif spans:
                answer = rec["document_text"][spans[0][0]:spans[0][1]]
            if answer:
                break
        if answer:
            yield _ex(rec["question_text"], rec["document_text"], answer, spans)


FORMATS: dict[str, Callable[[str], Iterator]] = {
    "records": iter_examples, "cuad": load_cuad, "legalbench": load_legalbench,
    "scrolls": load_scrolls, "leval": load_leval, "natural_questions": load_natural_questions,
}


def iter_source(path: str, fmt: str = "records") -> Iterator:
    """Examples (or plain texts) of `path` read in format `fmt` (one of FORMATS)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose from {sorted(FORMATS)}")
    return FORMATS[fmt](path)
