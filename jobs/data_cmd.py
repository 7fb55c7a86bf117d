"""`kvpipe data`: make synthetic long-context evaluation sets and list the tasks.

kvpipe data make TASK --context-length N --samples K --seed S --model M --out PATH
                 [--depths 0.1,0.5,0.9] [--haystack repeat|essays] [task options]
kvpipe data tasks
"""

from __future__ import annotations

import argparse
import sys


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# Task options on the command line: flag -> (option name, type, help).
TASK_OPTIONS = {
    "--digits": ("digits", int, "passkey: digits of the pass key (5)"),
    "--num-keys": ("num_keys", int, "niah_multikey: keys in the haystack, one queried (4)"),
    "--num-values": ("num_values", int, "niah_multivalue: values of the queried key (4)"),
    "--num-queries": ("num_queries", int, "niah_multiquery: keys queried at once (4)"),
    "--key-type": ("key_type", str, "niah: words | numbers | uuids (words)"),
    "--value-type": ("value_type", str, "niah: numbers | words | uuids (numbers)"),
    "--num-chains": ("num_chains", int, "variable_tracking: chains, one queried (1)"),
    "--num-hops": ("num_hops", int, "variable_tracking: assignments after the first (4)"),
    "--num-cw": ("num_cw", int, "common_words: common words to find (10)"),
    "--freq-cw": ("freq_cw", int, "common_words: repeats of each common word (30; scaled down below 4K)"),
    "--freq-ucw": ("freq_ucw", int, "common_words: repeats of each uncommon word (3)"),
}


def register(subparsers) -> None:
    from pipeline.tasks.haystacks import HAYSTACKS
    from pipeline.tasks.prompts import PROMPT_MODES

    parser = subparsers.add_parser("data", help="make evaluation data sets and list tasks")
    sub = parser.add_subparsers(dest="data_command", required=True)

    make = sub.add_parser("make", help="generate a synthetic long-context task as Parquet or JSONL")
    make.add_argument("task", help="a task name (see `kvpipe data tasks`)")
    make.add_argument(
        "--context-length",
        type=_ints,
        required=True,
        help="prompt length(s) in the model's tokens, e.g. 4096 or 1024,2048",
    )
    make.add_argument("--samples", type=int, default=10, help="rows per context length (10)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--model", default="smollm2", help="whose tokenizer counts the length (smollm2)")
    make.add_argument("--out", required=True, help="output path; .jsonl writes JSONL, else Parquet")
    make.add_argument(
        "--depths",
        type=_floats,
        default=None,
        help="needle depths in [0,1], cycled over samples (default: random per sample)",
    )
    make.add_argument("--haystack", choices=HAYSTACKS, default="repeat")
    make.add_argument("--prompt-mode", choices=PROMPT_MODES, default="question_last")
    make.add_argument("--no-chat", action="store_true", help="count lengths without the chat template")
    for flag, (dest, typ, text) in TASK_OPTIONS.items():
        make.add_argument(flag, dest=dest, type=typ, default=None, help=text)
    make.set_defaults(func=_make)

    tasks = sub.add_parser("tasks", help="list the synthetic tasks and their scorers")
    tasks.set_defaults(func=_tasks)


def _make(args) -> int:
    from pipeline.models import load_tokenizer
    from pipeline.tasks import TASKS, generate, write_rows

    if args.task not in TASKS:
        print(f"kvpipe data make: unknown task {args.task!r}; choose one of {sorted(TASKS)}", file=sys.stderr)
        return 2
    options = {
        dest: getattr(args, dest) for dest, _, _ in TASK_OPTIONS.values() if getattr(args, dest) is not None
    }
    unknown = set(options) - set(TASKS[args.task].options)
    if unknown:
        flags = [f for f, (d, _, _) in TASK_OPTIONS.items() if d in unknown]
        print(f"kvpipe data make: {args.task} does not take {', '.join(sorted(flags))}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.model)
    rows = []
    for length in args.context_length:
        rows += generate(
            args.task,
            length,
            args.samples,
            args.seed,
            tokenizer,
            depths=args.depths,
            haystack=args.haystack,
            prompt_mode=args.prompt_mode,
            chat=not args.no_chat,
            **options,
        )
    params = {
        "task": args.task,
        "context_length": args.context_length,
        "samples": args.samples,
        "seed": args.seed,
        "model": args.model,
        "depths": args.depths,
        "haystack": args.haystack,
        "prompt_mode": args.prompt_mode,
        "chat": not args.no_chat,
        "options": options,
    }
    path = write_rows(rows, args.out, metadata={"data_params": params})
    worst = (
        max(abs(r["prompt_tokens"] - r["context_length"]) / r["context_length"] for r in rows) if rows else 0
    )
    print(f"wrote {len(rows)} rows of {args.task} to {path} (largest length deviation {worst:.2%})")
    return 0


def _tasks(args) -> int:
    from pipeline.tasks import TASKS

    width = max(len(name) for name in TASKS)
    for name, spec in TASKS.items():
        opts = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        print(f"{name:<{width}}  scorer={spec.scorer:<16} max_new_tokens={spec.max_new_tokens:<4}", end=" ")
        print(spec.description)
        if opts:
            print(f"{'':<{width}}  options: {opts}")
    return 0
