"""The `kvpipe` command line: each subcommand lives in its own `jobs/*_cmd.py` module.

A command module exposes `register(subparsers)`, which adds its parser and sets
`func=<callable(args) -> int>` as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "run_cmd", "sweep_cmd", "report_cmd", "data_cmd", "accuracy_cmd", "bench_cmd",
    "policies_cmd", "models_cmd", "tracking_cmd",
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpipe",
        description="Long-context batch inference with pluggable KV-cache compression.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"jobs.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
