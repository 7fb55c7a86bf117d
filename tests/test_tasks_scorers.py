"""Scorers on hand-built examples whose right value is known."""

import math
import random

import pytest

from pipeline.tasks import SCORERS, score, score_row
from pipeline.tasks.metrics import lcs_items, normalize_answer


def test_normalize_answer_drops_case_punctuation_articles():
    assert normalize_answer("The  Cat, sat on AN old mat!") == "cat sat on old mat"


def test_qa_f1_known_value():
    # normalised: "cat sat on mat" vs "cat on mat": 3 shared tokens, P = 3/4, R = 1 -> F1 = 6/7
    assert score("qa_f1", "The cat sat on the mat.", ["a cat on a mat"]) == pytest.approx(6 / 7)
    assert score("qa_f1", "dog", ["a cat on a mat"]) == 0.0


def test_qa_f1_takes_the_best_answer():
    assert score("qa_f1", "Paris", ["London", "paris"]) == 1.0


def test_qa_f1_zh_splits_characters():
    # 北京 vs 北京市: P = 1, R = 2/3 -> F1 = 0.8
    assert score("qa_f1_zh", "北京。", ["北京市"]) == pytest.approx(0.8)


def test_rouge_l_known_value():
    # LCS "the cat on the mat" = 5 of 6 words on both sides -> F1 = 5/6
    assert score("rouge_l", "the cat sat on the mat", ["The cat is on the mat"]) == pytest.approx(5 / 6)


def test_longbench_rouge_counts_distinct_words():
    # the `rouge` package LongBench uses counts distinct words: LCS words {the, cat, on, mat} = 4,
    # distinct words 5 on each side -> P = R = F = 0.8
    assert score("rouge", "the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(0.8, abs=1e-6)
    assert score("rouge", "", ["the cat"]) == 0.0


def test_longbench_rouge_is_summary_level():
    # Two reference sentences, each matched by a different candidate sentence: union LCS covers all.
    ref = "alpha beta gamma. delta epsilon zeta."
    hyp = "delta epsilon zeta. alpha beta gamma."
    assert score("rouge", hyp, [ref]) == pytest.approx(1.0, abs=1e-6)


def test_lcs_items_backtracks_consistently():
    assert lcs_items("a b c d".split(), "a c b d".split()) in (["a", "b", "d"], ["a", "c", "d"])


def test_string_match_all_partial_and_part():
    answers = ["1234567", "7654321"]
    assert score("string_match_all", "The numbers are 1234567 and 999.", answers) == 0.5
    assert score("string_match_all", "1234567, 7654321", answers) == 1.0
    assert score("string_match_part", "The numbers are 1234567 and 999.", answers) == 1.0
    assert score("string_match_part", "none", answers) == 0.0
    assert score("string_match_all", "ALPHA-ONE", ["alpha-one"]) == 1.0  # case-insensitive


def test_exact_and_contains():
    assert score("exact", "  Yes \n", ["yes"]) == 1.0
    assert score("exact", "yes indeed", ["yes"]) == 0.0
    assert score("contains", "The pass key is 71432.", ["71432"]) == 1.0
    assert score("contains", "The pass key is 71433.", ["71432"]) == 0.0


def test_classification_splits_credit_between_named_classes():
    classes = ["Description", "Entity", "Location", "Number"]
    assert score("classification", "Location", ["Location"], all_classes=classes) == 1.0
    assert score("classification", "Location or Number", ["Location"], all_classes=classes) == 0.5
    assert score("classification", "Number", ["Location"], all_classes=classes) == 0.0


def test_retrieval_and_count_share_of_numbers():
    assert score("retrieval", "Paragraph 3", ["Paragraph 3"]) == 1.0
    assert score("retrieval", "Paragraph 3 or Paragraph 5", ["Paragraph 3"]) == 0.5
    assert score("retrieval_zh", "段落7", ["段落7"]) == 1.0
    assert score("count", "There are 12 unique paragraphs.", ["12"]) == 1.0
    assert score("count", "12 or 13", ["12"]) == 0.5
    assert score("count", "no idea", ["12"]) == 0.0


def test_code_sim_uses_first_code_line():
    assert score("code_sim", "\nx = foo(a)\nmore", ["x = foo(a)"]) == 1.0
    # comment lines are skipped; "y = 1" vs "y = 2": 4 of 5 characters shared -> 2*4/10 = 0.8
    assert score("code_sim", "# set y\ny = 1", ["y = 2"]) == pytest.approx(0.8)


def test_first_line_option():
    classes = ["Location", "Number"]
    assert score("classification", "Location\nNumber", ["Location"], all_classes=classes) == 0.5
    assert (
        score("classification", "\nLocation\nNumber", ["Location"], all_classes=classes, first_line=True)
        == 1.0
    )


def test_score_row_reads_scorer_and_extras():
    row = {"scorer": "classification", "answer": ["Number"], "all_classes": ["Location", "Number"]}
    assert score_row(row, "Number") == 1.0
    assert score_row({"scorer": "string_match_all", "answer": ["a", "b"]}, "a") == 0.5


def test_unknown_scorer_is_an_error():
    with pytest.raises(ValueError, match="unknown scorer"):
        score("bleu", "x", ["x"])


def test_every_scorer_stays_in_unit_interval():
    rng = random.Random(0)
    words = ["cat", "Paragraph 2", "12", "北京", "x = 1", "# c", ".", "\n", "the", "Number"]
    for name in SCORERS:
        for _ in range(30):
            pred = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
            refs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(2)]
            value = score(name, pred, refs, all_classes=["Number", "cat"])
            assert 0.0 <= value <= 1.0 and not math.isnan(value), (name, pred, refs, value)
