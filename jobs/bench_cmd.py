"""`kvpipe bench`: prefill, compression overhead, decode speed, memory and the largest batch on one GPU.

A benchmark tool, not a test: it prints a side-by-side table and PASS/FAIL lines against the
performance targets, and writes JSON + Markdown (device, library versions, the exact
command) under benchmarks/results/ (or --out). `--report A.json B.json` merges runs (e.g. one
per context) into one report without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="GPU benchmark: prefill, compression overhead, decode, memory, largest batch, vs baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", help="llama8b (default: Llama-3.1-8B shapes), smollm2, tiny, or a dir with config.json"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="contexts 32768,8192; full,streaming_llm,snapkv,kivi; "
        "ratio 0.25; 16 decode steps; 1 prefill rep; --max-minutes 7.5 (about 8 minutes on an H100)",
    )
    p.add_argument(
        "--tiny", action="store_true", help="a tiny random Llama, contexts 128,256 (CPU smoke runs)"
    )
    p.add_argument("--contexts", type=_ints, help="prompt lengths in tokens (default 8192,32768,65536)")
    p.add_argument(
        "--policies", type=_names, help="default full,streaming_llm,snapkv,pyramidkv,adakv,kivi,spindlekv"
    )
    p.add_argument(
        "--ratios", type=_floats, help="budgets as fractions of the prompt (default 0.5,0.25,0.125)"
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="POLICY.KEY=VALUE",
        help="a policy parameter, e.g. kivi.bits=4 (value parsed as JSON when it can be)",
    )
    p.add_argument("--prefill-modes", type=_names, help="oneshot,chunked (default both)")
    p.add_argument("--prefill-chunk", type=int, help="chunked prefill tokens (default 4096)")
    p.add_argument("--prefill-batch", type=int, help="rows prefilled together (default 1)")
    p.add_argument("--prefill-reps", type=int, help="timed prefills per mode, median (default 2)")
    p.add_argument("--decode-batch", type=int, help="the given batch of the step-time comparison (default 4)")
    p.add_argument("--decode-steps", type=int, help="timed decode steps N (default 64)")
    p.add_argument("--decode-warmup", type=int, help="decode steps before timing (default 3)")
    p.add_argument("--max-batch", type=int, help="cap of the largest-batch search (default 4096)")
    p.add_argument("--search-steps", type=int, help="decode steps per largest-batch probe (default 2)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers generate baseline")
    p.add_argument(
        "--hf-at-max-batch",
        action="store_true",
        help="also run HF generate at full's largest batch (two prefills of that batch: slow)",
    )
    p.add_argument("--no-micro", action="store_true", help="skip the attention micro-benchmarks")
    p.add_argument(
        "--max-minutes", type=float, help="stop cleanly after this long, keeping what was measured"
    )
    p.add_argument("--device", help="auto (default), cuda, cuda:1, cpu")
    p.add_argument("--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="directory for the JSON and Markdown results (default benchmarks/results)")
    p.add_argument("--tag", help="a word added to the result file names")
    p.add_argument("--json", action="store_true", help="print the result JSON instead of the table")
    p.add_argument(
        "--report",
        nargs="+",
        metavar="RESULT.json",
        help="measure nothing: merge these result files and print/write one report",
    )
    p.set_defaults(func=_run)


FLAG_TO_FIELD = {
    "model": "model",
    "contexts": "contexts",
    "policies": "policies",
    "ratios": "ratios",
    "prefill_modes": "prefill_modes",
    "prefill_chunk": "prefill_chunk",
    "prefill_batch": "prefill_batch",
    "prefill_reps": "prefill_reps",
    "decode_batch": "decode_batch",
    "decode_steps": "decode_steps",
    "decode_warmup": "decode_warmup",
    "max_batch": "max_batch",
    "search_steps": "search_steps",
    "max_minutes": "max_minutes",
    "device": "device",
    "dtype": "dtype",
    "seed": "seed",
    "out": "out_dir",
    "tag": "tag",
}


def _param_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def settings_from_args(args):
    """Defaults < presets (--tiny, --quick) < explicit flags."""
    from pipeline.bench.settings import QUICK, TINY_PRESET, BenchSettings

    values: dict = {}
    if args.tiny:
        values.update(TINY_PRESET, model="tiny", tiny=True, prefill_reps=1)
    if args.quick:
        quick = dict(QUICK)
        if args.tiny:  # keep the tiny contexts
            quick.pop("contexts")
            quick.pop("max_minutes")
        values.update(quick, quick=True)
    for flag, name in FLAG_TO_FIELD.items():
        v = getattr(args, flag)
        if v is not None:
            values[name] = v
    if args.no_hf:
        values["hf_baseline"] = False
    if args.hf_at_max_batch:
        values["hf_at_max_batch"] = True
    if args.no_micro:
        values["micro"] = False
    params: dict = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        policy, dot, pname = key.partition(".")
        if not sep or not dot or not policy or not pname:
            raise ValueError(f"--param {item!r}: expected POLICY.KEY=VALUE, e.g. kivi.bits=4")
        params.setdefault(policy, {})[pname] = _param_value(value)
    values["policy_params"] = params
    return BenchSettings(**values)


def command_line() -> str:
    argv = list(sys.argv)
    head = argv[0] if argv else "kvpipe"
    if head.endswith(("jobs/__main__.py", "jobs")):
        prog = ["python", "-m", "jobs"]
    elif head.endswith("bench/__main__.py"):
        prog = ["python", "-m", "pipeline.bench"]
    else:
        prog = [Path(head).name]
    return shlex.join(prog + argv[1:])


def resolved_command(settings) -> str:
    s = settings
    parts = [
        "kvpipe",
        "bench",
        "--model",
        s.model,
        "--contexts",
        ",".join(map(str, s.contexts)),
        "--policies",
        ",".join(s.policies),
        "--ratios",
        ",".join(map(str, s.ratios)),
        "--prefill-modes",
        ",".join(s.prefill_modes),
        "--prefill-chunk",
        str(s.prefill_chunk),
        "--prefill-batch",
        str(s.prefill_batch),
        "--prefill-reps",
        str(s.prefill_reps),
        "--decode-batch",
        str(s.decode_batch),
        "--decode-steps",
        str(s.decode_steps),
        "--decode-warmup",
        str(s.decode_warmup),
        "--max-batch",
        str(s.max_batch),
        "--search-steps",
        str(s.search_steps),
        "--device",
        s.device,
        "--dtype",
        s.dtype,
        "--seed",
        str(s.seed),
    ]
    for policy, kv in s.policy_params.items():
        for k, v in kv.items():
            parts += ["--param", f"{policy}.{k}={json.dumps(v)}"]
    if s.max_minutes is not None:
        parts += ["--max-minutes", str(s.max_minutes)]
    parts += [] if s.hf_baseline else ["--no-hf"]
    parts += ["--hf-at-max-batch"] if s.hf_at_max_batch else []
    parts += [] if s.micro else ["--no-micro"]
    return shlex.join(parts)


def _run(args) -> int:
    from pipeline.bench import report

    if args.report:
        results = [json.loads(Path(p).read_text()) for p in args.report]
        merged = report.merge(results)
        out = Path(args.out or Path(args.report[0]).parent)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"bench-merged-{Path(args.report[0]).stem.removeprefix('bench-')}"
        report.save(merged, out / f"{stem}.json", out / f"{stem}.md")
        print(json.dumps(merged, indent=1, default=str) if args.json else report.console(merged))
        print(f"\nwrote {out / stem}.json and .md", file=sys.stderr)
        return 0

    from pipeline.bench.gpu import prefer_expandable_segments

    prefer_expandable_segments()  # before anything initialises CUDA
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"kvpipe bench: {exc}", file=sys.stderr)
        return 2
    from pipeline.bench.runner import run_bench

    command = command_line()
    result, json_path, md_path = run_bench(settings, command, resolved_command(settings))
    print(json.dumps(result, indent=1, default=str) if args.json else report.console(result))
    print(f"\nwrote {json_path} and {md_path}", file=sys.stderr)
    return 0 if result["status"] in ("complete", "budget_exhausted") else 1
