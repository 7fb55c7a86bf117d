"""Input rows to token ids, and results back to output rows. Bad rows get an error, never vanish.

An input row carries `prompt`, or `context` + `question`; optionally `id`, `answer` (a string
or a list of acceptable answers), `scorer`, `prompt_mode`; any other column passes through.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from pipeline.tasks import build_prompt_parts, score_row

DEFAULT_SCORER = "contains"

# Columns every output row has, with their Arrow types (see `output_schema`).
RESULT_COLUMNS = {
    "id": "string",
    "output_text": "string",
    "error": "string",
    "policy": "string",
    "model": "string",
    "prompt_mode": "string",
    "prompt_tokens": "int64",
    "output_tokens": "int64",
    "kv_tokens_full": "int64",
    "kv_tokens_kept": "int64",
    "kv_bytes_full": "int64",
    "kv_bytes_kept": "int64",
    "prefill_s": "double",
    "decode_s": "double",
    "ttft_s": "double",
    "finish_reason": "string",
    "score": "double",
    "batch_rows": "int64",
    "batch_peak_device_bytes": "int64",
    "replica": "string",
}


@dataclass
class PreparedRow:
    index: int  # position in the incoming batch
    id: str
    prompt_ids: list[int] = field(default_factory=list)
    suffix_ids: list[int] = field(default_factory=list)
    prompt_mode: str = "question_last"
    error: str | None = None

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.suffix_ids)


def row_id(row: dict) -> str:
    """The row's `id`, or a stable one made from its whole content (every column, and the raw
    text of an unparseable JSONL line), so that a rerun gives the same id. Rows identical in
    every column are the same work and share an id (the output keeps one of them)."""
    given = row.get("id")
    if given is not None and str(given) != "":
        return str(given)
    content = json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True, default=str)
    return "row-" + hashlib.sha1(content.encode()).hexdigest()[:16]


def _text_problem(row: dict) -> str | None:
    """Why a row has no usable prompt text, or None."""
    if row.get("_input_error"):  # found while parsing the input (see pipeline.arrow_rows)
        return row["_input_error"]
    fields_present = [k for k in ("prompt", "context", "question") if row.get(k) is not None]
    if not fields_present:
        return "missing prompt: give a 'prompt' column, or 'context' and 'question'"
    for key in fields_present:
        if not isinstance(row[key], str):
            return f"wrong type: '{key}' must be a string, got {type(row[key]).__name__}"
    if not any(row[k].strip() for k in fields_present):
        return "empty prompt"
    return None


def prepare_row(
    row: dict,
    index: int,
    tokenizer,
    *,
    prompt_mode: str,
    chat_template: bool,
    max_context: int,
    max_new_tokens: int,
) -> PreparedRow:
    """Template and tokenise one row; problems become the row's error."""
    prepared = PreparedRow(index=index, id=row_id(row))
    problem = _text_problem(row)
    if problem:
        prepared.error = problem
        return prepared
    mode = row.get("prompt_mode") or prompt_mode
    prepared.prompt_mode = mode
    try:
        prefix, suffix = build_prompt_parts({**row, "prompt_mode": mode}, tokenizer, chat=chat_template)
    except ValueError as exc:
        prepared.error = f"bad prompt: {exc}"
        return prepared
    special = not (chat_template and getattr(tokenizer, "chat_template", None))
    if mode == "question_last":  # the whole prompt is compressed together, as the papers do
        prepared.prompt_ids = tokenizer(prefix + suffix, add_special_tokens=special)["input_ids"]
    else:  # compress the context alone; the question is appended afterwards, uncompressed
        prepared.prompt_ids = tokenizer(prefix, add_special_tokens=special)["input_ids"]
        prepared.suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if not prepared.prompt_ids:
        prepared.error = "empty prompt after tokenisation"
    elif prepared.total_tokens + max_new_tokens > max_context:
        prepared.error = (
            f"prompt too long: {prepared.total_tokens} tokens + max_new_tokens {max_new_tokens} "
            f"exceed the model's context of {max_context}"
        )
    return prepared


def answers_of(row: dict) -> list[str] | None:
    answer = row.get("answer")
    if answer is None:
        return None
    if isinstance(answer, str):
        return [answer]
    return [str(a) for a in list(answer)]


def score_output(row: dict, output_text: str) -> float | None:
    """The row's score when it has reference answers, else None."""
    answers = answers_of(row)
    if answers is None:
        return None
    return score_row({**row, "answer": answers, "scorer": row.get("scorer") or DEFAULT_SCORER}, output_text)
