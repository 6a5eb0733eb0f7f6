"""Answer metrics against hand-computed values."""
import pytest

from dcwdist.eval.metrics import (asserted_values, exact_match, f1_score, hallucinated,
                                  normalize_answer, qa_scores, rouge_l, string_match_all,
                                  string_match_part)


def test_squad_normalisation_and_exact_match():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match(" 4821", "4821") == 1.0
    assert exact_match("4821 5", "4821") == 0.0


def test_f1_by_hand():
    # pred {quick, brown, fox}, ref {quick, red, fox, jumps}: 2 common, P = 2/3, R = 1/2.
    assert f1_score("the quick brown fox", "quick red fox jumps") == pytest.approx(4 / 7)
    assert f1_score("", "") == 1.0
    assert f1_score("x", "") == 0.0
    assert f1_score("a b", "c") == 0.0


def test_rouge_l_by_hand():
    # LCS(the cat sat on the mat | the cat is on the mat today) = 5; P = 5/6, R = 5/7.
    got = rouge_l("the cat sat on the mat", "the cat is on the mat today")
    assert got == pytest.approx(10 / 13)
    assert rouge_l("4821", " 4821") == pytest.approx(1.0)
    assert rouge_l("1234", "4821") == 0.0


def test_ruler_string_match():
    got = string_match_all("The answer is 42 AND Seven", ["42", "seven", "9"])
    assert got == pytest.approx(2 / 3)
    assert string_match_part("The answer is 42", ["9", "42"]) == 1.0
    assert string_match_part("nothing", ["9", "42"]) == 0.0


def test_hallucination_is_a_value_the_facts_do_not_support():
    facts = {"AB-12": "1234", "CD-34": "5678"}
    assert asserted_values("x 1234, 98765 and 4321.") == ["1234", "4321"]
    assert hallucinated(" 4321", facts)
    assert not hallucinated(" 5678", facts)   # a real value, even if the wrong one
    assert not hallucinated(" no idea", facts)  # asserts nothing
    s = qa_scores(" 9999", " 1234", facts)
    assert s == {"em": 0.0, "f1": 0.0, "rouge_l": 0.0, "asserts_value": 1.0, "hallucinated": 1.0}
