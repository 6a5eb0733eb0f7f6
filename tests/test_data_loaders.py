"""Each long-context loader maps a fixture in its published layout to our schema."""
import gzip
import json

from dcwdist.data_pipelines.loaders import (iter_source, load_cuad, load_leval, load_legalbench,
                                            load_natural_questions, load_scrolls)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cuad(tmp_path):
    ctx = "This Agreement is governed by the laws of Delaware. Term: five years."
    data = {"version": "aok_v1.0", "data": [{"title": "c1", "paragraphs": [{"context": ctx, "qas": [
        {"id": "q1", "question": "Governing Law", "is_impossible": False,
         "answers": [{"text": "laws of Delaware", "answer_start": ctx.index("laws")}]},
        {"id": "q2", "question": "Non-Compete", "is_impossible": True, "answers": []}]}]}]}
    (tmp_path / "CUAD_v1.json").write_text(json.dumps(data))
    a, b = load_cuad(str(tmp_path / "CUAD_v1.json"))
    assert (a.instruction, a.document, a.answer) == ("Governing Law", ctx, " laws of Delaware")
    (s, e), = a.relevant_spans
    assert ctx[s:e] == "laws of Delaware"
    assert b.answer == " None" and b.relevant_spans == []


def test_legalbench_tsv_and_jsonl(tmp_path):
    task = tmp_path / "cuad_audit_rights"
    task.mkdir()
    (task / "test.tsv").write_text("answer\tindex\ttext\nYes\t0\tThe auditor may inspect.\n"
                                   "No\t1\tNothing here.\n")
    rows = list(load_legalbench(str(task)))
    assert [(r.document, r.answer) for r in rows] == [("The auditor may inspect.", " Yes"),
                                                       ("Nothing here.", " No")]
    assert "cuad_audit_rights" in rows[0].instruction
    f = _jsonl(tmp_path / "q.jsonl", [{"question": "Is it valid?", "text": "T", "answer": "Yes"}])
    (r,) = load_legalbench(f)
    assert (r.instruction, r.document, r.answer) == ("Is it valid?", "T", " Yes")


def test_scrolls_qa_and_summary(tmp_path):
    (tmp_path / "qasper").mkdir()
    qa = _jsonl(tmp_path / "qasper" / "validation.jsonl", [
        {"id": "1", "pid": "1_0", "input": "What dataset is used?\n\nWe use SQuAD.\n\nMore.",
         "output": "SQuAD"}])
    (r,) = load_scrolls(str(tmp_path / "qasper"))
    assert (r.instruction, r.document, r.answer) == ("What dataset is used?",
                                                     "We use SQuAD.\n\nMore.", " SQuAD")
    gov = _jsonl(tmp_path / "gov_report.jsonl", [{"id": "g", "pid": "g", "input": "Report.\n\nx",
                                                  "output": "Summary."}])
    (r,) = load_scrolls(gov)
    assert (r.instruction, r.document, r.answer) == ("Summarize the document.", "Report.\n\nx",
                                                     " Summary.")
    assert list(iter_source(qa, "scrolls"))[0].answer == " SQuAD"


def test_leval(tmp_path):
    f = _jsonl(tmp_path / "coursera.jsonl", [{
        "input": "Lecture text.", "instructions": ["Q1?", "Q2?"], "outputs": ["A1", "A2"],
        "source": "coursera", "evaluation": "exam"}])
    rows = list(load_leval(f))
    assert [(r.instruction, r.document, r.answer) for r in rows] == [
        ("Q1?", "Lecture text.", " A1"), ("Q2?", "Lecture text.", " A2")]


def test_natural_questions_simplified(tmp_path):
    doc = "<P> The Eiffel Tower is in Paris . </P> <P> Other text . </P>"
    words = doc.split(" ")
    rec = {"document_text": doc, "question_text": "where is the eiffel tower",
           "example_id": 1, "document_url": "u",
           "long_answer_candidates": [{"start_token": 0, "end_token": 8, "top_level": True}],
           "annotations": [{"annotation_id": 9, "yes_no_answer": "NONE",
                            "long_answer": {"start_token": 0, "end_token": 9,
                                            "candidate_index": 0},
                            "short_answers": [{"start_token": 6, "end_token": 7}]}]}
    unanswered = dict(rec, annotations=[{"yes_no_answer": "NONE", "short_answers": [],
                                         "long_answer": {"start_token": -1, "end_token": -1,
                                                         "candidate_index": -1}}])
    path = tmp_path / "simplified-nq-dev.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps(rec) + "\n" + json.dumps(unanswered) + "\n")
    (r,) = load_natural_questions(str(path))  # the unanswered one is skipped
    assert (r.instruction, r.answer) == ("where is the eiffel tower", " Paris")
    (s, e), = r.relevant_spans
    assert doc[s:e] == " ".join(words[0:9]) == "<P> The Eiffel Tower is in Paris . </P>"
