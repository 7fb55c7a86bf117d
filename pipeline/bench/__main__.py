"""`python -m pipeline.bench ...`: the same as `kvpipe bench ...`, without the other commands."""

import argparse
import sys

from jobs import bench_cmd

parser = argparse.ArgumentParser(prog="python -m pipeline.bench")
sub = parser.add_subparsers(dest="command", required=True)
bench_cmd.register(sub)
args = parser.parse_args(["bench", *sys.argv[1:]])
sys.exit(int(args.func(args) or 0))
