"""Tracking never sinks a job and never logs a run twice (a real `mlflow server` on 127.0.0.1)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.tracking import RECORD_NAME, RECORD_TAG, RunRecord, log_run, upload
from tests.services import MlflowServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def make_record(uri: str, name: str = "r") -> RunRecord:
    return RunRecord(
        experiment="kvpipe-tracking-test",
        run_name=name,
        params={"policy.name": "snapkv", "policy.ratio": "0.5"},
        metrics={"rows_out": 3, "accuracy": 0.5},
        tags={"kvpipe.output": "/nowhere"},
        uri=uri,
        series={
            "system/cpu_utilization_percentage": [[10.0, 1_700_000_000_000, 0], [20.0, 1_700_000_001_000, 1]]
        },
    )


def runs_with(client: MlflowClient, record: RunRecord):
    exp = client.get_experiment_by_name(record.experiment)
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RECORD_TAG}` = '{record.record_id}'"
    )


def test_hanging_server_returns_within_the_deadline(tmp_path):
    # a server that accepts connections and never answers
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        record = tracking.enrich(make_record(f"http://127.0.0.1:{sock.getsockname()[1]}"))  # local work
        started = time.time()
        assert log_run(record, tmp_path / RECORD_NAME, timeout_s=3) is None
        assert time.time() - started < 3 + 2  # the deadline holds against a server that never answers
        saved = RunRecord.load(tmp_path / RECORD_NAME)
        assert saved.metrics["rows_out"] == 3 and saved.run_id is None and not saved.complete
        assert "versions.mlflow" in saved.params and "devices.gpus" in saved.params
    finally:
        stop.set()
        for c in held:
            c.close()
        sock.close()


def test_a_late_logging_thread_and_an_upload_make_one_run(tmp_path, mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    record = make_record(mlflow_server.uri, "late")
    path = tmp_path / RECORD_NAME
    first = log_run(record, path, timeout_s=0.001)  # misses its deadline; the thread goes on
    assert first is None
    run_id = upload(path, timeout_s=60)  # races the late thread: same run, not a second one
    assert run_id
    deadline = time.time() + 60
    while not RunRecord.load(path).complete and time.time() < deadline:
        time.sleep(0.2)
    runs = runs_with(client, record)
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.data.tags[tracking.COMPLETE_TAG] == "complete" and run.info.status == "FINISHED"
    assert run.data.metrics["rows_out"] == 3
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert sorted(m.value for m in history) == [10.0, 20.0]  # logged twice, stored once


def test_upload_finds_a_run_a_lost_thread_created(tmp_path, mlflow_server):
    """The record never heard back (run id unknown), but the run exists: upload resumes it by tag."""
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    record = make_record(mlflow_server.uri, "lost")
    path = tmp_path / RECORD_NAME
    exp_id = tracking._experiment_id(client, record.experiment)
    created = client.create_run(exp_id, tags={RECORD_TAG: record.record_id}, run_name="lost")
    record.save(path)  # run_id None, as if the thread had died after create_run
    data = json.loads(path.read_text())
    assert data["run_id"] is None
    assert upload(path, timeout_s=60) == created.info.run_id
    assert upload(path, timeout_s=60) == created.info.run_id  # again: nothing new
    runs = runs_with(client, record)
    assert len(runs) == 1 and runs[0].data.metrics["accuracy"] == 0.5
