"""`kvpipe run [SPEC.yaml] [--set key=value ...]` and its shorthand flags."""

from __future__ import annotations

import json
import logging
import sys

# shorthand flag -> spec key
SHORTHAND = {
    "model": "model",
    "input": "input.path",
    "output": "output.path",
    "policy": "policy.name",
    "ratio": "policy.ratio",
    "tokens": "policy.tokens",
    "max_new_tokens": "generation.max_new_tokens",
    "engine": "engine",
    "address": "cluster.address",
    "tracking_uri": "tracking.uri",
    "replicas": "cluster.replicas",
    "batch_size": "cluster.batch_size",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a batch job",
        description="Run a job from a YAML spec (or the embedded defaults), with overrides.",
    )
    parser.add_argument("spec", nargs="?", help="job spec YAML (default: the embedded defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key, e.g. --set policy.ratio=0.25 (repeatable)",
    )
    parser.add_argument("--model", help="model alias, directory or .gguf file")
    parser.add_argument("--input", help="input Parquet or JSONL")
    parser.add_argument("--output", help="output directory")
    parser.add_argument("--policy", help="compression policy name, e.g. streaming_llm, snapkv+kivi")
    parser.add_argument("--ratio", type=float, help="keep this fraction of each prompt's KV")
    parser.add_argument("--tokens", type=int, help="keep this many tokens per head instead of a ratio")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--engine", choices=["hf", "deepspeed"])
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db)"
    )
    parser.add_argument("--replicas", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.set_defaults(func=_run)


def overrides_from_args(args) -> list[str]:
    sets = []
    for flag, key in SHORTHAND.items():
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    return sets + list(args.overrides)


def _run(args) -> int:
    from jobs.spec import SpecError, load_spec

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(args.spec, overrides_from_args(args))
    except (SpecError, OSError) as exc:
        print(f"kvpipe run: {exc}", file=sys.stderr)
        return 2
    from pipeline.job import run_job

    result = run_job(spec)
    s = result.summary
    print(json.dumps(s, indent=2, sort_keys=True))
    print(
        f"kvpipe: {s['rows_out']}/{s['rows_in']} rows written to {result.output_dir} "
        f"({s['rows_error']} with errors); MLflow run: {result.run_id or 'not logged (see warning above)'}"
    )
    return 0 if s["rows_missing"] == 0 else 1
