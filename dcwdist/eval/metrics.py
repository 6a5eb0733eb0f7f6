"""Answer metrics: SQuAD exact match / F1, ROUGE-L, RULER string match, hallucinated values.

All take plain strings (a prediction and one reference or a list of references) and return
floats in [0, 1]; the suites average them and report percentages.
"""
from __future__ import annotations

import collections
import re
import string
from functools import lru_cache
from typing import Iterable, Mapping

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_VALUE = re.compile(r"(?<!\d)\d{4}(?!\d)")
"""A value the synthetic documents plant: a 4-digit number (not part of a longer number)."""


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, squash whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    """SQuAD token F1 of the normalised answers (0 when either is empty, unless both are)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # an optional test/eval dependency
        raise ImportError("ROUGE-L needs the rouge-score package: pip install rouge-score") from e
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), from the rouge-score package."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def string_match_all(prediction: str, references: Iterable[str]) -> float:
    """RULER's metric: fraction of references found in the prediction (case-insensitive)."""
    refs = list(references)
    if not refs:
        return 0.0
    pred = prediction.lower()
    return sum(r.lower() in pred for r in refs) / len(refs)


def string_match_part(prediction: str, references: Iterable[str]) -> float:
    """RULER's QA metric: 1 if any reference is found in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


def asserted_values(text: str) -> list[str]:
    """The 4-digit values a text asserts."""
    return _VALUE.findall(text)


def hallucinated(prediction: str, facts: Mapping[str, str]) -> bool:
    """True when the prediction asserts a value that no fact of the document supports."""
    supported = set(facts.values())
    return any(v not in supported for v in asserted_values(prediction))


def qa_scores(prediction: str, reference: str, facts: Mapping[str, str]) -> dict:
    """Every per-answer QA metric at once (the suite averages them)."""
    return {"em": exact_match(prediction, reference), "f1": f1_score(prediction, reference),
            "rouge_l": rouge_l(prediction, reference),
            "asserts_value": float(bool(asserted_values(prediction))),
            "hallucinated": float(hallucinated(prediction, facts))}
