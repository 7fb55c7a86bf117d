"""Prompt assembly: split a row's prompt into a compressible prefix and an uncompressed suffix.

The user turn is ``context + separator + question``. With a chat template it is wrapped as a
single user message (``add_generation_prompt=True``); an optional ``answer_prefix`` (RULER's
"The special magic numbers for ... are") then opens the assistant turn. Two modes:

- ``question_last``: prefix = template head + whole user turn; suffix = the template tail
  after the user turn (e.g. ``"<|im_end|>\\n<|im_start|>assistant\\n"``) + answer prefix.
- ``context_only``: prefix = template head + context; suffix = separator + question + tail.

In both modes ``prefix + suffix`` is the same full prompt text. Lengths are counted on that
text: :func:`count_prompt_tokens` tokenises ``prefix + suffix`` in one piece, with
``add_special_tokens=False`` when the chat template was applied (the template already carries
its special tokens) and ``True`` for plain text.
"""

from __future__ import annotations

PROMPT_MODES = ("question_last", "context_only")
DEFAULT_SEPARATOR = "\n\n"


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat(row: dict, tokenizer, chat: bool = True) -> bool:
    """Whether the chat template applies: asked for, the tokenizer has one, and the row allows it
    (LongBench's few-shot and code datasets set ``chat=False``, as LongBench does)."""
    return bool(chat and row.get("chat", True) is not False and _has_chat_template(tokenizer))


def _pieces(row: dict) -> tuple[str, str, str]:
    context = row.get("context") or ""
    question = row.get("question") or ""
    if not context and not question and row.get("prompt"):
        return row["prompt"], "", ""
    separator = row.get("separator")
    if separator is None:
        separator = DEFAULT_SEPARATOR if context and question else ""
    return context, separator, question


def build_prompt_parts(
    row: dict, tokenizer, chat: bool = True, answer_prefix: bool = True
) -> tuple[str, str]:
    """(compressible_prefix, suffix) for a row; ``prefix + suffix`` is the full prompt text."""
    mode = row.get("prompt_mode") or "question_last"
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt_mode {mode!r}; choose one of {PROMPT_MODES}")
    context, separator, question = _pieces(row)
    user = context + separator + question
    cue = (row.get("answer_prefix") or "") if answer_prefix else ""
    if uses_chat(row, tokenizer, chat):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        at = full.find(user)
        if at < 0:
            raise ValueError("the chat template altered the user message; cannot split the prompt")
        head, tail = full[:at], full[at + len(user) :]
        tail += cue.lstrip()
    else:
        head, tail = "", (" " + cue.lstrip() if cue else "")
    if mode == "question_last":
        return head + user, tail
    return head + context, separator + question + tail


def prompt_text(row: dict, tokenizer, chat: bool = True, answer_prefix: bool = True) -> str:
    prefix, suffix = build_prompt_parts(row, tokenizer, chat=chat, answer_prefix=answer_prefix)
    return prefix + suffix


def count_prompt_tokens(row: dict, tokenizer, chat: bool = True, answer_prefix: bool = True) -> int:
    """Tokens of the full prompt as the model sees it (the number the 2% length rule checks)."""
    text = prompt_text(row, tokenizer, chat=chat, answer_prefix=answer_prefix)
    special = not uses_chat(row, tokenizer, chat)
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])
