"""MLflow logging that never sinks a job.

Every run's params, metrics and artifacts are first written to a local record
(`_tracking.json` beside the output). Logging to MLflow then runs in a worker thread with a
deadline; if the store is slow or down, the job carries on, says so, and the record can be
uploaded later with `kvpipe tracking upload OUTPUT_DIR`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
RECORD_NAME = "_tracking.json"
MAX_PARAM_CHARS = 6000


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


@dataclass
class RunRecord:
    """Everything one MLflow run holds, kept locally first."""

    experiment: str
    run_name: str | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    uri: str = DEFAULT_URI
    run_id: str | None = None  # set once MLflow has it

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return cls(**json.loads(path.read_text()))


def _log_to_mlflow(record: RunRecord) -> str:
    import mlflow

    mlflow.set_tracking_uri(record.uri)
    mlflow.set_experiment(record.experiment)
    with mlflow.start_run(run_name=record.run_name) as run:
        mlflow.log_params(record.params)
        mlflow.log_metrics({k: float(v) for k, v in record.metrics.items() if v is not None})
        if record.tags:
            mlflow.set_tags(record.tags)
        for artifact in record.artifacts:
            if Path(artifact).exists():
                mlflow.log_artifact(artifact)
        return run.info.run_id


def _bounded_env(timeout_s: float) -> None:
    """MLflow's HTTP client retries for minutes by default; cap each request."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))


def log_run(record: RunRecord, record_path: Path, timeout_s: float) -> str | None:
    """Save the record, then log it to MLflow within `timeout_s`; returns the run id or None."""
    record.save(record_path)
    _bounded_env(timeout_s)
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["run_id"] = _log_to_mlflow(record)
        except Exception as exc:  # noqa: BLE001  (any tracking failure is reported, never raised)
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=work, name="kvpipe-mlflow", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "run_id" in outcome:
        record.run_id = outcome["run_id"]
        record.save(record_path)
        return record.run_id
    why = outcome.get("error") or f"no answer within {timeout_s:.0f} s"
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
    """Log a saved record that has not reached MLflow yet; returns the new run id."""
    record = RunRecord.load(record_path)
    if record.run_id:
        return record.run_id
    if uri:
        record.uri = uri
    return log_run(record, record_path, timeout_s)
