"""Synthetic task generation: lengths in model tokens, needle depth, determinism, task content."""

import re
from functools import lru_cache

import pytest

from pipeline.tasks import TASKS, build_prompt_parts, generate, score_row
from pipeline.tasks.schema import ROW_COLUMNS


@lru_cache(maxsize=1)
def tokenizer():
    from pipeline.models import load_tokenizer

    return load_tokenizer("smollm2")


def full_prompt_tokens(row) -> int:
    """Independent recount: tokenise prefix + suffix of the chat-templated prompt."""
    prefix, suffix = build_prompt_parts(row, tokenizer(), chat=True)
    return len(tokenizer()(prefix + suffix, add_special_tokens=False)["input_ids"])


def n_tokens(text: str) -> int:
    return len(tokenizer()(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", ["passkey", "niah_multikey"])
@pytest.mark.parametrize("length", [1024, 2048, 4096])
def test_length_within_two_percent(task, length):
    rows = generate(task, length, 2, seed=3, tokenizer=tokenizer())
    for row in rows:
        counted = full_prompt_tokens(row)
        assert counted == row["prompt_tokens"]
        assert abs(counted - length) <= 0.02 * length, (row["id"], counted)
        assert counted <= length
        assert row["context_length"] == length


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_fits_and_holds_its_answers(task):
    (row,) = generate(task, 2048, 1, seed=0, tokenizer=tokenizer(), depths=[0.4])
    assert tuple(row) == ROW_COLUMNS
    assert row["id"] == f"{task}-2048-0" and row["task"] == task
    assert row["scorer"] == TASKS[task].scorer
    assert abs(full_prompt_tokens(row) - 2048) <= 0.02 * 2048
    assert row["answer"] and all(a in row["context"] for a in row["answer"])
    # a prediction listing every answer scores 1; an empty one scores 0
    assert score_row(row, " ".join(row["answer"])) == 1.0
    assert score_row(row, "") == 0.0
    if TASKS[task].uses_depth:
        assert row["depth"] == 0.4 and row["needle_depths"][0] == 0.4
    else:
        assert row["depth"] is None


def _haystack_fraction(row, needle: str, preamble_end: str) -> float:
    ctx = row["context"]
    start = ctx.index(preamble_end) + len(preamble_end) if preamble_end else 0
    at = ctx.index(needle)
    before = n_tokens(ctx[start:at])
    total = n_tokens(ctx[start:]) - n_tokens(needle)
    return before / total


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_needle_sits_at_requested_depth(depth):
    (row,) = generate("passkey", 2048, 1, seed=1, tokenizer=tokenizer(), depths=[depth])
    key = row["answer"][0]
    needle = f"The pass key is {key}. Remember it."
    assert row["context"].count(needle) == 1 and row["context"].count(key) == 1
    fraction = _haystack_fraction(row, needle, "")
    assert fraction == pytest.approx(depth, abs=0.03)


def test_passkey_plain_prompt_format():
    (row,) = generate("passkey", 1024, 1, seed=1, tokenizer=tokenizer(), depths=[0.5])
    assert row["context"].startswith("The grass is green.")  # no instruction line
    prefix, suffix = build_prompt_parts(row, tokenizer())
    # the question continues the filler paragraph; the answer prefix opens the assistant turn
    assert prefix.endswith(". What is the pass key?")
    assert suffix.endswith("<|im_start|>assistant\nThe pass key is")


def test_passkey_paper_style():
    (row,) = generate("passkey", 1024, 1, seed=1, tokenizer=tokenizer(), depths=[0.5], style="paper")
    key = row["answer"][0]
    assert row["context"].startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert row["context"].count(f"The pass key is {key}. Remember it. {key} is the pass key.") == 1
    assert build_prompt_parts(row, tokenizer())[0].endswith(".\n\nWhat is the pass key?")
    fraction = _haystack_fraction(row, f"The pass key is {key}.", "important information there.\n\n")
    assert fraction == pytest.approx(0.5, abs=0.03)
    assert abs(full_prompt_tokens(row) - 1024) <= 0.02 * 1024
    with pytest.raises(ValueError, match="style"):
        generate("passkey", 1024, 1, seed=1, tokenizer=tokenizer(), style="long")


def test_niah_essays_haystack_depth():
    try:
        rows = generate(
            "niah_single", 4096, 3, seed=2, tokenizer=tokenizer(), depths=[0.2, 0.5, 0.8], haystack="essays"
        )
    except RuntimeError as exc:  # no network and no cached essays
        pytest.skip(str(exc))
    for row in rows:
        assert "The grass is green" not in row["context"]
        needle = next(s for s in re.findall(r"One of the special magic numbers for [^.]+\.", row["context"]))
        assert row["answer"][0] in needle
        fraction = _haystack_fraction(row, needle, "about the numbers afterwards.\n")
        assert fraction == pytest.approx(row["depth"], abs=0.06)
        assert abs(full_prompt_tokens(row) - 4096) <= 0.02 * 4096


def test_depths_cycle_over_samples():
    rows = generate("niah_single", 1024, 4, seed=0, tokenizer=tokenizer(), depths=[0.1, 0.9])
    assert [r["depth"] for r in rows] == [0.1, 0.9, 0.1, 0.9]


def test_generation_is_deterministic_and_seeded():
    a = generate("niah_multivalue", 1024, 3, seed=5, tokenizer=tokenizer())
    b = generate("niah_multivalue", 1024, 3, seed=5, tokenizer=tokenizer())
    c = generate("niah_multivalue", 1024, 3, seed=6, tokenizer=tokenizer())
    assert a == b
    assert [r["answer"] for r in a] != [r["answer"] for r in c]
    # sample i does not depend on how many samples were asked for
    assert generate("niah_multivalue", 1024, 2, seed=5, tokenizer=tokenizer()) == a[:2]


def test_multiquery_needles_pair_keys_with_answers():
    (row,) = generate("niah_multiquery", 2048, 1, seed=4, tokenizer=tokenizer(), depths=[0.5])
    pairs = dict(re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", row["context"]))
    assert len(pairs) == 4 and sorted(pairs.values()) == sorted(row["answer"])
    for key in pairs:
        assert key in row["question"] and key in row["answer_prefix"]


def test_multikey_has_distractors_and_one_queried_key():
    (row,) = generate("niah_multikey", 2048, 1, seed=4, tokenizer=tokenizer(), num_keys=6)
    pairs = dict(re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", row["context"]))
    assert len(pairs) == 6 and len(row["answer"]) == 1
    (queried,) = [k for k, v in pairs.items() if v == row["answer"][0]]
    assert queried in row["question"] and sum(k in row["question"] for k in pairs) == 1


def test_variable_tracking_chain_reads_in_order():
    (row,) = generate("variable_tracking", 2048, 1, seed=8, tokenizer=tokenizer(), depths=[0.3], num_hops=3)
    names = row["answer"]
    assert len(names) == 4
    value = re.search(rf"VAR {names[0]} = (\d+)\.", row["context"]).group(1)
    assert value in row["question"]
    positions = [row["context"].index(f"VAR {names[0]} = {value}.")]
    positions += [row["context"].index(f"VAR {names[i]} = VAR {names[i - 1]}.") for i in range(1, 4)]
    assert positions == sorted(positions)


def test_common_words_frequencies():
    (row,) = generate("common_words", 2048, 1, seed=2, tokenizer=tokenizer(), freq_cw=12, freq_ucw=3)
    entries = re.findall(r"\d+\. (\S+)", row["context"].split("\n", 1)[1])
    counts = {w: entries.count(w) for w in set(entries)}
    assert all(counts[w] == 12 for w in row["answer"])
    assert len(row["answer"]) == 10
    assert all(c == 3 for w, c in counts.items() if w not in row["answer"])
    assert len(counts) > 20


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="unknown task"):
        generate("niah_double", 1024, 1, 0, tokenizer())
    with pytest.raises(ValueError, match="takes options"):
        generate("passkey", 1024, 1, 0, tokenizer(), num_keys=3)
    with pytest.raises(ValueError, match="depths"):
        generate("passkey", 1024, 1, 0, tokenizer(), depths=[1.5])
    with pytest.raises(ValueError, match="without filler"):
        generate("passkey", 40, 1, 0, tokenizer())
