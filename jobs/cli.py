"""The `kvpipe` command line: each subcommand lives in its own `jobs/*_cmd.py` module.

A command module exposes `register(subparsers)`, which adds its parser and sets
`func=<callable(args) -> int>` as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ["run_cmd", "data_cmd", "models_cmd", "policies_cmd", "accuracy_cmd", "tracking_cmd"]
COMMAND_MODULES += ["sweep_cmd", "report_cmd"]
COMMAND_MODULES += ["bench_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpipe",
        description="Long-context batch inference with pluggable KV-cache compression.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"jobs.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"jobs.{name}":
                continue  # a command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
