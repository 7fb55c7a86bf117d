"""The driver of one job: input -> Ray Data inference stage -> Parquet, then metrics to MLflow.

```
read (Parquet / JSONL, tolerant) [-> skip ids already written (resume)]
  -> replicas (InferenceStage actors, or TP coordinators + placement groups; pipeline/replicas.py)
  -> ExactlyOnceSink (idempotent per-block files; pipeline/sink.py) -> de-duplicate by id
  ; summary from the written rows -> _summary.json + MLflow run
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.spec import JobSpec, dump_spec
from pipeline import metrics, sink, tracking

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
        # "local": always a fresh embedded Ray, never the last `ray start` cluster on this machine
        ray.init(address="local", include_dashboard=False, runtime_env=env, log_to_driver=True)
    return ray


IO_CPUS = 0.25  # read, filter and write tasks: light, so replicas never starve them of CPU
REPLICA_START_TIMEOUT_S = 900  # every replica is up (model loaded) before rows flow; else a clear error


def read_input(ray, path: Path, blocks: int | None = None):
    """The input as a dataset of `blocks` blocks (None: Ray's choice), read with little CPU."""
    suffix = path.suffix.lower()
    if suffix == ".parquet" or path.is_dir():
        return ray.data.read_parquet(str(path), num_cpus=IO_CPUS, override_num_blocks=blocks)
    if suffix in (".jsonl", ".json"):
        from pipeline.arrow_rows import parse_jsonl_batch

        return ray.data.read_text(str(path), num_cpus=IO_CPUS, override_num_blocks=blocks).map_batches(
            parse_jsonl_batch, batch_format="pyarrow", num_cpus=IO_CPUS
        )
    raise ValueError(f"input.path: {path} is neither Parquet nor JSONL")


# what may differ between the run that wrote an output and a run that resumes it
RESUME_MAY_DIFFER = ("cluster", "tracking", "output")


def prepare_output(spec: JobSpec) -> Path:
    """The output directory: emptied (overwrite), refused (error) or kept (resume)."""
    out = Path(spec.output.path).resolve()  # Ray workers do not share the driver's cwd
    if out.exists() and any(out.iterdir()):
        if spec.output.mode == "error":
            raise FileExistsError(f"output.path: {out} is not empty (output.mode is 'error')")
        if spec.output.mode == "resume":
            _check_resumable(spec, out)
            sink.clean_partial(out)
            return out
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_resumable(spec: JobSpec, out: Path) -> None:
    """Resuming with another model, policy, generation or input would mix two jobs' rows."""
    import yaml

    saved_path = out / SPEC_NAME
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = spec.to_dict()
    for key in sorted(set(saved) | set(now)):
        if key not in RESUME_MAY_DIFFER and saved.get(key) != now.get(key):
            raise ValueError(
                f"output.mode: resume: {out} was written with a different {key!r} "
                f"({saved.get(key)!r} != {now.get(key)!r}); use another output.path or output.mode: overwrite"
            )


def run_job(spec: JobSpec) -> JobResult:
    """Run one job to completion; rows already in the output are kept when output.mode is resume."""
    from ray.data import ActorPoolStrategy

    from pipeline import replicas

    started = time.time()
    input_path = ensure_input(spec)
    out = prepare_output(spec)
    (out / SPEC_NAME).write_text(dump_spec(spec))
    ray = start_ray(spec.cluster.address)
    done = sink.existing_ids(out) if spec.output.mode == "resume" else set()
    run_token = sink.new_run_token()
    spec_dict = spec.to_dict()
    resources = ray.cluster_resources()
    n_replicas = replicas.replica_count(spec_dict, resources)
    placement_groups: list = []
    # Start rows only once every replica is up: rows spread over all replicas from the first
    # batch, and a cluster too small for the pool fails with a clear error instead of hanging.
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = REPLICA_START_TIMEOUT_S
    # Inference is compute-bound: send a batch to a free replica, not to the one beside its block.
    ctx.execution_options.actor_locality_enabled = False
    try:
        # blocks of about rows_per_task rows: every replica gets work, even from one small file
        # that would otherwise read as a single block (a task is one block)
        rows_in = _count_input_rows(ray, input_path, spec.input.limit)
        ds = read_input(ray, input_path, max(1, math.ceil(rows_in / spec.cluster.rows_per_task)))
        if spec.input.limit:
            ds = ds.limit(spec.input.limit)
        if done:
            log.info("resume: %d rows already in %s are skipped", len(done), out)
            ds = ds.map_batches(
                sink.skip_done,
                fn_kwargs={"done": ray.put(frozenset(done))},
                batch_format="pyarrow",
                num_cpus=IO_CPUS,
            )
        stage = replicas.replica_remote_args(spec_dict, resources, placement_groups)
        fn = stage.pop("fn")
        ds = ds.map_batches(
            fn,
            fn_constructor_kwargs={"spec": spec_dict, "fault": replicas.fault_from_env()},
            # two batches in flight per replica: the next one is ready when a replica finishes,
            # and the rest wait for whichever replica frees up first (balance over replicas)
            compute=ActorPoolStrategy(size=n_replicas, max_tasks_in_flight_per_actor=2),
            batch_size=spec.cluster.rows_per_task,
            batch_format="pyarrow",
            **stage,
        )
        ds.write_datasink(sink.ExactlyOnceSink(out, run_token), ray_remote_args={"num_cpus": IO_CPUS})
    finally:
        for pg in placement_groups:
            ray.util.remove_placement_group(pg)
    duplicates = sink.dedupe(out)
    sink.unify_schemas(out)
    wall_s = time.time() - started
    summary = metrics.summarize(out, rows_in=rows_in, wall_s=wall_s)
    summary["output"] = str(out.resolve())
    summary["replicas"] = n_replicas
    summary["rows_processed"] = sink.rows_in_run(out, run_token)  # by this run (resume: the missing)
    summary["rows_skipped"] = len(done)  # already present when this run started
    summary["rows_duplicate_dropped"] = duplicates
    if summary["rows_per_s"] is not None:
        summary["rows_per_s"] = summary["rows_processed"] / wall_s
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
