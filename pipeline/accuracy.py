"""An in-process accuracy matrix: tasks x lengths x policies x ratios on one loaded model.

No Ray and no MLflow: it needs only torch, transformers, pyarrow (and gguf + accelerate for
the embedded SmolLM2), so it runs as is on a bare GPU machine. Each (task, length) data set
is generated once and every policy and ratio sees exactly those rows (a fair comparison);
the model is loaded once and the policy is swapped with :meth:`InferenceEngine.set_policy`.
The full cache runs once per data set, whatever the ratios.

A cell's ``accuracy`` is the mean score over all its rows, a row that failed counting as 0
(``errors`` says how many failed); ``kv_ratio`` is kept / full KV bytes summed over the rows
that ran (quantising policies keep every token but fewer bytes), ``kv_token_ratio`` the same
in tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FULL = "full"


@dataclass
class AccuracyConfig:
    model: str = "smollm2"
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    lengths: list[int] = field(default_factory=lambda: [1024])
    policies: list[str] = field(default_factory=lambda: [FULL, "streaming_llm"])
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])
    samples: int = 8
    seed: int = 0
    depths: list[float] | None = None
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    prompt_mode: str = "question_last"
    haystack: str = "repeat"
    chat_template: bool = True
    max_new_tokens: int | None = None  # None: each task's own default
    policy_params: dict[str, dict] = field(default_factory=dict)  # policy name -> params


def plan_cells(policies: list[str], ratios: list[float]) -> list[tuple[str, float | None]]:
    """(policy, ratio) pairs to run: the full cache once (ratio None), each other policy per ratio."""
    cells: list[tuple[str, float | None]] = []
    if FULL in policies:
        cells.append((FULL, None))
    for name in dict.fromkeys(policies):
        if name != FULL:
            cells.extend((name, float(r)) for r in ratios)
    return cells


def row_fingerprint(row: dict) -> str:
    """A short hash of what the model sees and what is scored (proves rows are shared)."""
    keys = ("id", "context", "question", "answer", "answer_prefix", "separator", "prompt_mode")
    text = json.dumps({k: row.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def engine_spec(cfg: AccuracyConfig, policy: str = FULL, ratio: float | None = None) -> dict:
    """A validated job spec dict (jobs.spec) for the in-process engine."""
    from jobs.spec import spec_from_dict

    return spec_from_dict(
        {
            "model": cfg.model,
            "dtype": cfg.dtype,
            "device": cfg.device,
            "policy": {"name": policy, "ratio": ratio, "params": cfg.policy_params.get(policy, {})},
            "generation": {"max_new_tokens": cfg.max_new_tokens or 32},
            "input": {"prompt_mode": cfg.prompt_mode, "chat_template": cfg.chat_template, "generate": None},
            "tracking": {"enabled": False},
            "cluster": {"batch_size": cfg.batch_size},
        }
    ).to_dict()


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def make_data(cfg: AccuracyConfig, tokenizer, log: Callable[[str], None]) -> dict[tuple, list[dict]]:
    """Each (task, length) data set, generated once: every policy sees these rows."""
    from pipeline.tasks import generate

    data = {}
    for task in cfg.tasks:
        for length in cfg.lengths:
            t0 = time.perf_counter()
            data[(task, length)] = generate(
                task,
                length,
                cfg.samples,
                cfg.seed,
                tokenizer,
                depths=cfg.depths,
                haystack=cfg.haystack,
                prompt_mode=cfg.prompt_mode,
                chat=cfg.chat_template,
            )
            log(f"data {task}@{length}: {cfg.samples} rows ({time.perf_counter() - t0:.1f}s)")
    return data


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(task: str, length: int, policy: str, ratio, rows: list[dict], results: list[dict]) -> dict:
    ran = [r for r in results if r.get("kv_bytes_full")]
    scores = [0.0 if r.get("error") or r.get("score") is None else float(r["score"]) for r in results]
    full_bytes = sum(r["kv_bytes_full"] for r in ran)
    full_tokens = sum(r["kv_tokens_full"] for r in ran)
    return {
        "task": task,
        "length": length,
        "policy": policy,
        "ratio": ratio,
        "samples": len(rows),
        "accuracy": _mean(scores),
        "kv_ratio": sum(r["kv_bytes_kept"] for r in ran) / full_bytes if full_bytes else None,
        "kv_token_ratio": sum(r["kv_tokens_kept"] for r in ran) / full_tokens if full_tokens else None,
        "prompt_tokens": _mean([r["prompt_tokens"] for r in ran]),
        "prefill_s": _mean([r["prefill_s"] for r in ran]),
        "errors": sum(1 for r in results if r.get("error")),
        "error_examples": sorted({r["error"] for r in results if r.get("error")})[:3],
    }


def run_accuracy(cfg: AccuracyConfig, log: Callable[[str], None] = print) -> dict:
    """Run the matrix; returns {"meta", "cells", "rows"} (rows: one record per row and cell)."""
    import torch
    import transformers

    from pipeline.engine import InferenceEngine
    from pipeline.tasks import TASKS

    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    cells = plan_cells(cfg.policies, cfg.ratios)
    for policy, ratio in cells:  # validate every cell's spec before loading anything
        engine_spec(cfg, policy, ratio)

    t0 = time.perf_counter()
    engine = InferenceEngine(engine_spec(cfg))
    log(f"model {cfg.model} on {engine.device} ({time.perf_counter() - t0:.1f}s)")
    data = make_data(cfg, engine.tokenizer, log)
    base_gen = engine.gen_config

    out_cells, out_rows = [], []
    total = len(data) * len(cells)
    done = 0
    for (task, length), rows in data.items():
        max_new = cfg.max_new_tokens or TASKS[task].max_new_tokens
        engine.gen_config = dataclasses.replace(base_gen, max_new_tokens=max_new)
        fingerprints = [row_fingerprint(r) for r in rows]
        for policy, ratio in cells:
            done += 1
            engine.set_policy(policy, ratio=ratio, params=cfg.policy_params.get(policy))
            t1 = time.perf_counter()
            results = engine.process(rows)
            cell = summarise(task, length, policy, ratio, rows, results)
            cell["wall_s"] = round(time.perf_counter() - t1, 3)
            out_cells.append(cell)
            for row, fp, res in zip(rows, fingerprints, results):
                out_rows.append(
                    {
                        "task": task,
                        "length": length,
                        "policy": policy,
                        "ratio": ratio,
                        "row_sha1": fp,
                        "depth": row.get("depth"),
                        "answer": list(row.get("answer") or []),
                        **{k: res.get(k) for k in ROW_RESULT_KEYS},
                    }
                )
            acc = "n/a" if cell["accuracy"] is None else f"{cell['accuracy']:.3f}"
            kv = "n/a" if cell["kv_ratio"] is None else f"{cell['kv_ratio']:.3f}"
            log(
                f"[{done}/{total}] {task}@{length} {policy}"
                f"{'' if ratio is None else f' r={ratio:g}'}: acc {acc}, kv {kv}, "
                f"errors {cell['errors']} ({cell['wall_s']:.1f}s)"
            )

    meta = {
        "model": cfg.model,
        "device": device_name(engine.device),
        "dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": dataclasses.asdict(cfg),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    return {"meta": meta, "cells": out_cells, "rows": out_rows}


ROW_RESULT_KEYS = (
    "id",
    "output_text",
    "score",
    "error",
    "prompt_tokens",
    "output_tokens",
    "kv_tokens_full",
    "kv_tokens_kept",
    "kv_bytes_full",
    "kv_bytes_kept",
    "prefill_s",
    "decode_s",
    "finish_reason",
)


# -- reporting --------------------------------------------------------------------------------
def _fmt_cell(cell: dict | None, full_acc: float | None) -> str:
    if cell is None:
        return ""
    if cell["accuracy"] is None or cell["errors"] == cell["samples"]:
        return "error"
    text = f"{cell['accuracy']:.3f}"
    if cell["policy"] != FULL and full_acc:
        text += f" ({100 * cell['accuracy'] / full_acc:.0f}%)"
    if cell["errors"]:
        text += f" [{cell['errors']} err]"
    return text


def to_markdown(result: dict, command: str | None = None) -> str:
    meta, cells = result["meta"], result["cells"]
    lines = [
        f"# Accuracy: {meta['model']}",
        "",
        f"- device: {meta['device']}, dtype {meta['dtype']}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    cfg = meta["config"]
    lines += [
        f"- samples {cfg['samples']} per task and length, seed {cfg['seed']}, "
        f"depths {cfg['depths'] or 'random per sample'}, prompt mode {cfg['prompt_mode']}, "
        f"haystack {cfg['haystack']}",
        "- cells: accuracy (relative to the full cache); columns: the KV budget ratio",
        "",
    ]
    ratios = sorted({c["ratio"] for c in cells if c["ratio"] is not None}, reverse=True)
    for key in dict.fromkeys((c["task"], c["length"]) for c in cells):
        group = [c for c in cells if (c["task"], c["length"]) == key]
        full = next((c for c in group if c["policy"] == FULL), None)
        full_acc = full["accuracy"] if full else None
        columns = ([None] if full else []) + ratios
        header = ["policy"] + ["full cache" if r is None else f"{r:g}" for r in columns]
        lines += [f"## {key[0]} @ {key[1]} tokens", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * len(columns)) + "|")
        for policy in dict.fromkeys(c["policy"] for c in group):
            by_ratio = {c["ratio"]: c for c in group if c["policy"] == policy}
            row = [policy] + [_fmt_cell(by_ratio.get(r), full_acc) for r in columns]
            lines.append("| " + " | ".join(row) + " |")
        kv = [c for c in group if c["kv_ratio"] is not None and c["policy"] != FULL]
        if kv:
            shown = ", ".join(f"{c['policy']}@{c['ratio']:g}={c['kv_ratio']:.3f}" for c in kv)
            lines.append("")
            lines.append(f"achieved KV ratio: {shown}")
        lines.append("")
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, result: dict, command: str | None = None) -> str:
    """Write accuracy.json, accuracy.md and rows.parquet under `out_dir`; return the Markdown."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**result["meta"], "command": command}
    (out / "accuracy.json").write_text(json.dumps({"meta": meta, "cells": result["cells"]}, indent=2) + "\n")
    markdown = to_markdown(result, command)
    (out / "accuracy.md").write_text(markdown + "\n")
    schema = pa.schema(
        [
            ("task", pa.string()),
            ("length", pa.int64()),
            ("policy", pa.string()),
            ("ratio", pa.float64()),
            ("row_sha1", pa.string()),
            ("depth", pa.float64()),
            ("answer", pa.list_(pa.string())),
            ("id", pa.string()),
            ("output_text", pa.string()),
            ("score", pa.float64()),
            ("error", pa.string()),
            ("prompt_tokens", pa.int64()),
            ("output_tokens", pa.int64()),
            ("kv_tokens_full", pa.int64()),
            ("kv_tokens_kept", pa.int64()),
            ("kv_bytes_full", pa.int64()),
            ("kv_bytes_kept", pa.int64()),
            ("prefill_s", pa.float64()),
            ("decode_s", pa.float64()),
            ("finish_reason", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(result["rows"], schema=schema), out / "rows.parquet")
    return markdown
