"""Sweeps on real components: local Ray, tiny-llama, a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import time

import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.sweep import build_sweep, run_sweep
from tests.services import MlflowServer

pytestmark = pytest.mark.slow

METRICS = [
    "accuracy",
    "accuracy.passkey",
    "compression_ratio",
    "kv_bytes_kept",
    "kv_bytes_full",
    "peak_device_bytes",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "rows_per_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "system.cpu_utilization_percentage_max",
]
PLOTS = {"report/accuracy_vs_budget.png", "report/throughput_vs_memory.png", "report/task_heatmap.png"}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a neighbour's cluster
    yield ray
    ray.shutdown()


def sweep_data(tmp_path, uri: str, experiment: str) -> dict:
    return {
        "model": "tiny-llama",
        "dtype": "float32",
        "generation": {"max_new_tokens": 3},
        "input": {
            "path": str(tmp_path / "data" / "passkey.parquet"),
            "generate": {"task": "passkey", "context_length": 128, "samples": 2, "seed": 0},
        },
        "output": {"path": str(tmp_path / "sweep")},
        "tracking": {"uri": uri, "experiment": experiment, "timeout_s": 5},
        "cluster": {"rows_per_task": 4},
        "grid": {"policies": ["streaming_llm", "snapkv"], "ratios": [0.5, 0.25]},
    }


def kill_server(server: MlflowServer) -> None:
    """SIGKILL the server and its workers (`mlflow server` serves from child processes)."""
    import psutil

    proc = psutil.Process(server.proc.pid)
    family = [*proc.children(recursive=True), proc]
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    server.proc.wait()
    psutil.wait_procs(family, timeout=10)


def family(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kvpipe.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG)]
    return parents, children


@pytest.fixture
def live_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    yield server
    server.stop()


def test_a_2x2_sweep_logs_a_parent_four_children_and_the_report(tmp_path, ray_local, live_server):
    sweep = build_sweep(sweep_data(tmp_path, live_server.uri, "sweep-live"))
    result = run_sweep(sweep)
    client = MlflowClient(tracking_uri=live_server.uri)
    parents, children = family(client, "sweep-live")
    assert result.tracking_ok and len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.run_id == result.parent_run_id
    assert {c.data.tags[tracking.PARENT_TAG] for c in children} == {parent.info.run_id}
    names = {c.info.run_name for c in children}
    assert names == {"streaming_llm-r0.5", "streaming_llm-r0.25", "snapkv-r0.5", "snapkv-r0.25"}
    for c in children:
        missing = [m for m in METRICS if m not in c.data.metrics]
        assert not missing, (c.info.run_name, missing)
        p = c.data.params
        assert {"versions.torch", "versions.transformers", "versions.mlflow", "devices.gpus"} <= set(p)
        assert (
            p["output.resolved_path"]
            == c.data.tags["kvpipe.output"]
            == str(tmp_path / "sweep" / c.info.run_name)
        )
        assert c.inputs.dataset_inputs and "passkey.parquet" in c.inputs.dataset_inputs[0].dataset.source
        assert len(client.get_metric_history(c.info.run_id, "system/cpu_utilization_percentage")) >= 2
    # apples to apples: the children differ only in what the grid sweeps
    ignore = set(sweep.swept) | {"output.path", "tracking.run_name", "output.resolved_path"}
    settings = [
        {k: v for k, v in c.data.params.items() if k not in ignore and not k.startswith("devices.")}
        for c in children
    ]
    assert all(s == settings[0] for s in settings)
    ratios = {(c.data.params["policy.name"], c.data.params["policy.ratio"]) for c in children}
    assert len(ratios) == 4
    by_name = {c.info.run_name: c.data.metrics for c in children}
    assert by_name["snapkv-r0.25"]["compression_ratio"] < by_name["snapkv-r0.5"]["compression_ratio"] < 0.6
    # the report: on disk beside the output and logged to the parent
    assert {f.name for f in result.report_files} >= {
        "report.md",
        "report.html",
        *(p.split("/")[1] for p in PLOTS),
    }
    assert all(f.stat().st_size > 0 for f in result.report_files)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert PLOTS <= logged and "report/report.md" in logged


def test_server_killed_mid_sweep_then_upload_lands_everything(tmp_path, ray_local):
    root = tmp_path / "mlflow"
    server = MlflowServer(root)
    experiment = "sweep-killed"
    killed_at: list[float] = []

    def kill_after_first(point, entry):
        if not killed_at:
            assert entry["run_id"]  # the first child reached the server
            kill_server(server)
            killed_at.append(time.time())

    sweep = build_sweep(sweep_data(tmp_path, server.uri, experiment))
    started = time.time()
    result = run_sweep(sweep, on_point_done=kill_after_first)
    wall = time.time() - started
    jobs_s = sum(p["summary"]["wall_s"] for p in result.points)
    # bounded: the dead server costs at most a couple of deadlines (timeout_s=5), not minutes of retries
    assert wall - jobs_s < 90, (wall, jobs_s)
    assert not result.tracking_ok and len(result.points) == 4
    out = sweep.output
    records = {p.name: tracking.RunRecord.load(out / p.name / tracking.RECORD_NAME) for p in sweep.points}
    first = sweep.points[0].name
    assert records[first].complete and records[first].run_id
    for name, rec in records.items():  # every point's metrics are kept locally
        assert rec.metrics["rows_out"] == 2 and "compression_ratio" in rec.metrics
        if name != first:
            assert rec.run_id is None
    parent_rec = tracking.RunRecord.load(out / tracking.RECORD_NAME)
    assert parent_rec.run_id and not parent_rec.complete  # opened before the kill, never finished
    assert (out / "report" / "accuracy_vs_budget.png").exists()

    # later: a server on the same store (another port), and the upload
    server = MlflowServer(root)
    try:
        results = tracking.upload_dir(out, uri=server.uri, timeout_s=60)
        assert all(results.values()) and len(results) == 5
        again = tracking.upload_dir(out, uri=server.uri, timeout_s=60)  # repeat: nothing duplicates
        assert again == results
        client = MlflowClient(tracking_uri=server.uri)
        parents, children = family(client, experiment)
    finally:
        server.stop()
    assert [p.info.run_id for p in parents] == [parent_rec.run_id]
    assert len(children) == 4 and {c.data.tags[tracking.PARENT_TAG] for c in children} == {parent_rec.run_id}
    assert records[first].run_id in {c.info.run_id for c in children}  # resumed, not re-created
    for c in children:
        assert "decode_tokens_per_s" in c.data.metrics and c.data.tags[tracking.COMPLETE_TAG] == "complete"
    assert parents[0].data.metrics["points_ok"] == 4
