"""The (compressible prefix, suffix) split of a row's prompt in both prompt modes."""

from functools import lru_cache

import pytest

from pipeline.tasks import build_prompt_parts, count_prompt_tokens

TAIL = "<|im_end|>\n<|im_start|>assistant\n"


@lru_cache(maxsize=1)
def tokenizer():
    from pipeline.models import load_tokenizer

    return load_tokenizer("smollm2")


ROW = {
    "context": "Some text. The pass key is 123.",
    "question": "What is the pass key?",
    "separator": "\n",
    "answer_prefix": "The pass key is",
}


def test_question_last_suffix_is_the_assistant_header():
    prefix, suffix = build_prompt_parts({**ROW, "prompt_mode": "question_last"}, tokenizer())
    assert suffix == TAIL + "The pass key is"
    assert prefix.endswith("Some text. The pass key is 123.\nWhat is the pass key?")
    assert prefix.startswith("<|im_start|>system\n")
    full = tokenizer().apply_chat_template(
        [{"role": "user", "content": ROW["context"] + "\n" + ROW["question"]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prefix + suffix == full + "The pass key is"


def test_context_only_moves_the_question_to_the_suffix():
    q_prefix, q_suffix = build_prompt_parts({**ROW, "prompt_mode": "question_last"}, tokenizer())
    c_prefix, c_suffix = build_prompt_parts({**ROW, "prompt_mode": "context_only"}, tokenizer())
    assert c_prefix + c_suffix == q_prefix + q_suffix
    assert c_prefix.endswith("The pass key is 123.")
    assert c_suffix == "\nWhat is the pass key?" + TAIL + "The pass key is"


def test_without_answer_prefix_the_suffix_is_just_the_header():
    _, suffix = build_prompt_parts({**ROW, "prompt_mode": "question_last"}, tokenizer(), answer_prefix=False)
    assert suffix == TAIL


def test_plain_prompt_without_chat_template():
    prefix, suffix = build_prompt_parts({**ROW, "prompt_mode": "context_only"}, tokenizer(), chat=False)
    assert prefix == ROW["context"]
    assert suffix == "\nWhat is the pass key? The pass key is"
    # a row may refuse the chat template (LongBench's few-shot datasets do)
    prefix2, suffix2 = build_prompt_parts({**ROW, "chat": False}, tokenizer(), chat=True)
    assert prefix2 + suffix2 == prefix + suffix


def test_default_separator_and_prompt_only_rows():
    prefix, _ = build_prompt_parts({"context": "C", "question": "Q"}, tokenizer(), chat=False)
    assert prefix == "C\n\nQ"
    prefix, suffix = build_prompt_parts({"prompt": "just a prompt"}, tokenizer(), chat=False)
    assert (prefix, suffix) == ("just a prompt", "")


def test_count_prompt_tokens_matches_tokenising_the_full_text():
    row = {**ROW, "prompt_mode": "context_only"}
    prefix, suffix = build_prompt_parts(row, tokenizer())
    assert count_prompt_tokens(row, tokenizer()) == len(
        tokenizer()(prefix + suffix, add_special_tokens=False)["input_ids"]
    )
    assert count_prompt_tokens(row, tokenizer()) > count_prompt_tokens(row, tokenizer(), chat=False)


def test_unknown_prompt_mode():
    with pytest.raises(ValueError, match="prompt_mode"):
        build_prompt_parts({**ROW, "prompt_mode": "question_first"}, tokenizer())
