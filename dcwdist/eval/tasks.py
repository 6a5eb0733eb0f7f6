"""Retrieval and QA tasks scored through a predictor callable: needle, key-value, synthetic QA.

A predictor maps a `Prompt` (instruction + document) to the answer text; the model's is
`dcwdist.eval.generate.ModelPredictor`, tests pass oracles. Lengths count prompt tokens
(instruction + document + the format's special tokens) under the given tokenizer; depth is where
the needle sits in the document, as a fraction of its tokens (0 = start, 1 = end).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from dcwdist.data_pipelines.synthetic import TOPICS, _filler, make_example
from dcwdist.eval.metrics import qa_scores, string_match_all

PROMPT_OVERHEAD = 3
"""Special tokens of the prompt format: <instr> ... <doc> ... <answer>."""


@dataclass
class Prompt:
    """What a predictor sees; `answer` and `facts` are for scoring only."""

    instruction: str
    document: str
    answer: str = ""
    facts: dict = field(default_factory=dict)
    length: int = 0
    """Target prompt length in tokens (the grid's column)."""
    depth: float = 0.0
    """Relative depth of the needle in the document (the grid's row)."""
    relevant_spans: list = field(default_factory=list)
    """[start, end) character spans of the document that answer the instruction (the labels
    an oracle scorer reads)."""


def _span_of(doc: str, needle: str) -> list:
    at = doc.find(needle)
    return [] if at < 0 else [(at, at + len(needle))]


Predictor = Callable[[Prompt], str]


def _n_tokens(tok, text: str) -> int:
    return len(tok.encode(text))


def _filled(rng: np.random.Generator, tok, room: int, depth: float,
            sentence: Callable[[np.random.Generator], str]) -> tuple[list[str], int]:
    """Filler sentences totalling at most `room` tokens, and the index of the sentence boundary
    nearest to depth * (their tokens): where the needle goes."""
    parts, used = [], 0
    while True:
        s = sentence(rng)
        n = _n_tokens(tok, s)
        if used + n > room:
            break
        parts.append(s)
        used += n
    cum, at = 0, len(parts)
    for i, s in enumerate(parts):
        if cum >= depth * used:
            at = i
            break
        cum += _n_tokens(tok, s)
    return parts, at


def _haystack(rng: np.random.Generator, tok, budget: int, needle: str, depth: float,
              sentence: Callable[[np.random.Generator], str]) -> str:
    """Filler sentences totalling ~`budget` tokens with `needle` inserted at relative `depth`."""
    parts, at = _filled(rng, tok, max(0, budget - _n_tokens(tok, needle)), depth, sentence)
    return "".join(parts[:at] + [needle] + parts[at:])


def needle_prompt(tok, length: int, depth: float, seed: int, index: int = 0) -> Prompt:
    """Needle in a haystack: one 'special magic number' sentence hidden in contract filler."""
    rng = np.random.default_rng([seed, length, int(depth * 1000), index, 11])
    key = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=6))
    value = str(int(rng.integers(1000, 10000)))
    needle = f"The special magic number for {key} is {value}. "
    instruction = f"What is the special magic number for {key}?"
    budget = length - PROMPT_OVERHEAD - _n_tokens(tok, instruction)
    doc = _haystack(rng, tok, budget, needle, depth, _filler)
    return Prompt(instruction, doc, answer=f" {value}", facts={key: value}, length=length,
                  depth=depth, relevant_spans=_span_of(doc, needle))


def kv_prompt(tok, length: int, depth: float, seed: int, index: int = 0) -> Prompt:
    """Key-value retrieval: a JSON-like list of random hex keys -> values; ask for one key."""
    rng = np.random.default_rng([seed, length, int(depth * 1000), index, 13])
    def hexkey(r: np.random.Generator) -> str:
        return "".join("0123456789abcdef"[int(c)] for c in r.integers(0, 16, size=8))

    facts: dict[str, str] = {}

    def pair(r: np.random.Generator) -> str:
        k, v = hexkey(r), str(int(r.integers(1000, 10000)))
        facts[k] = v
        return f'"{k}": "{v}", '

    key, value = hexkey(rng), str(int(rng.integers(1000, 10000)))
    instruction = f'What is the value of key "{key}"?'
    budget = length - PROMPT_OVERHEAD - _n_tokens(tok, instruction)
    doc = _haystack(rng, tok, budget, f'"{key}": "{value}", ', depth, pair)
    facts[key] = value
    return Prompt(instruction, doc, answer=f" {value}", facts=facts, length=length, depth=depth,
                  relevant_spans=_span_of(doc, f'"{key}": "{value}", '))


def fact_prompt(tok, length: int, depth: float, seed: int, index: int = 0) -> Prompt:
    """The training task with the fact at a chosen depth: one 'The {topic} value of {key} is
    {value}.' sentence among the training filler, in numbered sections, asked about with the
    training's specific instruction. Prompt + answer + <eos> fit in `length` tokens, so a
    teacher-forced row of `length` holds it whole (`dcwdist.eval.positions.AnswerLoss`)."""
    rng = np.random.default_rng([seed, length, int(depth * 1000), index, 17])
    topic = TOPICS[int(rng.integers(len(TOPICS)))]
    key = f"{chr(65 + rng.integers(26))}{chr(65 + rng.integers(26))}-{rng.integers(10, 100)}"
    value = str(int(rng.integers(1000, 10000)))
    fact = f"The {topic} value of {key} is {value}. "

    def name(i: int) -> str:
        return f"{i // 4 + 1}.{i % 4 + 1}"

    n_sec = max(1, length // 400)  # training documents: a section per ~400 characters
    longest = f"What is the {topic} value of {key} in section {name(n_sec - 1)}?"
    headers = sum(_n_tokens(tok, f"Section {name(i)}. \n") for i in range(n_sec))
    room = (length - PROMPT_OVERHEAD - _n_tokens(tok, longest) - _n_tokens(tok, f" {value}")
            - 1 - headers - _n_tokens(tok, fact))  # 1: <eos>
    sentences, at = _filled(rng, tok, room, depth, _filler)
    sentences.insert(at, fact)
    n_sec = min(n_sec, len(sentences))
    per = -(-len(sentences) // n_sec)
    parts, section = [], 0
    for i in range(n_sec):
        chunk = sentences[i * per:(i + 1) * per]
        if i * per <= at < (i + 1) * per:
            section = i
        parts.append(f"Section {name(i)}. " + "".join(chunk) + "\n")
    doc = "".join(parts)
    instruction = f"What is the {topic} value of {key} in section {name(section)}?"
    return Prompt(instruction, doc, answer=f" {value}", facts={key: value}, length=length,
                  depth=depth, relevant_spans=_span_of(doc, fact.rstrip()))


def qa_prompt(tok, length: int, seed: int, index: int, num_facts: int = 4,
              specificity: str = "specific", style: str = "basic", hops: int = 1) -> Prompt:
    """A held-out synthetic document QA example (the training generator on a disjoint seed)."""
    probe = make_example(seed, index, 64, num_facts, specificity, style=style, hops=hops)
    budget = length - PROMPT_OVERHEAD - _n_tokens(tok, probe.instruction)
    chars = max(16, budget)
    for _ in range(4):  # the generator overshoots its target: shrink and retry (as the stream)
        ex = make_example(seed, index, chars, num_facts, specificity, style=style, hops=hops)
        over = _n_tokens(tok, ex.document) - budget
        if over <= 0 or chars <= 16:
            break
        chars = max(16, chars - over - 16)
    return Prompt(ex.instruction, ex.document, answer=ex.answer, facts=dict(ex.facts),
                  length=length, relevant_spans=list(ex.relevant_spans))


GridBuilder = Callable[..., Prompt]


def retrieval_grid(predictor: Predictor, tok, builder: GridBuilder, lengths: Iterable[int],
                   depths: Iterable[float], seed: int, samples: int = 1,
                   progress: Optional[Callable[[], None]] = None,
                   answer_loss: Optional[Callable[[Prompt], float]] = None) -> list[dict]:
    """Score `predictor` on every (length, depth) cell; rows carry score in [0, 1] per cell.

    Scoring is RULER's string match: the cell scores the share of samples whose prediction
    contains the needle's value. With `answer_loss` (prompt -> teacher-forced loss of its
    answer, nats/token) rows also carry the mean of that: it shows how far a model is from
    retrieving long before its greedy answers are right.
    """
    rows = []
    for length in lengths:
        for depth in depths:
            hits, losses = [], []
            for i in range(samples):
                prompt = builder(tok, length, depth, seed, i)
                hits.append(string_match_all(predictor(prompt), [prompt.answer.strip()]))
                if answer_loss is not None:
                    losses.append(answer_loss(prompt))
                if progress:
                    progress()
            row = {"length": length, "depth": depth, "score": float(np.mean(hits))}
            if losses:
                row["answer_loss"] = float(np.mean(losses))
            rows.append(row)
    return rows


def qa_eval(predictor: Predictor, tok, lengths: Iterable[int], seed: int, samples: int,
            progress: Optional[Callable[[], None]] = None, **gen) -> tuple[list[dict], list[dict]]:
    """EM / F1 / ROUGE-L / hallucination per length, and the per-answer records."""
    rows, records = [], []
    for length in lengths:
        per = []
        for i in range(samples):
            prompt = qa_prompt(tok, length, seed, i, **gen)
            pred = predictor(prompt)
            s = qa_scores(pred, prompt.answer, prompt.facts)
            per.append(s)
            records.append({"length": length, "index": i, "prediction": pred,
                            "answer": prompt.answer, **s})
            if progress:
                progress()
        n_assert = sum(s["asserts_value"] for s in per)
        rows.append({"length": length, "n": len(per),
                     "em": round(100 * float(np.mean([s["em"] for s in per])), 2),
                     "f1": round(100 * float(np.mean([s["f1"] for s in per])), 2),
                     "rouge_l": round(100 * float(np.mean([s["rouge_l"] for s in per])), 2),
                     "hallucination_rate": round(100 * float(np.mean(
                         [s["hallucinated"] for s in per])), 2),
                     "answers_with_value": int(n_assert)})
    return rows, records
