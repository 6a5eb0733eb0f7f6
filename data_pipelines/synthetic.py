"""Seeded synthetic long documents with embedded key sections (seed 000, section 2.2).

Each example is an instruction, a document of numbered sections of varied filler with a few
key facts ("The settlement value of KEY-17 is 4821.") planted in random sections, and an answer.
Per-character relevance labels mark exactly the fact sentence the instruction asks about;
`facts` lists every key -> value the document supports (for hallucination scoring).
Everything is a pure function of (seed, index): the stream resumes from any sample index.

style="rich" (or hops > 1) gives seed 000's fuller setting: sections with headings in three
filler genres and key sections of three kinds -- fact sentences, lettered clauses and value
tables -- plus multi-hop questions whose key is defined by a cross-reference to another key
("The audit value of AB-12 equals the value of CD-34."). Relevance marks exactly the key sections
on the answer's chain (the link sentences and the final value's sentence, clause or table row).
Lengths are in characters (= byte-tokenizer tokens for this ASCII text).
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
STYLES = ("basic", "rich", "copy")
CODE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
GENRES = (
    (("the committee", "the working group", "the chair", "the secretary", "members present",
      "the minutes", "the treasurer", "the agenda"),
     ("noted that", "agreed that", "asked whether", "recorded that", "confirmed that"),
     ("the item was deferred", "no objection was raised", "the budget stays unchanged",
      "the vote will follow", "a summary will circulate")),
    (("the controller", "the firmware", "each node", "the scheduler", "the cache",
      "the interface", "the sensor array", "the build"),
     ("reports", "retries", "buffers", "validates", "logs"),
     ("every incoming frame", "stale entries", "the default timeout", "checksum errors",
      "the configured limit")),
)
HEADINGS = ("General terms", "Definitions", "Obligations", "Schedules", "Reporting",
            "Operations", "Remedies", "Miscellaneous")


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
                 specificity: str = "specific", *, style: str = "basic",
                 hops: int = 1) -> Example:
    """One example whose document has about `doc_chars` characters.

    style="basic", hops=1 is the original generator (its output is pinned); "rich" adds
    clauses, value tables and filler genres; hops >= 2 asks through a chain of cross-references.
    """
    if specificity not in SPECIFICITY:
        raise ValueError(f"specificity must be one of {SPECIFICITY}, got {specificity!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not 1 <= hops <= 4:
        raise ValueError(f"hops must be in 1..4, got {hops}")
    if style == "copy":
        return copy_example(seed, index, doc_chars)
    if style == "rich" or hops > 1:
        return rich_example(seed, index, doc_chars, num_facts, specificity, hops)
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


def copy_example(seed: int, index: int, doc_chars: int) -> Example:
    """A code of 8-32 random capitals and digits in the training filler; the answer repeats it.

    The key-section answer is four digits, so a model learns to copy from six answer tokens per
    document: the copy circuit (find the value, then follow it token by token) forms late and
    by chance (benchmarks/results/quality.md, trials 6-10). Here every answer token but the
    first is such a copy step, so a short first stage of these builds the circuit."""
    rng = np.random.default_rng([seed, index, 23])
    code = "".join(CODE_CHARS[int(c)] for c in rng.integers(0, len(CODE_CHARS),
                                                             size=int(rng.integers(8, 33))))
    fact = f"The code is {code}. "
    room = max(0, doc_chars - len(fact))
    sentences, used = [], 0
    while True:
        sent = _filler(rng)
        if used + len(sent) > room:
            break
        sentences.append(sent)
        used += len(sent)
    at = int(rng.integers(0, len(sentences) + 1))
    start = sum(len(x) for x in sentences[:at])
    document = "".join(sentences[:at] + [fact] + sentences[at:])
    return Example(instruction="What is the code?", document=document, answer=f" {code}",
                   relevant_spans=[(start, start + len(fact) - 1)], facts={"code": code},
                   specificity="specific")


def _genre_sentence(rng: np.random.Generator, genre: int) -> str:
    if genre == 0:
        return _filler(rng)
    subj, verb, obj = GENRES[genre - 1]
    s = f"{subj[rng.integers(len(subj))]} {verb[rng.integers(len(verb))]} " \
        f"{obj[rng.integers(len(obj))]}. "
    return s[0].upper() + s[1:]


def _key(rng: np.random.Generator, taken: set) -> str:
    while True:
        k = f"{chr(65 + rng.integers(26))}{chr(65 + rng.integers(26))}-{rng.integers(10, 100)}"
        if k not in taken:
            taken.add(k)
            return k


def rich_example(seed: int, index: int, doc_chars: int, num_facts: int = 4,
                 specificity: str = "specific", hops: int = 1) -> Example:
    """Seed 000's setting: genres, clauses, value tables, multi-hop chains (see module doc)."""
    rng = np.random.default_rng([seed, index, 2])
    num_facts = min(max(num_facts, hops), len(TOPICS))
    topics = rng.choice(len(TOPICS), size=num_facts, replace=False)
    taken: set = set()
    keys = [_key(rng, taken) for _ in range(num_facts)]
    values = [str(rng.integers(1000, 10000)) for _ in range(num_facts)]
    # The answer's chain: keys[0] -> keys[1] -> ... -> keys[hops-1], which holds the value.
    facts = {keys[f]: values[hops - 1 if f < hops else f] for f in range(num_facts)}
    items = []  # (text, relevant [start, end) within text or None, fact)
    for f in range(num_facts):
        topic = TOPICS[topics[f]]
        on_chain = f < hops
        if f < hops - 1:
            text = f"The {topic} value of {keys[f]} equals the value of {keys[f + 1]}. "
            items.append((text, (0, len(text) - 1), f))
            continue
        kind = int(rng.integers(3))
        if kind == 0:
            text = f"The {topic} value of {keys[f]} is {values[f]}. "
            rel = (0, len(text) - 1)
        elif kind == 1:
            text = (f"Clause {rng.integers(1, 30)}({chr(97 + rng.integers(8))}): the {topic} "
                    f"value of {keys[f]} shall be {values[f]}. ")
            rel = (0, len(text) - 1)
        else:
            rows = [(k, str(rng.integers(1000, 10000)), False)
                    for k in (_key(rng, taken) for _ in range(int(rng.integers(2, 5))))]
            rows.insert(int(rng.integers(len(rows) + 1)), (keys[f], values[f], True))
            text = f"\nTable {rng.integers(1, 20)}: {topic} values\n| key | value |\n"
            for k, v, mine in rows:
                row = f"| {k} | {v} |"
                if mine:
                    rel = (len(text), len(text) + len(row))
                else:
                    facts[k] = v
                text += row + "\n"
        items.append((text, rel if on_chain else None, f))
    num_sections = max(1, doc_chars // 600)
    where = rng.choice(num_sections, size=len(items), replace=num_sections < len(items))
    per_section = max(1, doc_chars // num_sections)
    parts, spans, names, pos = [], [], [], 0
    for s in range(num_sections):
        name = f"{s // 4 + 1}.{s % 4 + 1}"
        names.append(name)
        header = f"{name} {HEADINGS[rng.integers(len(HEADINGS))]}. "
        parts.append(header)
        pos += len(header)
        genre = int(rng.integers(3))
        pending = [it for i, it in enumerate(items) if where[i] == s]
        slot, n = int(rng.integers(0, 3)), 0
        end = (s + 1) * per_section  # a global target, so sentence overshoot does not add up
        while pos < end or pending:
            if pending and (n >= slot or pos >= end):
                text, rel, _ = pending.pop(0)
                if rel is not None:
                    spans.append((pos + rel[0], pos + rel[1]))
            else:
                text = _genre_sentence(rng, genre)
            parts.append(text)
            pos += len(text)
            n += 1
        parts.append("\n")
        pos += 1
    topic = TOPICS[topics[0]]
    if specificity == "specific":
        instruction = (f"What is the {topic} value of {keys[0]} in section "
                       f"{names[where[0]]}?")
    elif specificity == "keyed":
        instruction = f"What is the value of {keys[0]}?"
    else:
        instruction = f"What does the document say about {topic}?"
    if hops > 1:
        instruction += " Follow the cross-references."
    return Example(instruction=instruction, document="".join(parts), answer=f" {facts[keys[0]]}",
                   relevant_spans=sorted(spans), facts=facts, specificity=specificity)


def write_synthetic(out: str, n: int, min_len: int, max_len: int, seed: int = 0, *,
                    num_facts: int = 4, specificity: str = "mixed", style: str = "rich",
                    hops: int = 1) -> int:
    """Write `n` synthetic examples as jsonl; document lengths uniform in [min_len, max_len]
    characters (= byte tokens). specificity "mixed" cycles specific / keyed / vague; hops 0 mixes
    single- and two-hop questions. Every example is a pure function of (seed, i)."""
    from dcwdist.data_pipelines.sources import write_jsonl
    if not 16 <= min_len <= max_len:
        raise ValueError(f"need 16 <= min_len <= max_len, got {min_len}, {max_len}")

    def examples():
        for i in range(n):
            length = int(np.random.default_rng([seed, i, 1]).integers(min_len, max_len + 1))
            spec = SPECIFICITY[i % 3] if specificity == "mixed" else specificity
            yield make_example(seed, i, length, num_facts, spec, style=style,
                               hops=hops or 1 + i % 2)
    return write_jsonl(out, examples())
