"""`kvpipe accuracy`: an in-process accuracy matrix of policies x ratios on generated tasks.

kvpipe accuracy --model smollm2 --tasks passkey,niah_single --lengths 1024,2048
                --policies full,streaming_llm,snapkv --ratios 0.5,0.25,0.125 --samples 8
                --seed 0 --depths 0.1,0.5,0.9 --batch-size 4 --device auto
                --prompt-mode question_last --out DIR

No Ray, no MLflow (it runs on a bare GPU machine). Writes DIR/accuracy.json,
DIR/accuracy.md and DIR/rows.parquet, prints the Markdown; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import yaml


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "accuracy",
        help="accuracy matrix of policies x ratios on generated tasks (in-process, no Ray/MLflow)",
        description=__doc__.split("\n\n", 1)[0],
    )
    parser.add_argument("--model", default="smollm2", help="model alias, directory or .gguf (smollm2)")
    parser.add_argument("--tasks", type=_list, default=["passkey"], help="comma-separated tasks (passkey)")
    parser.add_argument("--lengths", type=_ints, default=[1024], help="prompt lengths in tokens (1024)")
    parser.add_argument(
        "--policies",
        type=_list,
        default=["full", "streaming_llm"],
        help="comma-separated policies, or 'all' (full,streaming_llm); full runs once",
    )
    parser.add_argument("--ratios", type=_floats, default=[0.5, 0.25, 0.125], help="KV budget ratios")
    parser.add_argument("--samples", type=int, default=8, help="rows per task and length (8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depths", type=_floats, default=None, help="needle depths, cycled over samples")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per generate() call (4)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--prompt-mode", choices=["question_last", "context_only"], default="question_last")
    parser.add_argument("--haystack", choices=["repeat", "essays"], default="repeat")
    parser.add_argument("--no-chat", action="store_true", help="plain prompts, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's own")
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="POLICY.KEY=VALUE",
        help="a policy parameter, e.g. --param snapkv.window=32 (repeatable)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.set_defaults(func=_accuracy)


def _policy_params(items: list[str]) -> dict[str, dict]:
    params: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        policy, dot, name = key.strip().partition(".")
        if not sep or not dot or not policy or not name:
            raise ValueError(f"--param expects POLICY.KEY=VALUE, got {item!r}")
        params.setdefault(policy, {})[name] = yaml.safe_load(raw)
    return params


def _command(args) -> str:
    """The command line equivalent to `args` (when not called from a shell)."""
    words = ["kvpipe", "accuracy"]
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "params":
            words += [w for v in value for w in ("--param", v)]
        elif value is True:
            words.append(flag)
        else:
            words += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(words)


def _accuracy(args) -> int:
    from pipeline.accuracy import AccuracyConfig, run_accuracy, write_outputs
    from policies import policy_names

    policies = policy_names() if args.policies == ["all"] else args.policies
    try:
        cfg = AccuracyConfig(
            model=args.model,
            tasks=args.tasks,
            lengths=args.lengths,
            policies=policies,
            ratios=args.ratios,
            samples=args.samples,
            seed=args.seed,
            depths=args.depths,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            prompt_mode=args.prompt_mode,
            haystack=args.haystack,
            chat_template=not args.no_chat,
            max_new_tokens=args.max_new_tokens,
            policy_params=_policy_params(args.params),
        )
        result = run_accuracy(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as exc:
        print(f"kvpipe accuracy: {exc}", file=sys.stderr)
        return 2
    argv = sys.argv[1:]
    command = "kvpipe " + shlex.join(argv[argv.index("accuracy") :]) if "accuracy" in argv else _command(args)
    markdown = write_outputs(args.out, result, command)
    print(markdown)
    print(f"wrote {args.out}/accuracy.json, accuracy.md, rows.parquet", file=sys.stderr)
    return 0
