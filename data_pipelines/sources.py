"""Local record sources through `datasets`: json / jsonl / parquet / text / csv / tsv files or
folders of them, streamed so corpora larger than memory work. Never contacts a hub.

A record is one of two schemas: {"text": ...} (a plain document for language modelling) or
{"instruction", "document", "answer"[, "relevant_spans", "facts"]} (an instruction example, e.g.
written by `write_synthetic` or a loader in loaders.py).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterator

from dcwdist.data_pipelines.synthetic import Example

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
            ".text": "text", ".csv": "csv", ".tsv": "csv"}


def _ext(path: str) -> str:
    """The data extension, looking through a compression suffix (x.jsonl.gz -> .jsonl)."""
    base, ext = os.path.splitext(path.lower())
    return os.path.splitext(base)[1] if ext in (".gz", ".bz2", ".xz", ".zst") else ext


class DataError(ValueError):
    """A one-line, user-facing problem with input data (names the file and, where known, line)."""


def local_files(path: str) -> list[str]:
    """The data files at `path` (a file, or a folder searched recursively), sorted."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} is not a local file or folder (hub dataset names are never fetched: "
            "download a local copy and pass its path)")
    if os.path.isfile(path):
        return [path]
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if _ext(f) in BUILDERS)
    if not found:
        raise DataError(f"{path}: no data files ({', '.join(sorted(BUILDERS))}) in this folder")
    return found


def _builder(files: list[str]) -> tuple[str, dict]:
    exts = {_ext(f) for f in files}
    builders = {BUILDERS.get(e) for e in exts}
    if None in builders or len(builders) != 1:
        raise DataError(f"mixed or unknown file types {sorted(exts)}; use one of "
                        f"{sorted(BUILDERS)} per source")
    name = builders.pop()
    return name, ({"delimiter": "\t"} if exts == {".tsv"} else {})


def load_records(path: str, streaming: bool = True) -> Iterator[dict]:
    """Yield the records of the local file(s) at `path` in order (offline; streamed by default)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    files = local_files(path)
    name, kwargs = _builder(files)
    import datasets
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)  # parse errors are re-raised below as one line
    try:
        for f in files:  # one file at a time, so an error can name its file
            try:
                yield from datasets.load_dataset(name, data_files=[f], split="train",
                                                 streaming=streaming, **kwargs)
            except (DataError, FileNotFoundError):
                raise
            except Exception as e:  # noqa: BLE001 -- find the offending line
                if name == "json":
                    _raise_bad_json_line(f)
                raise DataError(f"{f}: cannot read as {name}: "
                                f"{str(e).splitlines()[0][:200]}") from e
    finally:
        log.setLevel(level)


def _raise_bad_json_line(path: str) -> None:
    import fsspec  # comes with datasets; opens compressed files too
    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as fh:
        text = fh.read()
    try:  # a single JSON document (not JSON lines)?
        json.loads(text)
        whole_ok = True
    except json.JSONDecodeError:
        whole_ok = False
    if not whole_ok:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") \
                    from None
    raise DataError(f"{path}: JSON that is neither one record per line nor a list of records")


def to_example(record: dict, where: str = "record") -> Example | str:
    """A record as an Example (instruction schema) or a str (plain-text schema)."""
    # Files mixing both schemas come back with every column; absent fields are None.
    if record.get("instruction") is not None and record.get("document") is not None:
        spans = [tuple(int(v) for v in s) for s in (record.get("relevant_spans") or [])]
        return Example(instruction=str(record["instruction"]), document=str(record["document"]),
                       answer=str(record.get("answer") or ""), relevant_spans=spans,
                       facts=_facts(record.get("facts")),
                       specificity=str(record.get("specificity") or ""))
    if record.get("text") is not None:
        return str(record["text"])
    fields = sorted(k for k, v in record.items() if v is not None)
    raise DataError(f"{where}: fields {fields} match no schema; expected 'text' or "
                    "'instruction' + 'document' + 'answer'")


def _facts(raw) -> dict:
    """facts as written: a list of [key, value] pairs (a stable Arrow type) or a dict."""
    pairs = raw.items() if isinstance(raw, dict) else (raw or [])
    return {str(k): str(v) for k, v in pairs if k is not None and v is not None}


def iter_examples(path: str) -> Iterator[Example | str]:
    """Records of `path` mapped by `to_example`."""
    for i, rec in enumerate(load_records(path)):
        yield to_example(rec, where=f"{path}: record {i}")


def write_jsonl(path: str, examples) -> int:
    """Write Examples (or dicts) as JSON lines; returns the count. Facts become [key, value]
    pairs: a dict whose keys differ per line would be read back by Arrow as one struct."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for ex in examples:
            rec = ex if isinstance(ex, dict) else {
                "instruction": ex.instruction, "document": ex.document, "answer": ex.answer,
                "relevant_spans": [list(s) for s in ex.relevant_spans],
                "facts": [[k, v] for k, v in ex.facts.items()],
                "specificity": ex.specificity}
            fh.write(json.dumps(rec) + "\n")
            n += 1
    return n
