"""`kvpipe tracking upload OUTPUT_DIR`: log a run that could not reach MLflow at the time."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("tracking", help="MLflow tracking tools")
    sub = parser.add_subparsers(dest="tracking_command", required=True)
    up = sub.add_parser("upload", help="upload a job's saved tracking record to MLflow")
    up.add_argument("output_dir", help="the job's output directory (holds _tracking.json)")
    up.add_argument("--tracking-uri", help="where to log (default: the URI the job used)")
    up.add_argument("--timeout-s", type=float, default=60.0)
    up.set_defaults(func=_upload)


def _upload(args) -> int:
    from pipeline.tracking import RECORD_NAME, upload

    record = Path(args.output_dir) / RECORD_NAME
    if not record.exists():
        print(f"kvpipe tracking upload: {record} does not exist", file=sys.stderr)
        return 2
    run_id = upload(record, uri=args.tracking_uri, timeout_s=args.timeout_s)
    if run_id is None:
        print("kvpipe tracking upload: MLflow did not answer; the record is unchanged", file=sys.stderr)
        return 1
    print(run_id)
    return 0
