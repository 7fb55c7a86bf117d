"""The columns of a generated row, in order, with their Arrow types."""

from __future__ import annotations

import pyarrow as pa

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # task-length-index, stable for a command and seed
        ("task", pa.string()),
        ("context", pa.string()),  # task preamble + haystack with the needle(s)
        ("question", pa.string()),
        ("answer", pa.list_(pa.string())),  # every acceptable / required answer
        ("context_length", pa.int64()),  # requested prompt tokens
        ("depth", pa.float64()),  # needle depth 0..1 (the first / queried needle); null: no needle
        ("scorer", pa.string()),
        ("prompt_mode", pa.string()),  # question_last | context_only
        ("answer_prefix", pa.string()),  # opens the assistant turn (RULER's answer prefix)
        ("separator", pa.string()),  # between context and question in the user turn
        ("max_new_tokens", pa.int64()),
        ("haystack", pa.string()),
        ("needle_depths", pa.list_(pa.float64())),  # every needle's depth; the first is the queried one
        ("prompt_tokens", pa.int64()),  # measured tokens of the full templated prompt
    ]
)
ROW_COLUMNS = tuple(ROW_SCHEMA.names)
