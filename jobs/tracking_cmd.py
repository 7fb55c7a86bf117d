"""`kvpipe tracking upload OUTPUT_DIR`: log runs that could not reach MLflow at the time.

For a sweep's output directory, the parent run goes first and every point follows as its
child. Uploading is safe to repeat: runs already in MLflow are resumed, never duplicated.
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("tracking", help="MLflow tracking tools")
    sub = parser.add_subparsers(dest="tracking_command", required=True)
    up = sub.add_parser("upload", help="upload a job's or a sweep's saved tracking records to MLflow")
    up.add_argument("output_dir", help="the job's or sweep's output directory (holds _tracking.json)")
    up.add_argument("--tracking-uri", help="where to log (default: the URI the job used)")
    up.add_argument("--timeout-s", type=float, default=60.0, help="deadline per run")
    up.set_defaults(func=_upload)


def _upload(args) -> int:
    from pipeline.tracking import RECORD_NAME, upload_dir

    record = Path(args.output_dir) / RECORD_NAME
    if not record.exists():
        print(f"kvpipe tracking upload: {record} does not exist", file=sys.stderr)
        return 2
    results = upload_dir(Path(args.output_dir), uri=args.tracking_uri, timeout_s=args.timeout_s)
    failed = [d for d, run_id in results.items() if run_id is None]
    for directory, run_id in results.items():
        print(f"{run_id or 'NOT UPLOADED'}\t{directory}")
    if failed:
        print(
            f"kvpipe tracking upload: {len(failed)} of {len(results)} runs did not reach MLflow; "
            "their records are unchanged, run the upload again",
            file=sys.stderr,
        )
        return 1
    return 0
