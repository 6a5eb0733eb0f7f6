"""Local sources through `datasets`: formats, folders, offline errors in one line."""
import json

import pandas as pd
import pytest

from dcwdist.data_pipelines.sources import DataError, iter_examples, load_records


def test_malformed_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(DataError) as err:
        list(load_records(str(f)))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{f}:3: malformed JSON")


def test_hub_name_without_local_copy_is_one_line_error():
    with pytest.raises(FileNotFoundError, match="never fetched") as err:
        list(load_records("allenai/c4"))
    assert "allenai/c4" in str(err.value) and "\n" not in str(err.value)


def test_formats_and_folders(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    (d / "sub" / "b.json").write_text(json.dumps([{"text": "doc 3"}, {"text": "doc 4"}]))
    assert [r["text"] for r in load_records(str(d))] == [f"doc {i}" for i in range(5)]
    pq = tmp_path / "p.parquet"
    pd.DataFrame({"instruction": ["q"], "document": ["the doc"], "answer": [" a"]}).to_parquet(pq)
    (ex,) = iter_examples(str(pq))
    assert (ex.instruction, ex.document, ex.answer) == ("q", "the doc", " a")
    txt = tmp_path / "t.txt"
    txt.write_text("line one\nline two\n")
    assert list(iter_examples(str(txt))) == ["line one", "line two"]
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "x.txt").write_text("x\n")
    (tmp_path / "mixed" / "y.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(DataError, match="mixed"):
        list(load_records(str(tmp_path / "mixed")))


def test_unknown_schema_is_named(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"record 0: fields \['body'\]"):
        list(iter_examples(str(f)))
