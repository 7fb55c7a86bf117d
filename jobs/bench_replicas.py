"""Rows/s against the number of model replicas, same data, side by side, in one Ray session.

    python -m jobs.bench_replicas [--model smollm2] [--rows 24] [--context-length 256]
        [--max-new-tokens 8] [--replicas 1,2] [--out benchmarks/results/replicas]

Each configuration is a whole job (`pipeline.job.run_job`): replicas start (model loaded)
before rows flow, so the wall time includes that fixed cost. The same job over one row is
timed first; "steady rows/s" = (rows - 1) / (wall - one-row job) is the rate once the
replicas are up. Prints a table and writes it as JSON (and a PNG when matplotlib is
installed) under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.bench_replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    p.add_argument("--cpus-per-replica", type=float, default=0.5)
    p.add_argument("--address", default=None, help="Ray address (default: an embedded local Ray)")
    p.add_argument("--out", default="benchmarks/results/replicas")
    return p.parse_args(argv)


def run(args) -> list[dict]:
    from jobs.spec import load_spec
    from pipeline.job import run_job, start_ray

    start_ray(args.address)
    work = Path(tempfile.mkdtemp(prefix="kvpipe-bench-"))
    base = [
        f"model={args.model}",
        "dtype=float32",
        f"input.path={work / 'input.parquet'}",
        f"input.generate.context_length={args.context_length}",
        f"input.generate.samples={args.rows}",
        f"generation.max_new_tokens={args.max_new_tokens}",
        "tracking.enabled=false",
        f"cluster.batch_size={args.batch_size}",
        f"cluster.rows_per_task={args.batch_size}",
        f"cluster.cpus_per_replica={args.cpus_per_replica}",
    ]
    results = []
    for n in [int(x) for x in args.replicas.split(",")]:
        spec = load_spec(None, [*base, f"cluster.replicas={n}", f"output.path={work / f'out-{n}'}"])
        # the replicas' start alone: the same job over zero rows
        t0 = time.perf_counter()
        run_job(
            load_spec(None, [*base, f"cluster.replicas={n}", "input.limit=1", f"output.path={work / 'w'}"])
        )
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = run_job(spec).summary
        wall = time.perf_counter() - t0
        results.append(
            {
                "replicas": n,
                "rows": s["rows_out"],
                "errors": s["rows_error"],
                "wall_s": wall,
                "rows_per_s": s["rows_out"] / wall,
                "one_row_job_s": warm_s,
                "steady_rows_per_s": (s["rows_out"] - 1) / max(1e-9, wall - warm_s),
                "output_tokens_per_s": s["output_tokens"] / wall,
            }
        )
    for key in ("rows_per_s", "steady_rows_per_s"):
        for r in results:
            r[key.replace("rows_per_s", "speedup")] = r[key] / results[0][key]
    return results


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    results = run(args)
    print(
        f"\nmodel {args.model}, {args.rows} rows of {args.context_length} tokens, "
        f"{args.max_new_tokens} new tokens, batch {args.batch_size}, {os.cpu_count()} CPU cores"
    )
    print(
        f"{'replicas':>8} {'rows':>5} {'wall s':>8} {'rows/s':>8} {'speedup':>8} "
        f"{'1-row job s':>12} {'steady rows/s':>14} {'speedup':>8}"
    )
    for r in results:
        print(
            f"{r['replicas']:>8} {r['rows']:>5} {r['wall_s']:>8.1f} {r['rows_per_s']:>8.3f} "
            f"{r['speedup']:>7.2f}x {r['one_row_job_s']:>12.1f} {r['steady_rows_per_s']:>14.3f} "
            f"{r['steady_speedup']:>7.2f}x"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar([str(r["replicas"]) for r in results], [r["rows_per_s"] for r in results])
        ax.set_xlabel("replicas")
        ax.set_ylabel("rows/s")
        ax.set_title(f"{args.model}: rows/s by replicas")
        fig.tight_layout()
        fig.savefig(out / "replicas.png")
    except ImportError:
        pass
    print(f"written to {out}/replicas.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
