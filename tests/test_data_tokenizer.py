"""Tokenizers: BPE training/loading with the DCW specials; relevance follows BPE offsets."""
import pytest

from dcwdist.data_pipelines.packing import encode_example
from dcwdist.data_pipelines.synthetic import make_example
from dcwdist.data_pipelines.tokenizer import (SPECIALS, BPETokenizer, ByteTokenizer,
                                              build_tokenizer, train_bpe)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    texts = [make_example(0, i, 3000, style="rich").document for i in range(20)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(texts, vocab_size=600, out_path=str(path))
    return build_tokenizer(str(path))


def test_bpe_specials_and_roundtrip(bpe):
    assert [bpe.special_ids[s] for s in SPECIALS] == list(range(len(SPECIALS)))
    text = "Clause 7(b): the audit value of AB-12 shall be 4821. Ünïcode too."
    ids = bpe.encode(text)
    assert len(ids) < len(text) and bpe.decode(ids) == text
    assert bpe.hash == build_tokenizer(bpe.name).hash != ByteTokenizer().hash


@pytest.mark.parametrize("tok_name", ["byte", "bpe"])
def test_relevance_offsets_line_up(bpe, tok_name):
    tok = ByteTokenizer() if tok_name == "byte" else bpe
    for i in range(4):
        ex = make_example(7, i, 3000, style="rich", hops=1 + i % 2)
        ex.document = "Préambule — ünïcode. " + ex.document  # multi-byte characters first
        ex.relevant_spans = [(s + 21, e + 21) for s, e in ex.relevant_spans]
        seg = encode_example(tok, ex)
        ids, offsets = tok.encode_with_offsets(ex.document)
        start = seg.tokens.index(tok.special_ids["<doc>"]) + 1
        assert seg.tokens[start:start + len(ids)] == ids
        rel = seg.relevance[start:start + len(ids)]
        for (a, b), r in zip(offsets, rel):
            inside = any(a < e and b > s for s, e in ex.relevant_spans)
            assert r == float(inside)
        for s, e in ex.relevant_spans:  # the marked tokens decode to cover each span exactly
            marked = [t for t, (a, b) in zip(ids, offsets) if a < e and b > s]
            assert ex.document[s:e] in tok.decode(marked)
            assert len(tok.decode(marked)) <= e - s + 8


def test_foreign_tokenizer_json_gets_specials(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, BPETokenizer) and set(tok.special_ids) == set(SPECIALS)
    assert tok.encode("a b") == [0, 1] and tok.vocab_size == 3 + len(SPECIALS)


def test_unknown_tokenizer_name():
    with pytest.raises(FileNotFoundError):
        build_tokenizer("missing/tokenizer.json")
    with pytest.raises(ValueError, match="not supported"):
        build_tokenizer("gpt2")
