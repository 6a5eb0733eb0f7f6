"""`dcwdist data` commands end to end on tiny sizes."""
import json
import os
import subprocess
import sys

import pytest

from dcwdist.data_pipelines.cli import main, size
from dcwdist.data_pipelines.shards import MemmapRows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dcwdist.data_pipelines.cli", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1"})


def test_size_suffixes():
    assert (size("2k"), size("32K"), size("1m"), size("300"), size("1.5k")) == \
        (2048, 32768, 1 << 20, 300, 1536)


def test_synth_then_prepare_subprocess(tmp_path):
    syn, shards = tmp_path / "syn.jsonl", tmp_path / "shards"
    r = _cli("synth", str(syn), "--n", "8", "--min-len", "1k", "--max-len", "2k", "--seed", "3")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in syn.read_text().splitlines()]
    assert len(recs) == 8 and all(1024 <= len(x["document"]) <= 2200 for x in recs)
    r = _cli("prepare", str(syn), str(shards), "--tokenizer", "byte", "--seq-len", "1k")
    assert r.returncode == 0, r.stderr
    assert "8 documents" in r.stdout and "tokenizing" in r.stderr  # the tqdm bar
    rows = MemmapRows(str(shards), 1024, 16, eval_fraction=0.0, tokenizer="byte")
    assert rows.batch(0, 2).tokens.shape == (2, 1024) and rows.batch(0, 2).relevance.sum() > 0
    r = _cli("prepare", str(tmp_path / "org/no-such-dataset"), str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "org/no-such-dataset" in r.stderr and not (tmp_path / "x").exists()


def test_tokenizer_train_then_prepare(tmp_path, capsys):
    syn = tmp_path / "syn.jsonl"
    assert main(["synth", str(syn), "--n", "6", "--min-len", "600", "--max-len", "900"]) == 0
    tok = tmp_path / "tok" / "tokenizer.json"
    assert main(["tokenizer", "train", str(syn), str(tok), "--vocab-size", "400"]) == 0
    assert main(["prepare", str(syn), str(tmp_path / "sh"), "--tokenizer", str(tok),
                 "--seq-len", "512", "--quiet"]) == 0
    index = json.loads((tmp_path / "sh" / "index.json").read_text())
    assert index["tokenizer"]["name"] == str(tok) and index["tokenizer"]["vocab_size"] == 400
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    assert main(["prepare", str(bad), str(tmp_path / "y"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{bad}:2: malformed JSON (Expecting value at column 10)")


def test_help_mentions_commands():
    with pytest.raises(SystemExit):
        main(["--help"])
    r = _cli("tokenizer", "train", "--help")
    assert r.returncode == 0 and "--vocab-size" in r.stdout
