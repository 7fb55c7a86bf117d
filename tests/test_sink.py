"""Exactly-once output files (pipeline/sink.py) on real Parquet: names, dedupe, schemas, partials."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import sink


def test_the_same_rows_get_the_same_file_name():
    assert sink.rows_key(["b", "a"]) == sink.rows_key(["a", "b"]) != sink.rows_key(["a", "c"])


def test_dedupe_keeps_each_id_once_and_schemas_are_unified(tmp_path):
    sink.write_table_atomic(pa.table({"id": ["a", "b"], "x": pa.nulls(2)}), tmp_path / "part-r1-1.parquet")
    sink.write_table_atomic(pa.table({"id": ["b", "c"], "x": ["s", "t"]}), tmp_path / "part-r1-2.parquet")
    sink.write_table_atomic(pa.table({"id": ["a"], "x": ["u"]}), tmp_path / "part-r2-3.parquet")
    assert sink.dedupe(tmp_path) == 2
    assert not (tmp_path / "part-r2-3.parquet").exists()  # every row of it was already written
    assert sink.unify_schemas(tmp_path) == 1
    rows = pq.ParquetDataset(str(tmp_path)).read().to_pylist()
    assert sorted(r["id"] for r in rows) == ["a", "b", "c"]
    assert sink.existing_ids(tmp_path) == {"a", "b", "c"}
    assert sink.rows_in_run(tmp_path, "r1") == 3 and sink.rows_in_run(tmp_path, "r2") == 0


def test_partial_files_are_removed(tmp_path):
    sink.write_table_atomic(pa.table({"id": ["a"]}), tmp_path / "part-r-1.parquet")
    (tmp_path / ".tmp-part-r-2.parquet.123").write_bytes(b"PAR1 half")
    (tmp_path / "part-r-3.parquet").write_bytes(b"not parquet")
    assert sorted(sink.clean_partial(tmp_path)) == [".tmp-part-r-2.parquet.123", "part-r-3.parquet"]
    assert sink.existing_ids(tmp_path) == {"a"}


def test_skip_done_filters_rows_by_id():
    batch = pa.table({"id": ["a", "b", None], "prompt": ["x", "y", "z"]})
    kept = sink.skip_done(batch, frozenset({"a"}))
    assert kept.column("prompt").to_pylist() == ["y", "z"]
