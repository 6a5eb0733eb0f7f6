"""Seeded synthetic long documents with embedded key sections (seed 000, section 2.2).

Each example is an instruction, a document of numbered sections of varied filler with a few
key facts ("The settlement value of KEY-17 is 4821.") planted in random sections, and an answer.
Per-character relevance labels mark exactly the fact sentence the instruction asks about;
`facts` lists every key -> value the document supports (for hallucination scoring).
Everything is a pure function of (seed, index): the stream resumes from any sample index.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOPICS = ("payment", "delivery", "warranty", "termination", "liability", "audit", "pricing",
          "renewal", "insurance", "licensing")
WORDS = ("the agreement", "each party", "the supplier", "the customer", "this section",
         "the schedule", "all notices", "the contractor", "the board", "such obligations",
         "the report", "the committee", "prior written consent", "the effective date",
         "reasonable efforts", "applicable law", "the annex", "the parties", "the records",
         "any dispute")
VERBS = ("shall remain", "may review", "will follow", "must describe", "is subject to",
         "does not limit", "continues under", "refers to", "is governed by", "shall include")
TAILS = ("in good faith", "without undue delay", "as set out below", "where practicable",
         "for the avoidance of doubt", "unless agreed otherwise", "at all times",
         "in the ordinary course", "to the extent permitted", "within the stated period")
SPECIFICITY = ("specific", "keyed", "vague")


@dataclass
class Example:
    instruction: str
    document: str
    answer: str
    relevant_spans: list[tuple[int, int]]
    """[start, end) character spans of the document that answer the instruction."""
    facts: dict[str, str] = field(default_factory=dict)
    specificity: str = "specific"


def _filler(rng: np.random.Generator) -> str:
    s = f"{WORDS[rng.integers(len(WORDS))]} {VERBS[rng.integers(len(VERBS))]} " \
        f"{WORDS[rng.integers(len(WORDS))]} {TAILS[rng.integers(len(TAILS))]}. "
    return s[0].upper() + s[1:]


def make_example(seed: int, index: int, doc_chars: int, num_facts: int = 4,
                 specificity: str = "specific") -> Example:
    """One example whose document has about `doc_chars` characters."""
    if specificity not in SPECIFICITY:
        raise ValueError(f"specificity must be one of {SPECIFICITY}, got {specificity!r}")
    rng = np.random.default_rng([seed, index])
    topics = rng.choice(len(TOPICS), size=num_facts, replace=False)
    keys = [f"{chr(65 + rng.integers(26))}{chr(65 + rng.integers(26))}-{rng.integers(10, 100)}"
            for _ in range(num_facts)]
    values = [str(rng.integers(1000, 10000)) for _ in range(num_facts)]
    target = int(rng.integers(num_facts))
    # Sections are built first so facts can land anywhere, then filled up to the length.
    num_sections = max(1, doc_chars // 400)
    fact_section = rng.choice(num_sections, size=num_facts, replace=num_sections < num_facts)
    per_section = max(1, doc_chars // num_sections)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    section_names = []
    pos = 0
    for s in range(num_sections):
        name = f"{s // 4 + 1}.{s % 4 + 1}"
        section_names.append(name)
        header = f"Section {name}. "
        parts.append(header)
        pos += len(header)
        body_start = pos
        facts_here = [f for f in range(num_facts) if fact_section[f] == s]
        slot = int(rng.integers(0, 3))
        n = 0
        while pos - body_start < per_section or facts_here:
            # Over budget, pending facts go in without more filler (keeps lengths near target).
            if facts_here and (n >= slot or pos - body_start >= per_section):
                f = facts_here.pop(0)
                sent = f"The {TOPICS[topics[f]]} value of {keys[f]} is {values[f]}. "
                if f == target:
                    spans.append((pos, pos + len(sent) - 1))
                parts.append(sent)
            else:
                sent = _filler(rng)
                parts.append(sent)
            pos += len(sent)
            n += 1
        parts.append("\n")
        pos += 1
    document = "".join(parts)
    topic = TOPICS[topics[target]]
    if specificity == "specific":
        sec = section_names[fact_section[target]]
        instruction = f"What is the {topic} value of {keys[target]} in section {sec}?"
    elif specificity == "keyed":
        instruction = f"What is the value of {keys[target]}?"
    else:
        instruction = f"What does the document say about {topic}?"
    return Example(instruction=instruction, document=document, answer=f" {values[target]}",
                   relevant_spans=spans, facts=dict(zip(keys, values)), specificity=specificity)
