"""Reading and writing row files: Parquet, JSONL, and LongBench JSONL.

Parquet is written reproducibly: a fixed schema and column order, fixed writer options, and
no timestamps, so the same rows give byte-identical files (for one pyarrow version).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tasks.longbench import dataset_from_path, is_longbench, longbench_row
from pipeline.tasks.schema import ROW_COLUMNS, ROW_SCHEMA

PARQUET_OPTIONS = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def _normalise(row: dict) -> dict:
    """Give a plain row the schema's essentials: `answer` as a list and a prompt mode."""
    row = dict(row)
    if "answer" not in row and "answers" in row:
        row["answer"] = row.pop("answers")
    answer = row.get("answer")
    if answer is None:
        row["answer"] = []
    elif isinstance(answer, str):
        row["answer"] = [answer]
    else:
        row["answer"] = [str(a) for a in answer]
    row.setdefault("prompt_mode", "question_last")
    if row.get("id") is not None:
        row["id"] = str(row["id"])
    return row


def load_rows(path: str | Path, dataset: str | None = None) -> list[dict]:
    """Rows from a Parquet file, a JSONL file (plain rows or LongBench records), or a directory of them.

    LongBench records are recognised by their fields (context, input, answers) and mapped with
    :func:`pipeline.tasks.longbench.longbench_row`; `dataset` (else the record's own field,
    else the file name) picks the template and metric.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".jsonl", ".json"))
        return [row for f in files for row in load_rows(f, dataset)]
    if path.suffix == ".parquet":
        return [_normalise(r) for r in pq.read_table(path).to_pylist()]
    if path.suffix in (".jsonl", ".json"):
        raw = _read_jsonl(path)
        if raw and is_longbench(raw[0]):
            name = dataset or dataset_from_path(path)
            return [longbench_row(r, name, i) for i, r in enumerate(raw)]
        return [_normalise(r) for r in raw]
    raise ValueError(f"{path}: expected a .parquet or .jsonl file")


def write_rows(rows: Iterable[dict], path: str | Path, metadata: dict | None = None) -> Path:
    """Write rows as JSONL (path ends in .jsonl) or Parquet (anything else); returns the path."""
    path = Path(path)
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path
    if rows and all(tuple(r) == ROW_COLUMNS for r in rows):
        schema = ROW_SCHEMA
    else:
        schema = pa.Table.from_pylist(rows).schema if rows else ROW_SCHEMA
    if metadata:
        schema = schema.with_metadata(
            {f"kvpipe.{k}": json.dumps(v, sort_keys=True) for k, v in metadata.items()}
        )
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, **PARQUET_OPTIONS)
    return path
