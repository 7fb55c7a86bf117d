"""`kvpipe sweep SWEEP.yaml [--set key=value ...]`: policies x budgets on one model, data set, machine."""

from __future__ import annotations

import logging
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of policies x budgets (one MLflow parent run, a child per point) and report",
        description=(
            "Run a sweep: a base job spec plus grid: {policies, ratios, tokens, batch_sizes, "
            "context_lengths, policy_params}. Every point differs from the base only in the swept keys."
        ),
    )
    parser.add_argument("sweep", help="sweep YAML (see jobs/examples/sweep.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the base spec or the grid, e.g. --set grid.ratios=[0.5] (repeatable)",
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db)"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and list the points, run nothing")
    parser.add_argument("--no-report", action="store_true", help="skip the report")
    parser.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from jobs.spec import SpecError
    from pipeline.sweep import load_sweep

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    try:
        sweep = load_sweep(args.sweep, overrides)
    except (SpecError, OSError) as exc:
        print(f"kvpipe sweep: {exc}", file=sys.stderr)
        return 2
    print(f"kvpipe sweep: {len(sweep.points)} points into {sweep.output}")
    for p in sweep.points:
        print(f"  {p.name}")
    if args.dry_run:
        return 0
    from pipeline.sweep import run_sweep

    result = run_sweep(sweep, report=not args.no_report)
    failed = [p["name"] for p in result.points if "error" in p]
    md = result.output / "report" / "report.md"
    if md.exists():
        print(md.read_text())
    print(
        f"kvpipe sweep: {len(result.points) - len(failed)}/{len(result.points)} points done "
        f"in {result.output}; "
        f"MLflow parent run: {result.parent_run_id or 'none'}"
        + ("" if result.tracking_ok else f" (not all logged: `kvpipe tracking upload {result.output}`)")
    )
    if failed:
        print(f"kvpipe sweep: failed points: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
