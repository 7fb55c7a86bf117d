"""Exactly-once output: idempotent per-block Parquet files, resume, and a final de-duplication.

A row's identity is its `id` (given, or made from its content by `pipeline.rows.row_id`).

- **Idempotent, atomic files.** Each write task writes its rows to
  `part-<run>-<hash of the rows' ids>.parquet`: first to a hidden `.tmp-...` name, then an
  atomic rename. A retried task (a replica killed mid-job: Ray restarts the actor and retries
  its task, and a streaming map task may hand the writer the same block twice) writes the same
  ids to the same name, so it replaces the file instead of adding one. A writer killed mid-file
  leaves only a hidden temporary file, which Parquet readers ignore and the next run removes.
- **Final de-duplication.** Should Ray ever re-form blocks differently on a retry, the same id
  could land in two files; after the write the driver keeps each id's first occurrence (files in
  name order) and rewrites the few files that repeat one, so the output has every id once.
- **Resume** (`output.mode: resume`): the ids already in the output are read (one column), the
  input rows with those ids are filtered out before the inference stage, and the new rows go to
  files of the new run; rows are never processed twice, and a rerun after a complete job
  processes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-"


def new_run_token() -> str:
    return uuid.uuid4().hex[:8]


def part_files(out: Path) -> list[Path]:
    return sorted(p for p in Path(out).glob(f"{PART_PREFIX}*.parquet") if p.is_file())


def rows_key(ids: list) -> str:
    """A deterministic name for a set of rows: the hash of their sorted ids."""
    text = "\n".join(sorted("" if i is None else str(i) for i in ids))
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def write_table_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _datasink_base():
    from ray.data import Datasink

    return Datasink


class ExactlyOnceSink(_datasink_base()):
    """A Ray Data datasink writing one idempotent, atomically renamed Parquet file per write task."""

    def __init__(self, out: str | Path, run_token: str) -> None:
        self.out = str(out)
        self.run_token = run_token

    def get_name(self) -> str:
        return "WriteParquetOnce"

    def write(self, blocks: Iterable, ctx) -> dict:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"file": None, "rows": 0}
        table = pa.concat_tables(tables, promote_options="permissive")
        name = f"{PART_PREFIX}{self.run_token}-{rows_key(table.column('id').to_pylist())}.parquet"
        write_table_atomic(table, Path(self.out) / name)
        return {"file": name, "rows": table.num_rows}


def clean_partial(out: Path) -> list[str]:
    """Remove temporary files and unreadable part files (a writer killed mid-file); their names."""
    removed = []
    for tmp in Path(out).glob(f"{TMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    for part in part_files(out):
        try:
            pq.read_metadata(part)
        except (pa.ArrowInvalid, OSError):
            log.warning("removing unreadable output file %s (its rows will be processed again)", part)
            part.unlink(missing_ok=True)
            removed.append(part.name)
    return removed


def existing_ids(out: Path) -> set[str]:
    """The ids of the rows already written to `out`."""
    ids: set[str] = set()
    for part in part_files(out):
        ids.update(str(i) for i in pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def rows_in_run(out: Path, run_token: str) -> int:
    """Rows written by one run (its files carry its token)."""
    prefix = f"{PART_PREFIX}{run_token}-"
    return sum(pq.read_metadata(p).num_rows for p in part_files(out) if p.name.startswith(prefix))


def dedupe(out: Path) -> int:
    """Keep the first occurrence of every id across the part files; the number of rows dropped."""
    seen: set[str] = set()
    dropped = 0
    for part in part_files(out):
        ids = [str(i) for i in pq.read_table(part, columns=["id"]).column("id").to_pylist()]
        repeated = [i in seen for i in ids]
        seen.update(ids)
        if not any(repeated):
            continue
        dropped += sum(repeated)
        table = pq.read_table(part)
        keep = pa.array([not r for r in repeated])
        kept = table.filter(keep)
        if kept.num_rows:
            write_table_atomic(kept, part)
        else:
            part.unlink()
        log.warning("%s: dropped %d rows already written by another file", part.name, sum(repeated))
    return dropped


def unify_schemas(out: Path) -> int:
    """Give every part file one schema; the number of files rewritten.

    Blocks are written separately, so a pass-through column that is all null in one block is
    typed null there and string (or int...) in another; readers take one file's schema and
    refuse the others. Files are cast to the permissive union of all schemas.
    """
    parts = part_files(out)
    schemas = [pq.read_schema(p) for p in parts]
    if len({str(sc) for sc in schemas}) <= 1:
        return 0
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        log.warning("output files have incompatible schemas, left as written: %s", exc)
        return 0
    rewritten = 0
    for part, schema in zip(parts, schemas):
        if schema.equals(unified):
            continue
        table = pq.read_table(part)
        n = table.num_rows
        columns = [
            table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
            for f in unified
        ]
        write_table_atomic(pa.Table.from_arrays(columns, schema=unified), part)
        rewritten += 1
    return rewritten


def skip_done(batch: pa.Table, done) -> pa.Table:
    """Ray Data batch function: drop the input rows whose id is already in the output (resume).

    `done` is the set of ids, or an ObjectRef of it (one copy in the object store, not one per task).
    """
    from pipeline.rows import row_id

    if not isinstance(done, (set, frozenset)):
        import ray

        done = ray.get(done)
    keep = [row_id(r) not in done for r in batch.to_pylist()]
    return batch.filter(pa.array(keep, type=pa.bool_()))
