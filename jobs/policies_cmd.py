"""`kvpipe policies`: the compression policies, their parameters, defaults and papers."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("policies", help="list compression policies")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_list)


def _list(args) -> int:
    from policies import describe

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        params = ", ".join(f"{k}={v!r}" for k, v in row["params"].items()) or "-"
        print(f"{row['name']:<22} {params}\n{'':<22} {row['paper']}")
    return 0
