"""`kvpipe report RUN_OR_DIR`: a sweep's table (Markdown, HTML) and plots (PNG), logged to its parent run."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a sweep's report (table + plots) and log it to the sweep's MLflow parent run",
    )
    parser.add_argument("source", help="a sweep's output directory, or an MLflow parent run id")
    parser.add_argument("--tracking-uri", help="for a run id (default: $MLFLOW_TRACKING_URI, else mlflow.db)")
    parser.add_argument("--out", help="where to write (default: DIR/report, or ./report-RUNID)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.set_defaults(func=_report)


def _report(args) -> int:
    from pipeline import report, tracking

    source = Path(args.source)
    run_id = uri = None
    if source.is_dir():
        if not (source / report.MANIFEST_NAME).exists():
            print(
                f"kvpipe report: {source} is not a sweep's output directory (no _sweep.json)", file=sys.stderr
            )
            return 2
        data = report.collect_from_dir(source)
        out = Path(args.out) if args.out else source / "report"
        record = source / tracking.RECORD_NAME
        if record.exists():
            rec = tracking.RunRecord.load(record)
            run_id, uri = rec.run_id, args.tracking_uri or rec.uri
    else:
        run_id, uri = args.source, tracking.resolve_uri(args.tracking_uri)
        try:
            data = report.collect_from_mlflow(run_id, uri)
        except Exception as exc:  # noqa: BLE001
            print(f"kvpipe report: cannot read run {run_id} at {uri}: {exc}", file=sys.stderr)
            return 2
        out = Path(args.out) if args.out else Path(f"report-{run_id[:8]}")
    files = report.write_report(data, out)
    print((out / "report.md").read_text())
    print(f"kvpipe report: wrote {', '.join(str(f) for f in files)}")
    if args.no_log:
        return 0
    if not run_id:
        print(
            "kvpipe report: the sweep has no MLflow parent run yet (upload it first); not logged",
            file=sys.stderr,
        )
        return 0
    if report.log_report(files, run_id, uri, args.timeout_s):
        print(f"kvpipe report: logged to run {run_id} at {uri} under report/")
        return 0
    print(f"kvpipe report: MLflow at {uri} did not answer; the report is only on disk", file=sys.stderr)
    return 1
