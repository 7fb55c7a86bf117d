"""A fair comparison: one model, one data set, one machine; a grid of policies x budgets.

A sweep YAML is a base job spec plus `grid:`. Every point runs the base spec with only the
swept keys changed (policy and budget; optionally batch size and context length), writes its
output to its own subdirectory, and becomes a child MLflow run of the sweep's parent run.

```
out/sweep/                    the sweep (output.path of the base spec)
  _sweep.json                 the manifest: grid, points, their directories
  _tracking.json              the parent run's record
  _data/                      generated inputs, one per context length (same seed)
  full/ snapkv-r0.5/ ...      one job output per point, each with its own _tracking.json
  report/                     report.md, report.html, PNG plots
```

Tracking never sinks a sweep: the parent is opened first, each point is logged with the
job's deadline, and after the first failure the remaining points go straight to their local
records (one deadline lost, not one per point); `kvpipe tracking upload DIR` sends them later.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jobs.spec import JobSpec, SpecError, dump_spec, spec_from_dict
from pipeline import tracking

log = logging.getLogger(__name__)

GRID_KEYS = ("policies", "ratios", "tokens", "batch_sizes", "context_lengths", "policy_params")
MANIFEST_NAME = tracking.SWEEP_MANIFEST
DATA_DIR = "_data"
REPORT_DIR = "report"


@dataclass
class Grid:
    policies: list[str]
    ratios: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    context_lengths: list[int] = field(default_factory=list)
    policy_params: dict[str, dict] = field(default_factory=dict)  # per-policy params


@dataclass
class Point:
    name: str
    policy: str
    ratio: float | None
    tokens: int | None
    batch_size: int
    context_length: int | None
    spec: JobSpec

    def describe(self) -> dict:
        return {
            "name": self.name,
            "dir": self.name,
            "policy": self.policy,
            "ratio": self.ratio,
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "context_length": self.context_length,
        }


@dataclass
class Sweep:
    base: dict  # the base job spec as given (after --set), without grid
    grid: Grid
    output: Path
    points: list[Point]

    @property
    def swept(self) -> list[str]:
        keys = ["policy.name", "policy.ratio", "policy.tokens", "policy.params"]
        if self.grid.batch_sizes:
            keys.append("cluster.batch_size")
        if self.grid.context_lengths:
            keys += ["input.path", "input.generate.context_length"]
        return keys


def _list(grid: dict, key: str, kind: type, check: Callable[[object], bool], what: str) -> list:
    value = grid.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        raise SpecError(f"grid.{key}: expected a non-empty list, got {value!r}")
    for i, item in enumerate(value):
        ok_type = isinstance(item, kind) or (kind is float and isinstance(item, int))
        if isinstance(item, bool) or not ok_type or not check(item):
            raise SpecError(f"grid.{key}[{i}]: expected {what}, got {item!r}")
    if len(set(value)) != len(value):
        raise SpecError(f"grid.{key}: repeated values in {value!r}")
    return [kind(v) for v in value]


def parse_grid(raw: object) -> Grid:
    from policies import policy_names

    if not isinstance(raw, dict):
        raise SpecError(f"grid: expected a mapping of {', '.join(GRID_KEYS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise SpecError(f"grid.{unknown[0]}: unknown key; expected one of: {', '.join(GRID_KEYS)}")
    known = policy_names()
    policies = _list(raw, "policies", str, lambda p: all(x in known for x in p.split("+")), "a policy name")
    if not policies:
        raise SpecError(f"grid.policies: required; a list of policies from: {', '.join(known)}")
    grid = Grid(
        policies=policies,
        ratios=_list(raw, "ratios", float, lambda r: 0 < r <= 1, "a ratio in (0, 1]"),
        tokens=_list(raw, "tokens", int, lambda t: t >= 1, "a token count >= 1"),
        batch_sizes=_list(raw, "batch_sizes", int, lambda b: b >= 1, "a batch size >= 1"),
        context_lengths=_list(raw, "context_lengths", int, lambda c: c >= 64, "a context length >= 64"),
    )
    params = raw.get("policy_params") or {}
    if not isinstance(params, dict):
        raise SpecError(f"grid.policy_params: expected a mapping of policy -> params, got {params!r}")
    for name, value in params.items():
        if name not in policies:
            raise SpecError(f"grid.policy_params.{name}: not one of grid.policies {policies}")
        if not isinstance(value, dict):
            raise SpecError(f"grid.policy_params.{name}: expected a mapping, got {value!r}")
    grid.policy_params = dict(params)
    return grid


def _fmt(x: float) -> str:
    return f"{x:g}"


def _set(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def build_sweep(data: dict) -> Sweep:
    """A sweep from its parsed YAML (base spec + grid); every point is validated up front."""
    if not isinstance(data, dict):
        raise SpecError("the sweep must be a mapping: a job spec plus grid:")
    data = copy.deepcopy(data)
    if "grid" not in data:
        raise SpecError("grid: required; e.g. grid: {policies: [full, snapkv], ratios: [0.5, 0.25]}")
    grid = parse_grid(data.pop("grid"))
    base_spec = spec_from_dict(copy.deepcopy(data))  # the base alone must be a valid job
    output = Path(base_spec.output.path).resolve()
    compressing = [p for p in grid.policies if p != "full"]
    budgets: list[tuple[float | None, int | None]] = [(r, None) for r in grid.ratios]
    budgets += [(None, t) for t in grid.tokens]
    if compressing and not budgets:
        if base_spec.policy.ratio is None and base_spec.policy.tokens is None:
            raise SpecError(f"grid.ratios: policies {compressing} need budgets (grid.ratios or grid.tokens)")
        budgets = [(base_spec.policy.ratio, base_spec.policy.tokens)]
    if grid.context_lengths and base_spec.input.generate is None:
        raise SpecError("grid.context_lengths: needs input.generate (the data is generated per length)")
    batch_sizes = grid.batch_sizes or [base_spec.cluster.batch_size]
    lengths: list[int | None] = list(grid.context_lengths) or [None]
    has_planner = "batch_planner" in {f.name for f in dataclasses.fields(type(base_spec.cluster))}

    points: list[Point] = []
    for length in lengths:
        for batch in batch_sizes:
            for policy in grid.policies:
                for ratio, tokens in [(None, None)] if policy == "full" else budgets:
                    name = (
                        policy
                        if policy == "full"
                        else f"{policy}-" + (f"r{_fmt(ratio)}" if ratio is not None else f"t{tokens}")
                    )
                    if grid.batch_sizes:
                        name += f"-b{batch}"
                    if length is not None:
                        name += f"-c{length}"
                    d = copy.deepcopy(data)
                    params = grid.policy_params.get(policy)
                    if params is None:
                        params = (
                            (d.get("policy") or {}).get("params", {})
                            if policy == base_spec.policy.name
                            else {}
                        )
                    d["policy"] = {"name": policy, "ratio": ratio, "tokens": tokens, "params": params}
                    _set(d, "cluster.batch_size", batch)
                    if grid.batch_sizes and has_planner:
                        _set(d, "cluster.batch_planner", "fixed")  # the swept size, not a planned one
                    if length is not None:
                        gen = base_spec.input.generate
                        _set(d, "input.generate.context_length", length)
                        data_name = f"{gen.task}-{length}-n{gen.samples}-s{gen.seed}.parquet"
                        _set(d, "input.path", str(output / DATA_DIR / data_name))
                    _set(d, "output.path", str(output / name))
                    _set(d, "output.mode", "overwrite")
                    _set(d, "tracking.run_name", name)
                    try:
                        spec = spec_from_dict(d)
                    except SpecError as exc:
                        raise SpecError(f"grid point {name}: {exc}") from None
                    points.append(Point(name, policy, ratio, tokens, batch, length, spec))
    return Sweep(base=data, grid=grid, output=output, points=points)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    from jobs.spec import read_mapping

    return build_sweep(read_mapping(path, overrides, what="sweep (a job spec plus grid:)"))


# -- running ---------------------------------------------------------------------------------
@dataclass
class SweepResult:
    output: Path
    parent_run_id: str | None
    points: list[dict]  # describe() + summary + run_id + error
    report_files: list[Path]
    tracking_ok: bool


def point_record(point: Point, summary: dict, input_path: Path, out: Path, parent_run_id: str | None):
    """The child run's record: what `run_job` logs for a job, plus the sweep's own tags."""
    from pipeline.job import SPEC_NAME, SUMMARY_NAME

    spec = point.spec
    return tracking.RunRecord(
        experiment=spec.tracking.experiment,
        run_name=point.name,
        params={**tracking.flatten(spec.to_dict()), "input.resolved_path": str(input_path)},
        metrics={k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        tags={
            "kvpipe.output": str(out),
            "kvpipe.sweep.point": point.name,
            "kvpipe.sweep.output": str(out.parent),
        },
        artifacts=[str(out / SPEC_NAME), str(out / SUMMARY_NAME)],
        uri=tracking.resolve_uri(spec.tracking.uri),
        parent_run_id=parent_run_id,
    )


def _prepare_dir(sweep: Sweep) -> None:
    out = sweep.output
    mode = (sweep.base.get("output") or {}).get("mode", "overwrite")
    if out.exists() and any(out.iterdir()):
        if mode == "error":
            raise FileExistsError(f"output.path: {out} is not empty (output.mode is 'error')")
        for child in out.iterdir():  # keep generated data: same seed, same rows
            if child.name != DATA_DIR:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_sweep(
    sweep: Sweep,
    on_point_done: Callable[[Point, dict], None] | None = None,
    report: bool = True,
) -> SweepResult:
    """Run every point in order; log the parent and children; write and log the report."""
    from pipeline.job import ensure_input, run_job

    started = time.time()
    _prepare_dir(sweep)
    first = sweep.points[0].spec
    track = first.tracking.enabled
    timeout_s = first.tracking.timeout_s
    uri = tracking.resolve_uri(first.tracking.uri)
    manifest = {
        "grid": dataclasses.asdict(sweep.grid),
        "swept": sweep.swept,
        "base": sweep.base,
        "points": [p.describe() for p in sweep.points],
    }
    (sweep.output / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    (sweep.output / "_base_spec.yaml").write_text(dump_spec(first))

    base_params = {k: v for k, v in tracking.flatten(first.to_dict()).items() if k not in sweep.swept}
    base_params.pop("output.path", None)
    base_params.pop("tracking.run_name", None)
    grid_params = {f"grid.{k}": json.dumps(v) for k, v in dataclasses.asdict(sweep.grid).items() if v}
    parent = tracking.RunRecord(
        experiment=first.tracking.experiment,
        run_name=sweep.base.get("tracking", {}).get("run_name") or f"sweep {sweep.output.name}",
        params={**base_params, **grid_params, "sweep.points": str(len(sweep.points))},
        metrics={},
        tags={"kvpipe.output": str(sweep.output), "kvpipe.sweep": "parent"},
        artifacts=[str(sweep.output / MANIFEST_NAME), str(sweep.output / "_base_spec.yaml")],
        uri=uri,
    )
    parent_path = sweep.output / tracking.RECORD_NAME
    tracking_ok = track
    if track:
        # opening may meet a fresh sqlite store that migrates first: a longer, one-off deadline
        open_s = timeout_s if uri.startswith(("http://", "https://")) else max(timeout_s, 60.0)
        tracking_ok = tracking.log_run(parent, parent_path, open_s, complete=False) is not None
        if tracking_ok:
            log.info("sweep parent run %s at %s", parent.run_id, uri)
    else:
        parent.save(parent_path)

    results = []
    datasets: dict[str, dict] = {}
    for i, point in enumerate(sweep.points, 1):
        log.info("sweep point %d/%d: %s", i, len(sweep.points), point.name)
        entry = point.describe()
        spec = copy.deepcopy(point.spec)
        spec.tracking.enabled = False  # the sweep logs the point, nested under its parent
        try:
            input_path = ensure_input(spec)
            with tracking.SystemSampler() as sampler:
                job = run_job(spec)
        except Exception as exc:  # noqa: BLE001  (one failed point must not lose the others)
            log.exception("sweep point %s failed", point.name)
            entry["error"] = f"{type(exc).__name__}: {exc}"
            results.append(entry)
            continue
        summary = {**job.summary, **sampler.summary()}
        entry.update(summary=summary, run_id=None)
        record = point_record(point, summary, input_path, job.output_dir, parent.run_id)
        record.series = sampler.series
        record_path = job.output_dir / tracking.RECORD_NAME
        if track and tracking_ok and parent.run_id:
            entry["run_id"] = tracking.log_run(record, record_path, timeout_s)
            tracking_ok = entry["run_id"] is not None
            if not tracking_ok:
                log.warning("MLflow is not answering: the remaining points keep local records only")
        else:
            tracking.enrich(record)
            record.save(record_path)
        for d in record.datasets:
            datasets.setdefault(d["digest"] + d["name"], d)
        results.append(entry)
        if on_point_done is not None:
            on_point_done(point, entry)

    report_files: list[Path] = []
    if report:
        from pipeline.report import collect_from_dir, write_report

        try:
            report_files = write_report(collect_from_dir(sweep.output), sweep.output / REPORT_DIR)
            parent.artifacts.append([str(sweep.output / REPORT_DIR), REPORT_DIR])
        except Exception:  # noqa: BLE001  (the runs are done; a plotting problem must not hide them)
            log.exception("the sweep report failed")
    ok = [r for r in results if "summary" in r]
    parent.metrics.update(
        {
            "points_total": len(results),
            "points_ok": len(ok),
            "points_failed": len(results) - len(ok),
            "wall_s": time.time() - started,
        }
    )
    accs = [r["summary"]["accuracy"] for r in ok if r["summary"].get("accuracy") is not None]
    if accs:
        parent.metrics["accuracy_best"] = max(accs)
    parent.datasets = list(datasets.values())
    parent.end_ms = int(time.time() * 1000)
    parent.timestamp_ms = parent.end_ms
    if track:
        # one more try even if a point failed: the server may be back; bounded as ever
        parent_id = tracking.log_run(parent, parent_path, timeout_s)
        if parent_id is None or not tracking_ok:
            log.warning(
                "the sweep is kept locally (%s and one per point); upload it with "
                "`kvpipe tracking upload %s`",
                parent_path,
                sweep.output,
            )
            tracking_ok = False
    else:
        parent.save(parent_path)
    return SweepResult(sweep.output, parent.run_id, results, report_files, tracking_ok)
