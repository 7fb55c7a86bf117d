"""MLflow logging that never sinks a job, and never logs a run twice.

Every run's params, metrics, system-metric series, input data sets, tags and artifacts are
first written to a local record (`_tracking.json` beside the output). Logging to MLflow then
runs in a worker thread with a deadline; if the store is slow or down, the job carries on,
says so, and the record can be uploaded later with `kvpipe tracking upload OUTPUT_DIR`.

Duplicate safety. A record carries its own id (`record_id`, made when the record is made),
set as the tag `kvpipe.record_id` in the same call that creates the MLflow run. Logging is
find-or-create: a known `run_id`, else a run found by that tag, else a new run. Everything
after creation is idempotent (params with the same value, metrics with the record's fixed
timestamps and steps, which the store deduplicates, data set inputs deduplicated by digest,
artifacts overwritten in place), and the last step sets `kvpipe.logged=complete`. So a logging
thread that missed its deadline and finishes later, and an upload that runs after it (or
during it: in one process they take the same per-record lock), end in one run, not two.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
RECORD_NAME = "_tracking.json"
SWEEP_MANIFEST = "_sweep.json"  # a sweep's output dir: parent record here, one per point below
MAX_PARAM_CHARS = 6000
RECORD_TAG = "kvpipe.record_id"
COMPLETE_TAG = "kvpipe.logged"
PARENT_TAG = "mlflow.parentRunId"
LIBRARIES = ("torch", "transformers", "ray", "deepspeed", "mlflow", "kvpipe", "pyarrow")
DATASET_SAMPLE_ROWS = 10_000  # the data set's digest and profile come from at most this many rows


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested spec -> {"policy.name": "snapkv", ...} with string values MLflow accepts."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RunRecord:
    """Everything one MLflow run holds, kept locally first."""

    experiment: str
    run_name: str | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list = field(default_factory=list)  # a path, or [path, artifact_dir]
    uri: str = DEFAULT_URI
    run_id: str | None = None  # set once MLflow has created the run
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    complete: bool = False  # everything below has reached MLflow
    parent_run_id: str | None = None  # nested under this run (tag mlflow.parentRunId)
    series: dict[str, list] = field(default_factory=dict)  # key -> [[value, timestamp_ms, step], ...]
    datasets: list[dict] = field(default_factory=list)  # mlflow Dataset fields + "context"
    start_ms: int = field(default_factory=_now_ms)
    end_ms: int | None = None
    timestamp_ms: int = field(default_factory=_now_ms)  # fixed metric timestamp: re-logging dedups
    enriched: bool = False

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))
        os.replace(tmp, path)  # atomic: a late logging thread and the driver may both save

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        data = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


# -- what every run records about where it ran ------------------------------------------------
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_names() -> dict[str, str]:
    """The driver's view: CPU model and core count, GPU names (torch, else nvidia-smi)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    names = {"devices.cpu": f"{cpu} x{os.cpu_count()}", "devices.host": platform.node()}
    gpus: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001  (a broken CUDA set-up must not stop tracking)
        gpus = []
    if not gpus and shutil.which("nvidia-smi"):
        gpus = _nvidia_smi(["name"], cast=str)
    names["devices.gpus"] = ", ".join(gpus) if gpus else "none"
    return names


def dataset_entry(path: str | Path, name: str | None = None, context: str = "eval") -> dict | None:
    """An MLflow data set (via `mlflow.data.from_pandas`, source = the input path) as plain fields."""
    path = Path(path)
    try:
        import mlflow.data
        import pandas as pd
        import pyarrow.parquet as pq

        if path.suffix.lower() in (".jsonl", ".json"):
            df = pd.read_json(path, lines=True, nrows=DATASET_SAMPLE_ROWS, dtype=False)
        else:
            dataset = pq.ParquetDataset(str(path))
            df = dataset.read().slice(0, DATASET_SAMPLE_ROWS).to_pandas()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_pandas(df, source=str(path), name=name or path.stem)
            entity = ds._to_mlflow_entity()
    except Exception as exc:  # noqa: BLE001  (an unreadable input only loses the data set entry)
        log.warning("could not describe the input %s as an MLflow data set: %s", path, exc)
        return None
    return {
        "name": entity.name,
        "digest": entity.digest,
        "source_type": entity.source_type,
        "source": entity.source,
        "schema": entity.schema,
        "profile": entity.profile,
        "context": context,
    }


def enrich(record: RunRecord) -> RunRecord:
    """Add library versions, device names, the input data set and the output location."""
    if record.enriched:
        return record
    record.params.update({f"versions.{k}": v for k, v in library_versions().items()})
    record.params.update(device_names())
    output = record.tags.get("kvpipe.output")
    if output:
        record.params.setdefault("output.resolved_path", output)
    source = record.params.get("input.resolved_path")
    if source and not record.datasets and Path(source).exists():
        entry = dataset_entry(source)
        if entry:
            record.datasets.append(entry)
    record.enriched = True
    return record


# -- system metrics (own sampler: MLflow's monitor needs a live run and server) -----------------
def _nvidia_smi(fields: list[str], cast=float) -> list:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [line.split(", ") for line in out.strip().splitlines() if line.strip()]
    return [cast(r[0]) if len(fields) == 1 else [cast(v) for v in r] for r in rows]


class SystemSampler:
    """Samples CPU, memory and GPU every `interval_s` into MLflow's `system/...` metric names.

    Figures are kept in memory and go into the run record as metric series, so they survive a
    dead tracking server and show in the MLflow UI's system metrics tab once logged.
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.series: dict[str, list] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu = shutil.which("nvidia-smi") is not None

    def sample(self, step: int) -> None:
        import psutil

        ts = _now_ms()
        mem = psutil.virtual_memory()
        values = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
            "system/system_memory_usage_megabytes": (mem.total - mem.available) / 2**20,
            "system/system_memory_usage_percentage": mem.percent,
        }
        if self._gpu:
            for i, (util, used) in enumerate(_nvidia_smi(["utilization.gpu", "memory.used"])):
                values[f"system/gpu_{i}_utilization_percentage"] = util
                values[f"system/gpu_{i}_memory_usage_megabytes"] = used
        for key, value in values.items():
            self.series.setdefault(key, []).append([float(value), ts, step])

    def _loop(self) -> None:
        step = 0
        while not self._stop.wait(self.interval_s):
            step += 1
            self.sample(step)

    def __enter__(self) -> SystemSampler:
        import psutil

        psutil.cpu_percent(interval=None)  # primes the CPU counter
        self.sample(0)
        self._thread = threading.Thread(target=self._loop, name="kvpipe-sysmetrics", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(self.interval_s + 5)
        self.sample(len(next(iter(self.series.values()), [])))

    def summary(self) -> dict[str, float]:
        """Mean and max of each series, as plain metrics (`system.cpu_utilization_percentage_max`)."""
        out = {}
        for key, points in self.series.items():
            values = [p[0] for p in points]
            name = key.replace("system/", "system.")
            out[f"{name}_mean"] = sum(values) / len(values)
            out[f"{name}_max"] = max(values)
        return out


# -- logging ---------------------------------------------------------------------------------
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _record_lock(record_id: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(record_id, threading.Lock())


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001  (created meanwhile by another process)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(client, experiment_id: str, record_id: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RECORD_TAG}` = '{record_id}'")
    return runs[0] if runs else None


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _log_to_mlflow(record: RunRecord, complete: bool, created: dict) -> str:
    """Find-or-create the record's run, then log everything idempotently."""
    from mlflow import MlflowClient
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=record.uri)
    exp_id = _experiment_id(client, record.experiment)
    run = None
    if record.run_id:
        try:
            run = client.get_run(record.run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # (another store: find it by its tag, else create it there)
    if run is None:
        run = find_run(client, exp_id, record.record_id)
    if run is None:
        tags = {RECORD_TAG: record.record_id}
        if record.parent_run_id:
            tags[PARENT_TAG] = record.parent_run_id
        run = client.create_run(exp_id, start_time=record.start_ms, tags=tags, run_name=record.run_name)
    run_id = run.info.run_id
    created["run_id"] = run_id
    if run.data.tags.get(COMPLETE_TAG) == "complete" and complete:
        return run_id
    params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in record.params.items()]
    for chunk in _chunks(params, 100):
        client.log_batch(run_id, params=chunk)
    tags = [RunTag(k, str(v)) for k, v in record.tags.items()]
    if record.parent_run_id and PARENT_TAG not in run.data.tags:
        tags.append(RunTag(PARENT_TAG, record.parent_run_id))
    for chunk in _chunks(tags, 100):
        client.log_batch(run_id, tags=chunk)
    if not complete:
        return run_id
    metrics = [
        Metric(k, float(v), record.timestamp_ms, 0)
        for k, v in record.metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    for key, points in record.series.items():
        metrics += [Metric(key, float(v), int(ts), int(step)) for v, ts, step in points]
    for chunk in _chunks(metrics, 1000):
        client.log_batch(run_id, metrics=chunk)
    if record.datasets:
        inputs = []
        for d in record.datasets:
            fields = {k: d[k] for k in ("name", "digest", "source_type", "source", "schema", "profile")}
            context = InputTag("mlflow.data.context", d.get("context") or "eval")
            inputs.append(DatasetInput(Dataset(**fields), tags=[context]))
        client.log_inputs(run_id, datasets=inputs)
    for artifact in record.artifacts:
        path, artifact_dir = (artifact, None) if isinstance(artifact, str) else artifact
        if Path(path).is_dir():
            client.log_artifacts(run_id, path, artifact_dir)
        elif Path(path).exists():
            client.log_artifact(run_id, path, artifact_dir)
    client.set_terminated(run_id, "FINISHED", end_time=record.end_ms or _now_ms())
    client.set_tag(run_id, COMPLETE_TAG, "complete")
    return run_id


def _bounded_env(timeout_s: float) -> None:
    """MLflow's HTTP client retries for minutes by default; cap each request."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))


def log_run(
    record: RunRecord, record_path: Path, timeout_s: float, *, complete: bool = True, quiet: bool = False
) -> str | None:
    """Save the record, then log it to MLflow within `timeout_s`; returns the run id or None.

    `complete=False` only finds or creates the run and logs params and tags (a sweep's parent
    run, opened before its children). A thread that misses the deadline may still finish: it
    then fills in the record's run id (and `complete`) itself, and a later upload resumes the
    same run instead of creating another.
    """
    enrich(record)
    record.save(record_path)
    _bounded_env(timeout_s)
    outcome: dict = {}
    created: dict = {}
    finished = threading.Event()
    lock = _record_lock(record.record_id)

    def work() -> None:
        try:
            with lock:
                run_id = _log_to_mlflow(record, complete, created)
            outcome["run_id"] = run_id
        except Exception as exc:  # noqa: BLE001  (any tracking failure is reported, never raised)
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        # Late or not, remember what MLflow has, so an upload resumes instead of duplicating.
        run_id = outcome.get("run_id") or created.get("run_id")
        if run_id and (record.run_id != run_id or (complete and "run_id" in outcome)):
            record.run_id = run_id
            record.complete = record.complete or (complete and "run_id" in outcome)
            try:
                record.save(record_path)
            except OSError:
                pass
        finished.set()

    thread = threading.Thread(target=work, name="kvpipe-mlflow", daemon=True)
    thread.start()
    finished.wait(timeout_s)
    if "run_id" in outcome:
        return outcome["run_id"]
    why = outcome.get("error") or f"no answer within {timeout_s:.0f} s"
    if not quiet:
        log.warning(
            "MLflow tracking at %s failed (%s); the run is kept in %s: upload it later with "
            "`kvpipe tracking upload %s`",
            record.uri,
            why,
            record_path,
            record_path.parent,
        )
    return None


def upload(record_path: Path, uri: str | None = None, timeout_s: float = 60.0) -> str | None:
    """Log a saved record that has not fully reached MLflow; returns its run id.

    Resumes the run the record names (or the one tagged with its record id) when there is one.
    """
    record = RunRecord.load(record_path)
    if uri and uri != record.uri:
        record.uri = uri
    elif record.run_id and record.complete:
        return record.run_id
    return log_run(record, record_path, timeout_s)


def upload_dir(directory: Path, uri: str | None = None, timeout_s: float = 60.0) -> dict[str, str | None]:
    """Upload a job's output dir, or a sweep's: the parent first, then every point nested under it.

    Returns {directory: run id or None}. Points are uploaded only once the parent is in MLflow.
    """
    directory = Path(directory)
    manifest = directory / SWEEP_MANIFEST
    parent_id = upload(directory / RECORD_NAME, uri, timeout_s)
    results: dict[str, str | None] = {str(directory): parent_id}
    if not manifest.exists():
        return results
    for point in json.loads(manifest.read_text())["points"]:
        path = directory / point["dir"] / RECORD_NAME
        if not path.exists():
            continue  # the point failed before it had metrics
        if parent_id is None:
            results[str(path.parent)] = None
            continue
        record = RunRecord.load(path)
        if record.parent_run_id != parent_id:
            record.parent_run_id = parent_id
            record.complete = False
            record.save(path)
        results[str(path.parent)] = upload(path, uri, timeout_s)
    return results
