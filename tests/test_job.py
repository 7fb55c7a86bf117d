"""The whole job on real components: local Ray, Parquet/JSONL in and out, an MLflow server."""

from __future__ import annotations

import json
import os

import mlflow
import pyarrow.parquet as pq
import pytest

from jobs.spec import load_spec
from pipeline.job import run_job
from pipeline.tracking import RECORD_NAME, RunRecord, upload
from tests.services import MlflowServer, free_port

pytestmark = pytest.mark.slow

GOOD = [
    {"id": "g1", "prompt": "What is the capital of France?", "answer": "Paris", "lang": "en"},
    {
        "id": "g2",
        "context": "The secret word is banana.",
        "question": "What is the secret word?",
        "answer": ["banana"],
        "lang": "en",
    },
    {"prompt": "Say hello.", "lang": "en"},  # no id: one is made
]
BAD_LINES = [
    '{"id": "b1", "prompt": ""}',
    '{"id": "b2", "prompt": 17}',
    '{"id": "b3"}',
    "this is not json",
]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


def test_job_writes_every_row_and_logs_to_the_mlflow_server(tmp_path, ray_local, mlflow_server):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, GOOD, BAD_LINES)
    spec = load_spec(
        None,
        [
            f"input.path={src}",
            f"output.path={tmp_path / 'out'}",
            "policy.name=streaming_llm",
            "policy.ratio=0.5",
            "generation.max_new_tokens=8",
            f"tracking.uri={mlflow_server.uri}",
            "tracking.experiment=kvpipe-test",
            "tracking.run_name=job-test",
            "cluster.rows_per_task=4",
            "dtype=float32",
        ],
    )
    result = run_job(spec)

    table = pq.ParquetDataset(str(result.output_dir)).read()
    rows = {r["id"]: r for r in table.to_pylist() if r["id"]}
    assert table.num_rows == len(GOOD) + len(BAD_LINES)
    assert {"g1", "g2", "b1", "b2", "b3"} <= set(rows)
    for rid in ("g1", "g2"):
        assert rows[rid]["error"] is None and rows[rid]["output_text"]
        assert rows[rid]["policy"] == "streaming_llm" and rows[rid]["lang"] == "en"  # pass-through
        assert rows[rid]["score"] in (0.0, 1.0)
        assert 0 < rows[rid]["kv_bytes_kept"] < rows[rid]["kv_bytes_full"]
    assert "empty prompt" in rows["b1"]["error"]
    assert "wrong type" in rows["b2"]["error"]
    assert "missing prompt" in rows["b3"]["error"]
    made = [r for r in table.to_pylist() if r["id"].startswith("row-")]
    assert len(made) == 2  # the row without an id and the unparseable line
    assert any("bad JSON" in (r["error"] or "") for r in made)

    s = result.summary
    assert (s["rows_in"], s["rows_out"], s["rows_error"], s["rows_missing"]) == (7, 7, 4, 0)
    assert result.run_id is not None
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.data.params["policy.name"] == "streaming_llm"
    assert run.data.params["policy.ratio"] == "0.5"
    assert run.data.metrics["rows_out"] == 7
    assert 0.45 < run.data.metrics["compression_ratio"] < 0.6
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"_spec.yaml", "_summary.json"} <= artifacts


def test_dead_tracking_server_does_not_sink_the_job(tmp_path, ray_local, mlflow_server):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, GOOD[:1])
    dead = f"http://127.0.0.1:{free_port()}"
    spec = load_spec(
        None,
        [
            f"input.path={src}",
            f"output.path={tmp_path / 'out'}",
            "generation.max_new_tokens=4",
            f"tracking.uri={dead}",
            "tracking.timeout_s=5",
            "dtype=float32",
        ],
    )
    result = run_job(spec)
    assert result.run_id is None and result.summary["rows_out"] == 1
    record_path = result.output_dir / RECORD_NAME
    assert RunRecord.load(record_path).metrics["rows_out"] == 1
    # later, the saved record goes to a live server
    run_id = upload(record_path, uri=mlflow_server.uri)
    run = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server.uri).get_run(run_id)
    assert run.data.metrics["rows_out"] == 1


def test_default_store_is_local_sqlite(tmp_path, ray_local, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = tmp_path / "in.parquet"
    from pipeline.arrow_rows import rows_to_table

    pq.write_table(rows_to_table(GOOD[1:]), src)
    spec = load_spec(
        None, [f"input.path={src}", "output.path=out", "generation.max_new_tokens=4", "dtype=float32"]
    )
    result = run_job(spec)
    assert (tmp_path / "mlflow.db").exists()
    run = mlflow.tracking.MlflowClient(tracking_uri="sqlite:///mlflow.db").get_run(result.run_id)
    assert run.data.metrics["rows_ok"] == 2
