"""LongBench-format files load onto the row schema and score with each dataset's metric."""

import json
from functools import lru_cache

import pytest

from pipeline.tasks import build_prompt_parts, load_rows, score_row
from pipeline.tasks.longbench import MAX_NEW_TOKENS, METRICS, PROMPTS


@lru_cache(maxsize=1)
def tokenizer():
    from pipeline.models import load_tokenizer

    return load_tokenizer("smollm2")


SUMMARY = "The agency reviewed the program. It found that costs rose sharply over ten years."
RECORDS = {
    "narrativeqa": {
        "input": "Who rescues the princess?",
        "context": "A long story about a knight.",
        "answers": ["the knight", "Sir Galahad"],
        "all_classes": None,
    },
    "gov_report": {
        "input": "",
        "context": "A long government report.",
        "answers": [SUMMARY],
        "all_classes": None,
    },
    "trec": {
        "input": "Question: Where is the Eiffel Tower?\nType:",
        "context": "Question: How far is it?\nType: Number",
        "answers": ["Location"],
        "all_classes": ["Description", "Entity", "Location", "Number"],
    },
    "passage_retrieval_en": {
        "input": "An abstract.",
        "context": "Paragraph 1: a.\n\nParagraph 2: b.",
        "answers": ["Paragraph 2"],
        "all_classes": None,
    },
    "lcc": {"input": "", "context": "def add(a, b):\n", "answers": ["    return a + b"], "all_classes": None},
    "passage_count": {
        "input": "",
        "context": "Paragraph 1: x\n\nParagraph 2: x",
        "answers": [1],
        "all_classes": None,
    },
    "multifieldqa_zh": {
        "input": "首都是哪里？",
        "context": "中国的首都是北京。",
        "answers": ["北京"],
        "all_classes": None,
    },
}


def _write(path, dataset, record, with_dataset_field=True):
    rec = {**record, "length": 42, "_id": f"id-{dataset}", "language": "en"}
    if with_dataset_field:
        rec["dataset"] = dataset
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def longbench_dir(tmp_path):
    for dataset, record in RECORDS.items():
        _write(tmp_path / f"{dataset}.jsonl", dataset, record)
    return tmp_path


def test_rows_follow_the_dataset_template(longbench_dir):
    rows = {r["task"]: r for r in load_rows(longbench_dir)}
    assert set(rows) == set(RECORDS)
    for dataset, row in rows.items():
        rec = RECORDS[dataset]
        expected = PROMPTS[dataset].replace("{context}", rec["context"]).replace("{input}", rec["input"])
        assert row["prompt"] == expected == row["context"] + row["question"]
        assert row["context"].endswith(rec["context"])
        assert row["scorer"] == METRICS[dataset]
        assert row["max_new_tokens"] == MAX_NEW_TOKENS[dataset]
        assert row["id"] == f"id-{dataset}" and row["length"] == 42
        assert row["answer"] == [str(a) for a in rec["answers"]]
    assert rows["narrativeqa"]["question"].startswith("\n\nNow, answer the question")
    assert rows["narrativeqa"]["scorer"] == "qa_f1"
    assert rows["gov_report"]["scorer"] == "rouge"
    assert rows["trec"]["scorer"] == "classification" and rows["trec"]["first_line"] is True
    assert rows["passage_retrieval_en"]["scorer"] == "retrieval"
    assert rows["lcc"]["scorer"] == "code_sim" and rows["lcc"]["chat"] is False


def test_each_dataset_scores_with_its_metric(longbench_dir):
    rows = {r["task"]: r for r in load_rows(longbench_dir)}
    # qa_f1: normalised token F1 against the best answer ("Sir Galahad" -> "sir galahad")
    assert score_row(rows["narrativeqa"], "Sir Galahad.") == 1.0
    assert score_row(rows["narrativeqa"], "Galahad") == pytest.approx(2 / 3)
    # rouge: the reference itself scores ~1, a partial summary less, an unrelated one 0
    assert score_row(rows["gov_report"], SUMMARY) == pytest.approx(1.0, abs=1e-6)
    assert 0.2 < score_row(rows["gov_report"], "The agency reviewed the program.") < 0.9
    assert score_row(rows["gov_report"], "Bananas.") == 0.0
    # classification on the first line only
    assert score_row(rows["trec"], "Location\nNumber") == 1.0
    assert score_row(rows["trec"], "Location or Number") == 0.5
    # retrieval: share of the numbers that name the right paragraph
    assert score_row(rows["passage_retrieval_en"], "Paragraph 2") == 1.0
    assert score_row(rows["passage_retrieval_en"], "Paragraph 1") == 0.0
    # code similarity of the first code line
    assert score_row(rows["lcc"], "    return a + b\n") == 1.0
    assert 0.5 < score_row(rows["lcc"], "    return a - b") < 1.0
    assert score_row(rows["passage_count"], "1") == 1.0
    assert score_row(rows["multifieldqa_zh"], "北京") == 1.0


def test_dataset_name_from_file_and_longbench_e(tmp_path):
    path = _write(
        tmp_path / "qasper_e.jsonl", "qasper_e", {**RECORDS["narrativeqa"]}, with_dataset_field=False
    )
    (row,) = load_rows(path)
    assert row["task"] == "qasper_e" and row["scorer"] == "qa_f1"
    assert row["prompt"].startswith("You are given a scientific article")
    unnamed = _write(tmp_path / "mystery.jsonl", "x", RECORDS["narrativeqa"], with_dataset_field=False)
    with pytest.raises(ValueError, match="dataset"):
        load_rows(unnamed)


def test_prompt_parts_for_longbench_rows(longbench_dir):
    rows = {r["task"]: r for r in load_rows(longbench_dir)}
    nqa = {**rows["narrativeqa"], "prompt_mode": "context_only"}
    prefix, suffix = build_prompt_parts(nqa, tokenizer())
    assert prefix.endswith("Story: A long story about a knight.")
    assert suffix.startswith("\n\nNow, answer the question") and suffix.endswith("<|im_start|>assistant\n")
    # few-shot / code datasets are not chat-templated, as in LongBench
    prefix, suffix = build_prompt_parts(rows["lcc"], tokenizer())
    assert prefix + suffix == rows["lcc"]["prompt"]
