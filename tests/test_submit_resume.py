"""A job submitted to a real `ray start` cluster, and a job resumed after its driver was killed.

Both start their own Ray (a `ray start --head --block` process group, or the driver's embedded
Ray in a subprocess) in their own session, and kill that process group in teardown.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.services import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("KVPIPE_FAULT")}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def kill_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop a process we started in its own session, and everything it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; make sure its children are too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 with its own temp dir (never the machine's default cluster)."""
    temp = tempfile.mkdtemp(prefix="kvray", dir="/tmp")
    port, dash = free_port(), free_port()
    cmd = [
        "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
    ]  # fmt: skip
    log = open(Path(temp) / "ray-start.log", "w")
    proc = subprocess.Popen(
        cmd, env=clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed: {(Path(temp) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        kill_group(proc)
        log.close()


def test_ray_job_submit_runs_the_readme_job(tmp_path, ray_head):
    out = tmp_path / "out"
    cmd = [
        "ray", "job", "submit", "--address", ray_head, "--working-dir", ".", "--",
        "python", "-m", "jobs", "run", "jobs/examples/passkey.yaml",
        "--set", "model=tiny-llama",
        "--set", f"input.path={tmp_path / 'passkey.parquet'}",
        "--set", "input.generate.samples=3",
        "--set", "input.generate.context_length=256",
        "--set", "generation.max_new_tokens=4",
        "--set", f"output.path={out}",
        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    assert "kvpipe: 3/3 rows written" in done.stdout + done.stderr
    table = pq.ParquetDataset(str(out)).read()
    assert table.num_rows == 3 and table["error"].null_count == 3
    assert json.loads((out / "_summary.json").read_text())["rows_missing"] == 0


def run_driver(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs", "run", *args],
        cwd=REPO,
        env=clean_env(),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the driver and its embedded Ray: one process group to kill
    )


def test_resume_after_the_driver_is_killed_processes_only_the_missing_rows(tmp_path):
    rows = [{"id": f"q{i}", "prompt": f"Write one short sentence about the number {i}."} for i in range(10)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    args = [
        "--model", "smollm2", "--input", str(src), "--output", str(out), "--max-new-tokens", "8",
        "--set", "dtype=float32", "--set", "cluster.rows_per_task=1", "--set", "cluster.batch_size=1",
        "--set", "tracking.enabled=false",
    ]  # fmt: skip

    first = run_driver(args, tmp_path / "first.log")
    try:
        deadline = time.time() + 300
        while len(list(out.glob("part-*.parquet"))) < 3:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no output rows in time"
            time.sleep(0.2)
    finally:
        kill_group(first, grace_s=0.1)  # SIGTERM then SIGKILL: the driver dies mid-job
    written = pq.ParquetDataset(str(out)).read()
    before = set(written["id"].to_pylist())
    assert 3 <= len(before) < len(rows), "the driver was not killed mid-job"
    first_replicas = set(written["replica"].to_pylist())

    second = run_driver([*args, "--set", "output.mode=resume"], tmp_path / "second.log")
    try:
        assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        kill_group(second)
    table = pq.ParquetDataset(str(out)).read()
    counts = collections.Counter(table["id"].to_pylist())
    assert set(counts) == {r["id"] for r in rows} and set(counts.values()) == {1}
    assert table["error"].null_count == len(rows)
    # the rerun processed exactly the missing rows: by its summary and by the rows' replica marker
    summary = json.loads((out / "_summary.json").read_text())
    missing = len(rows) - len(before)
    assert summary["rows_skipped"] == len(before)
    assert summary["rows_processed"] == missing
    assert (summary["rows_in"], summary["rows_out"], summary["rows_missing"]) == (10, 10, 0)
    by_second = [r for r in table.to_pylist() if r["replica"] not in first_replicas]
    assert len(by_second) == missing and not {r["id"] for r in by_second} & before
