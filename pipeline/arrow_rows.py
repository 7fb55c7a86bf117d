"""Arrow <-> row dicts for the Ray stages: tolerant JSONL parsing and result attachment.

JSONL lines are parsed one by one so that a broken line or a prompt of the wrong type becomes
that row's error (column `_input_error`) instead of failing the whole read.
"""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.rows import RESULT_COLUMNS

INPUT_ERROR = "_input_error"
TEXT_FIELDS = ("prompt", "context", "question")


def parse_jsonl_line(line: str, line_number: int | None = None) -> dict:
    where = f"line {line_number}" if line_number is not None else "a line"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return {INPUT_ERROR: f"bad JSON on {where}: {exc.msg}", "raw_line": line[:1000]}
    if not isinstance(row, dict):
        return {
            INPUT_ERROR: f"{where} is a JSON {type(row).__name__}, not an object",
            "raw_line": line[:1000],
        }
    for key in TEXT_FIELDS:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            row[INPUT_ERROR] = f"wrong type: '{key}' must be a string, got {type(value).__name__}"
            row[key] = None
    return row


def _column(values: list) -> pa.Array:
    """An Arrow array for a column; values of mixed types fall back to their JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(
            [
                None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))
                for v in values
            ],
            type=pa.string(),
        )


def rows_to_table(rows: list[dict]) -> pa.Table:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return pa.table({name: _column([row.get(name) for row in rows]) for name in names})


def parse_jsonl_batch(batch: pa.Table) -> pa.Table:
    """Ray stage: a `text` column of JSONL lines -> parsed rows (blank lines dropped)."""
    lines = [line for line in batch.column("text").to_pylist() if line and line.strip()]
    return rows_to_table([parse_jsonl_line(line) for line in lines])


def attach_results(inputs: pa.Table, results: list[dict]) -> pa.Table:
    """Input columns (those not shadowed by result columns) followed by the typed result columns."""
    keep = [n for n in inputs.column_names if n not in RESULT_COLUMNS and n != INPUT_ERROR]
    table = inputs.select(keep)
    for name, type_name in RESULT_COLUMNS.items():
        values = [r.get(name) for r in results]
        table = table.append_column(name, pa.array(values, type=pa.type_for_alias(type_name)))
    return table
