"""Job-level metrics, computed from the output rows as written (what the user gets is what we count)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq


def read_output(out_dir: Path):
    return pq.ParquetDataset(str(out_dir)).read()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(out_dir: Path, rows_in: int, wall_s: float) -> dict:
    table = read_output(out_dir)
    ok = table.filter(pc.is_null(table["error"]))
    total = lambda name: int(pc.sum(ok[name]).as_py() or 0)  # noqa: E731
    rows_out = table.num_rows
    summary: dict = {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_ok": ok.num_rows,
        "rows_error": rows_out - ok.num_rows,
        "rows_missing": rows_in - rows_out,
        "wall_s": wall_s,
        "rows_per_s": rows_out / wall_s if wall_s > 0 else None,
        "prompt_tokens": total("prompt_tokens"),
        "output_tokens": total("output_tokens"),
        "prompt_tokens_per_s": total("prompt_tokens") / wall_s if wall_s > 0 else None,
        "output_tokens_per_s": total("output_tokens") / wall_s if wall_s > 0 else None,
        "kv_bytes_full": total("kv_bytes_full"),
        "kv_bytes_kept": total("kv_bytes_kept"),
    }
    if summary["kv_bytes_full"]:
        summary["compression_ratio"] = summary["kv_bytes_kept"] / summary["kv_bytes_full"]
    ttft = [v for v in ok["ttft_s"].to_pylist() if v is not None]
    summary["ttft_p50_s"] = _percentile(ttft, 0.5)
    summary["ttft_p95_s"] = _percentile(ttft, 0.95)
    summary.update(phase_rates(ok))
    peaks = [v for v in ok["batch_peak_device_bytes"].to_pylist() if v]
    summary["peak_device_bytes"] = max(peaks) if peaks else 0
    scored = ok.filter(pc.is_valid(ok["score"]))
    if scored.num_rows:
        summary["accuracy"] = pc.mean(scored["score"]).as_py()
        if "task" in scored.column_names:
            for task, score in _mean_by(scored, "task", "score").items():
                summary[f"accuracy.{task}"] = score
    return summary


def _mean_by(table, key: str, value: str) -> dict:
    grouped = table.group_by(key).aggregate([(value, "mean")])
    return dict(zip(grouped[key].to_pylist(), grouped[f"{value}_mean"].to_pylist()))


def phase_rates(ok) -> dict:
    """Prefill and decode tokens/s over the batches' own phase times (per replica-second).

    Rows of one generate() call share its `prefill_s` (and replica): that identifies the batch.
    Prefill time is the batch's `prefill_s`; decode time its longest row's `decode_s`, in which
    each row made `output_tokens - 1` tokens (the first comes from the prefill's logits).
    """
    needed = ("replica", "prefill_s", "decode_s", "prompt_tokens", "output_tokens")
    if not ok.num_rows or any(c not in ok.column_names for c in needed):
        return {}
    batches: dict = {}
    for r in ok.select(list(needed)).to_pylist():
        if r["prefill_s"] is None:
            continue
        b = batches.setdefault((r["replica"], r["prefill_s"]), [r["prefill_s"], 0.0, 0, 0])
        b[1] = max(b[1], r["decode_s"] or 0.0)
        b[2] += r["prompt_tokens"] or 0
        b[3] += max((r["output_tokens"] or 0) - 1, 0)
    prefill_s = sum(b[0] for b in batches.values())
    decode_s = sum(b[1] for b in batches.values())
    return {
        "batches": len(batches),
        "prefill_time_s": prefill_s,
        "decode_time_s": decode_s,
        "prefill_tokens_per_s": sum(b[2] for b in batches.values()) / prefill_s if prefill_s > 0 else None,
        "decode_tokens_per_s": sum(b[3] for b in batches.values()) / decode_s if decode_s > 0 else None,
    }
