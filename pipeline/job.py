"""The driver of one job: input -> Ray Data inference stage -> Parquet, then metrics to MLflow.

```
read (Parquet / JSONL, tolerant) -> InferenceStage actors (one model replica each)
  -> write_parquet(output) ; summary from the written rows -> _summary.json + MLflow run
```
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.spec import JobSpec, dump_spec
from pipeline import metrics, tracking

log = logging.getLogger(__name__)

SPEC_NAME = "_spec.yaml"
SUMMARY_NAME = "_summary.json"


@dataclass
class JobResult:
    output_dir: Path
    summary: dict
    run_id: str | None


def ensure_input(spec: JobSpec) -> Path:
    """The input file; generated first when absent and the spec says how to make it."""
    path = Path(spec.input.path).resolve()  # Ray workers do not share the driver's cwd
    if path.exists():
        return path
    gen = spec.input.generate
    if gen is None:
        raise FileNotFoundError(f"input.path: {path} does not exist (and input.generate is not set)")
    from pipeline.models import load_tokenizer
    from pipeline.tasks import generate, write_rows

    log.info("generating %d %s rows of %d tokens into %s", gen.samples, gen.task, gen.context_length, path)
    rows = generate(
        gen.task, gen.context_length, gen.samples, gen.seed, load_tokenizer(spec.model), haystack=gen.haystack
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rows(rows, path)
    return path


def start_ray(address: str | None):
    """Connect to `address` / $RAY_ADDRESS, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    env = (
        {"env_vars": {"KVPIPE_HOME": os.environ.get("KVPIPE_HOME", "")}}
        if os.environ.get("KVPIPE_HOME")
        else None
    )
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, runtime_env=env, log_to_driver=True)
    return ray


def read_input(ray, path: Path):
    suffix = path.suffix.lower()
    if suffix == ".parquet" or path.is_dir():
        return ray.data.read_parquet(str(path))
    if suffix in (".jsonl", ".json"):
        from pipeline.arrow_rows import parse_jsonl_batch

        return ray.data.read_text(str(path)).map_batches(parse_jsonl_batch, batch_format="pyarrow")
    raise ValueError(f"input.path: {path} is neither Parquet nor JSONL")


def _replica_resources(spec: JobSpec) -> dict:
    gpus = spec.cluster.gpus_per_replica
    if gpus is None:
        import ray

        has_gpu = ray.cluster_resources().get("GPU", 0) > 0 and spec.device != "cpu"
        gpus = float(spec.tensor_parallel) if has_gpu else 0.0
    return {"num_cpus": spec.cluster.cpus_per_replica, "num_gpus": gpus}


def prepare_output(spec: JobSpec) -> Path:
    out = Path(spec.output.path).resolve()  # Ray workers do not share the driver's cwd
    if out.exists() and any(out.iterdir()):
        if spec.output.mode == "error":
            raise FileExistsError(f"output.path: {out} is not empty (output.mode is 'error')")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_job(spec: JobSpec) -> JobResult:
    from ray.data import ActorPoolStrategy

    from pipeline.stage import InferenceStage

    started = time.time()
    input_path = ensure_input(spec)
    out = prepare_output(spec)
    (out / SPEC_NAME).write_text(dump_spec(spec))
    ray = start_ray(spec.cluster.address)
    ds = read_input(ray, input_path)
    if spec.input.limit:
        ds = ds.limit(spec.input.limit)
    ds = ds.map_batches(
        InferenceStage,
        fn_constructor_kwargs={"spec": spec.to_dict()},
        compute=ActorPoolStrategy(size=spec.cluster.replicas),
        batch_size=spec.cluster.rows_per_task,
        batch_format="pyarrow",
        **_replica_resources(spec),
    )
    ds.write_parquet(str(out))
    wall_s = time.time() - started
    rows_in = _count_input_rows(ray, input_path, spec.input.limit)
    summary = metrics.summarize(out, rows_in=rows_in, wall_s=wall_s)
    summary["output"] = str(out.resolve())
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, sort_keys=True))
    run_id = None
    if spec.tracking.enabled:
        record = tracking.RunRecord(
            experiment=spec.tracking.experiment,
            run_name=spec.tracking.run_name,
            params={**tracking.flatten(spec.to_dict()), "input.resolved_path": str(input_path.resolve())},
            metrics={
                k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            tags={"kvpipe.output": str(out.resolve())},
            artifacts=[str(out / SPEC_NAME), str(out / SUMMARY_NAME)],
            uri=tracking.resolve_uri(spec.tracking.uri),
        )
        run_id = tracking.log_run(record, out / tracking.RECORD_NAME, spec.tracking.timeout_s)
    return JobResult(out, summary, run_id)


def _count_input_rows(ray, path: Path, limit: int | None) -> int:
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path) as f:
            n = sum(1 for line in f if line.strip())
    else:
        import pyarrow.parquet as pq

        n = pq.ParquetDataset(str(path)).read(columns=[]).num_rows
    return min(n, limit) if limit else n
