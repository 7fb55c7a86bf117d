"""Ratios, targets and tables from a benchmark result (a plain dict, as saved in the JSON).

Everything here is pure: it reads the measured cells and derives the side-by-side ratios,
the PASS/FAIL lines against the issue's targets and the Markdown / console tables. It also
merges several result files (e.g. one run per context) into one report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MIB = 1024**2
GIB = 1024**3
TARGET_CONTEXT = 32768
TARGET_RATIO = 0.25

TARGET_TEXT = {
    "overhead": "compression overhead at prefill <= 5% of full-cache prefill at 32K",
    "throughput": (
        "decode tok/s at the largest batch >= 3x full's at its largest batch (ratio 0.25, 32K, 8B shapes)"
    ),
    "roofline": "decode step at the largest batch >= 60% of the measured bandwidth roofline",
    "memory": "peak memory, chunked prefill <= weights + compressed KV + one chunk's activations + 10%",
    "hf": "full is at least as fast as transformers generate at equal batch (decode step)",
}


def covers(cell: dict, ratio: float | None) -> bool:
    if ratio is None:
        return cell.get("ratio") is None and cell["policy"] == "full"
    return cell.get("ratio") == ratio or ratio in (cell.get("ratios_covered") or [])


def full_cell(result: dict, context: int) -> dict | None:
    for cell in result.get("cells", []):
        if cell["context"] == context and cell["policy"] == "full" and cell.get("prefill"):
            return cell
    return None


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def derive(result: dict) -> None:
    """Per cell: overhead vs full (same mode), throughput ratio vs full, step vs HF generate.

    A merged report keeps what each cell's own run derived (`merge`): prefill times move a few
    percent between runs, so a ratio is only taken between cells measured in the same run."""
    if result.get("status") == "merged":
        return
    hf: dict = {}  # (context, batch) -> the faster HF variant (default or no-cuDNN backends)
    for h in result.get("baselines", {}).get("hf_generate", []):
        key = (h.get("context"), h.get("batch"))
        if (h.get("step_ms") or 0) > 0 and (key not in hf or h["step_ms"] < hf[key]["step_ms"]):
            hf[key] = h
    for cell in result.get("cells", []):
        full = full_cell(result, cell["context"])
        d: dict = {}
        for mode in ("oneshot", "chunked"):
            mine = _get(cell, "prefill", mode, "seconds")
            base = _get(full, "prefill", mode, "seconds")
            if mine is not None and base:
                d[f"overhead_pct_{mode}_vs_full_cell"] = 100.0 * (mine - base) / base
            # the full cache timed beside this cell's runs (`Bench._prefill`), else the full cell
            paired = _get(cell, "prefill", mode, "paired_overhead_pct")
            if paired is not None:
                d[f"overhead_pct_{mode}"] = paired
            elif f"overhead_pct_{mode}_vs_full_cell" in d:
                d[f"overhead_pct_{mode}"] = d[f"overhead_pct_{mode}_vs_full_cell"]
        mine = _get(cell, "decode", "max", "tokens_per_s")
        base = _get(full, "decode", "max", "tokens_per_s")
        if mine is not None and base:
            d["throughput_x_full"] = mine / base
        kv, kv_full = _get(cell, "kv", "stored_bytes_per_row"), _get(full, "kv", "stored_bytes_per_row")
        if kv and kv_full:
            d["kv_stored_x_full"] = kv / kv_full
        b_mine, b_full = _get(cell, "max_batch", "batch"), _get(full, "max_batch", "batch")
        if b_mine and b_full:
            d["max_batch_x_full"] = b_mine / b_full
        if cell["policy"] == "full":
            given = _get(cell, "decode", "given")
            h = hf.get((cell["context"], _get(given, "batch")))
            if given and h and h.get("step_ms"):
                d["step_vs_hf"] = given["wall_step_ms"] / h["step_ms"]
                d["hf_batch"] = h["batch"]
                d["hf_sdpa"] = h.get("sdpa", "default")
        cell["derived"] = d


def held_before(prefill: dict, weights: int | None) -> int:
    """Bytes the process held before a prefill beyond the weights (earlier cells' leftovers: they
    belong to them, not to this prefill, whose own peak is its peak minus these)."""
    base = prefill.get("base_bytes")
    return 0 if base is None or weights is None else max(0, base - weights)


def targets(result: dict) -> list[dict]:
    """PASS/FAIL lines (pass None: could not be judged, with why)."""
    out: list[dict] = []
    model = _get(result, "model", "name")
    weights = _get(result, "model", "weight_bytes")
    act = _get(result, "chunk_activation", "bytes")
    cells = result.get("cells", [])
    ctx_cells = [c for c in cells if c["context"] == TARGET_CONTEXT]

    def line(kind, subject, value, threshold, ok, note=""):
        out.append(
            {
                "target": kind,
                "text": TARGET_TEXT[kind],
                "subject": subject,
                "value": value,
                "threshold": threshold,
                "pass": ok,
                "note": note,
            }
        )

    for c in ctx_cells:
        if c["policy"] == "full":
            continue
        for mode in ("oneshot", "chunked"):
            v = _get(c, "derived", f"overhead_pct_{mode}")
            if v is not None:
                line("overhead", f"{label(c)} {mode}", v, 5.0, v <= 5.0)
    if not any(t["target"] == "overhead" for t in out):
        line(
            "overhead",
            f"context {TARGET_CONTEXT}",
            None,
            5.0,
            None,
            "no 32K cell with both prefills measured",
        )

    for c in ctx_cells:
        if c["policy"] == "full" or not covers(c, TARGET_RATIO):
            continue
        v = _get(c, "derived", "throughput_x_full")
        note = "" if model == "llama8b" else f"model {model!r} is not 8B-shaped: indicative only"
        ok = None if v is None or model != "llama8b" else v >= 3.0
        line("throughput", label(c), v, 3.0, ok, note or ("" if v is not None else "not measured"))
    if not any(t["target"] == "throughput" for t in out):
        line(
            "throughput",
            f"ratio {TARGET_RATIO} at {TARGET_CONTEXT}",
            None,
            3.0,
            None,
            "no such cell measured",
        )

    for c in cells:
        v = _get(c, "decode", "max", "roofline_pct")
        if v is not None:
            line("roofline", f"{label(c)} batch {_get(c, 'decode', 'max', 'batch')}", v, 60.0, v >= 60.0)

    for c in cells:
        pre = _get(c, "prefill", "chunked")
        if not pre or "seconds" not in pre:
            continue
        peak, kv = pre.get("peak_bytes"), pre.get("cache_stored_bytes")
        if peak is None or weights is None or act is None or kv is None:
            line("memory", label(c), None, 1.10, None, "no device memory figures (CPU run)")
            continue
        held = held_before(pre, weights)
        own = peak - held
        bound = weights + kv + act
        line(
            "memory",
            label(c),
            own / bound,
            1.10,
            own <= 1.10 * bound,
            f"peak {own / GIB:.2f} GiB vs weights {weights / GIB:.2f} + KV {kv / GIB:.2f} "
            f"+ chunk activations {act / GIB:.2f}; {held / GIB:.2f} GiB held before the prefill not counted",
        )

    for c in cells:
        if c["policy"] != "full":
            continue
        v = _get(c, "derived", "step_vs_hf")
        if v is not None:
            line(
                "hf",
                f"ctx {c['context']} batch {_get(c, 'derived', 'hf_batch')}",
                v,
                1.0,
                v <= 1.0,
                f"full step / HF generate step (wall; faster HF: {_get(c, 'derived', 'hf_sdpa')} sdpa)",
            )
    if not any(t["target"] == "hf" for t in out):
        line("hf", "any context", None, 1.0, None, "HF generate baseline not measured")
    return out


def label(cell: dict) -> str:
    r = cell.get("ratio")
    tail = "" if cell["policy"] == "full" else (f" r={r}" if r is not None else " r=any")
    return f"{cell['policy']}{tail} @{cell['context']}"


def finalize(result: dict) -> None:
    derive(result)
    result["targets"] = targets(result)


# -- tables -------------------------------------------------------------------------------------


def _f(v, fmt="{:.1f}", none="-"):
    return none if v is None else fmt.format(v)


COLUMNS = [
    "ctx",
    "policy",
    "ratio",
    "prefill 1shot s",
    "prefill chunk s",
    "ovh 1shot %",
    "ovh chunk %",
    "own peak chunk GiB",
    "KV/row MiB",
    "KV x full",
    "max B",
    "step@b ms (b)",
    "step@max ms",
    "tok/s@max",
    "tok/s x full",
    "% roof@max",
    "status",
]


def rows(result: dict) -> list[list[str]]:
    out = []
    for c in result.get("cells", []):
        d = c.get("derived", {})
        given, mx = _get(c, "decode", "given"), _get(c, "decode", "max")
        ratio = "-" if c["policy"] == "full" else ("any" if c.get("ratio") is None else str(c["ratio"]))
        if c.get("ratios_covered") and c.get("ratio") is None:
            ratio = "any"
        peak = _get(c, "prefill", "chunked", "peak_bytes")
        if peak is not None:
            peak -= held_before(_get(c, "prefill", "chunked"), _get(result, "model", "weight_bytes"))
        out.append(
            [
                str(c["context"]),
                c["policy"],
                ratio,
                _f(_get(c, "prefill", "oneshot", "seconds"), "{:.3f}"),
                _f(_get(c, "prefill", "chunked", "seconds"), "{:.3f}"),
                _f(d.get("overhead_pct_oneshot"), "{:+.1f}"),
                _f(d.get("overhead_pct_chunked"), "{:+.1f}"),
                _f(None if peak is None else peak / GIB, "{:.2f}"),
                _f(
                    None
                    if _get(c, "kv", "stored_bytes_per_row") is None
                    else c["kv"]["stored_bytes_per_row"] / MIB
                ),
                _f(d.get("kv_stored_x_full"), "{:.3f}"),
                _f(_get(c, "max_batch", "batch"), "{}") + ("+" if _get(c, "max_batch", "capped") else ""),
                (_f(_get(given, "median_ms"), "{:.2f}") + f" ({_get(given, 'batch')})") if given else "-",
                _f(_get(mx, "median_ms"), "{:.2f}"),
                _f(_get(mx, "tokens_per_s"), "{:.0f}"),
                _f(d.get("throughput_x_full"), "{:.2f}"),
                _f(_get(mx, "roofline_pct"), "{:.0f}"),
                c.get("status", "?") + (f": {c['error'][:60]}" if c.get("error") else ""),
            ]
        )
    return out


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in body]
    )


def _verdict(t: dict) -> str:
    return "PASS" if t["pass"] is True else ("FAIL" if t["pass"] is False else "n/a ")


def target_lines(result: dict) -> list[str]:
    lines = []
    for t in result.get("targets", []):
        val = "-" if t["value"] is None else f"{t['value']:.3g}"
        note = f"  ({t['note']})" if t.get("note") else ""
        lines.append(
            f"{_verdict(t)}  [{t['target']}] {t['subject']}: {val} (threshold {t['threshold']}){note}"
        )
    return lines


def target_summary(result: dict, keep: int = 10) -> list[str]:
    """One line per target: counts, then the subjects (FAIL first) with their values."""
    lines = []
    for kind, text in TARGET_TEXT.items():
        ts = [t for t in result.get("targets", []) if t["target"] == kind]
        if not ts:
            continue
        counts = {v: sum(1 for t in ts if _verdict(t) == v) for v in ("PASS", "FAIL", "n/a ")}
        head = f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['n/a ']} n/a"
        items = sorted(ts, key=lambda t: {"FAIL": 0, "PASS": 1}.get(_verdict(t), 2))
        shown = [
            f"{_verdict(t).strip()} {t['subject']} "
            + ("-" if t["value"] is None else f"{t['value']:.3g}")
            + (f" ({t['note']})" if t["pass"] is None and t.get("note") else "")
            for t in items[:keep]
        ]
        more = f"; +{len(items) - keep} more" if len(items) > keep else ""
        lines.append(f"[{kind}] {text}: {head}\n      " + "; ".join(shown) + more)
    return lines


def micro_summary(result: dict) -> list[str]:
    """Two lines from the attention micro-benchmarks (one layer), for the hot-path notes."""
    out = []
    dec = _get(result, "micro", "decode")
    if isinstance(dec, dict) and dec.get("ms"):
        sh = dec["shape"]
        ms = ", ".join(f"{k} {_f(v, '{:.3f}')}" for k, v in dec["ms"].items())
        out.append(
            f"Decode attention, one layer (b={sh['batch']}, slots={sh['slots']}): KV-read roofline "
            f"{_f(dec.get('kv_read_roofline_ms'), '{:.3f}')} ms; {ms} ms; default backends "
            f"{dec.get('default_backend')}"
        )
    pre = _get(result, "micro", "prefill_chunk")
    if isinstance(pre, dict) and pre.get("ms"):
        sh = pre["shape"]
        extra = {k: (None if v is None else v / MIB) for k, v in (pre.get("peak_extra_bytes") or {}).items()}
        ms = ", ".join(
            f"{k} {_f(v, '{:.2f}')} ms (peak +{_f(extra.get(k), '{:.0f}')} MiB)" for k, v in pre["ms"].items()
        )
        out.append(f"Prefill-chunk attention, one layer (q={sh['q_len']}, prefix={sh['prefix']}): {ms}")
    return [""] + out if out else []


def console(result: dict) -> str:
    env = result.get("environment", {})
    bw = _get(result, "bandwidth", "tb_per_s")
    model, dtype = _get(result, "model", "name"), _get(result, "model", "dtype")
    head = (
        f"kvpipe bench: model {model} ({dtype}, random weights: speed and memory depend on shapes only) "
        f"on {env.get('device_name')}; torch {env.get('torch')}, transformers {env.get('transformers')}; "
        f"copy bandwidth {_f(bw, '{:.2f}')} TB/s; status {result.get('status')}"
    )
    parts = [head, "", text_table(COLUMNS, rows(result))]
    hf = result.get("baselines", {}).get("hf_generate", [])
    if hf:
        parts += ["", "HF generate baseline (sdpa, DynamicCache; step = (t(N+1) - t(1)) / N):"]
        for h in hf:
            if "step_ms" in h:
                parts.append(
                    f"  ctx {h['context']} batch {h['batch']} ({h.get('sdpa', 'default')} sdpa): "
                    f"step {h['step_ms']:.2f} ms, "
                    f"{_f(h.get('tokens_per_s'), '{:.0f}')} tok/s"
                )
            else:
                parts.append(f"  ctx {h.get('context')} batch {h.get('batch')}: {h.get('error')}")
    parts += micro_summary(result)
    parts += ["", "Targets (every line is in the .md):"] + ["  " + x for x in target_summary(result)]
    return "\n".join(parts)


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    m = result.get("model", {})
    s = result.get("settings", {})
    bw = result.get("bandwidth", {})
    mem = env.get("device_memory_bytes")
    weights = m.get("weight_bytes")
    dirty = " (dirty)" if env.get("git_dirty") else ""
    lines = [
        f"# kvpipe bench — {m.get('name')} on {env.get('device_name')}",
        "",
        f"- status: **{result.get('status')}**, started {result.get('started')}, "
        f"finished {result.get('finished')}",
        f"- command: `{result.get('command')}`",
        f"- resolved: `{result.get('resolved_command')}`",
        f"- device: {env.get('device_name')} (capability {env.get('capability')}, "
        f"{_f(None if mem is None else mem / GIB, '{:.1f}')} GiB, driver {env.get('driver')})",
        f"- libraries: python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}, "
        f"cuDNN {env.get('cudnn')}), transformers {env.get('transformers')}, triton {env.get('triton')}; "
        f"allocator `{env.get('alloc_conf')}`; decode `{env.get('decode_mode', 'not recorded')}`; "
        f"git {env.get('git_commit')}{dirty}",
        f"- model: {m.get('name')} shapes — {m.get('num_hidden_layers')} layers, hidden "
        f"{m.get('hidden_size')}, {m.get('num_attention_heads')} heads / {m.get('num_key_value_heads')} "
        f"kv heads, head_dim {m.get('head_dim')}, intermediate {m.get('intermediate_size')}, vocab "
        f"{m.get('vocab_size')}, {m.get('dtype')}; "
        f"{_f(None if weights is None else weights / GIB, '{:.2f}')} GiB of weights. "
        "**Random weights: speed and memory depend on shapes only.**",
        f"- copy bandwidth (same run): {_f(bw.get('tb_per_s'), '{:.2f}')} TB/s ({bw.get('method')})",
        f"- prompts: random token ids of exactly the context length; prefill batch {s.get('prefill_batch')}, "
        f"chunk {s.get('prefill_chunk')} tokens, timed after one untimed prefill of the same shapes "
        "(a job's steady state: kernels built, allocator warm; `cold_seconds` in the JSON); "
        f"decode: median of {s.get('decode_steps')} steps after "
        f"{s.get('decode_warmup')} warm-up steps, CUDA events; tok/s from wall time over the steps",
        "- decode at batch B tiles the prefilled rows' compressed caches to B rows (`select_rows`): "
        "speed and memory depend on kept shapes, not on which tokens were kept",
        f"- largest batch: {_get(result, 'notes', 'max_batch_method')}",
        "- roofline of a decode step: (weights read per step + kept KV bytes) / copy bandwidth; "
        "% = roofline / measured",
        "",
        "## Results",
        "",
        markdown_table(COLUMNS, rows(result)),
        "",
        "`max B` ends with `+` when the --max-batch cap stopped the search. `ovh` = (policy prefill - "
        "full prefill) / full prefill, same mode, same run. `tok/s x full` = policy decode tok/s at its "
        "largest batch / full's at its largest batch. `own peak` = the chunked prefill's peak minus what "
        "the process held beyond the weights before it started (earlier cells' leftovers)."
        + (
            " Merged report: each cell's `ovh` and `x full` are against the full cell of the run it came "
            "from (below), which may differ from the full row shown."
            if result.get("merged_from")
            else ""
        ),
        "",
        "## Targets",
        "",
    ]
    lines += ["- " + x.replace("PASS", "**PASS**").replace("FAIL", "**FAIL**") for x in target_lines(result)]
    runs = result.get("merged_from") or []
    if runs:
        lines += ["", "## Merged runs", ""]
        lines += [f"{i}. {r.get('started')}: `{r.get('command')}`" for i, r in enumerate(runs)]
        by_run: dict = {}
        for c in result.get("cells", []):
            by_run.setdefault(c.get("run"), []).append(label(c))
        lines += [f"- run {i}: {', '.join(cells)}" for i, cells in sorted(by_run.items(), key=str)]
    hf = result.get("baselines", {}).get("hf_generate", [])
    if hf:
        lines += ["", "## HF generate baseline", "", "```", json.dumps(hf, indent=1, default=str), "```"]
    if result.get("chunk_activation"):
        lines += [
            "",
            "## One chunk's activations",
            "",
            "```",
            json.dumps(result["chunk_activation"], indent=1),
            "```",
        ]
    if result.get("micro"):
        lines += [
            "",
            "## Attention micro-benchmarks (one layer, one decode step)",
            "",
            "```",
            json.dumps(result["micro"], indent=1, default=str),
            "```",
        ]
    errs = [c for c in result.get("cells", []) if c.get("error") or c.get("sub_errors")]
    if errs or result.get("errors"):
        lines += ["", "## Errors", ""]
        for e in result.get("errors", []):
            lines.append(f"- {e.get('stage')}: {e.get('error')}")
        for c in errs:
            lines.append(f"- {label(c)}: {c.get('error') or ''} {json.dumps(c.get('sub_errors') or {})}")
    return "\n".join(lines) + "\n"


# -- files --------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(result: dict, json_path: Path, md_path: Path) -> None:
    finalize(result)
    write_atomic(json_path, json.dumps(result, indent=1, default=str))
    write_atomic(md_path, markdown(result))


_RANK = {"ok": 3, "partial": 2, "error": 1, "skipped": 0, "pending": 0}


def merge(results: list[dict]) -> dict:
    """One report from several runs (e.g. one per context): the best status wins per cell."""
    if not results:
        raise ValueError("nothing to merge")
    results = [json.loads(json.dumps(r)) for r in results]
    for i, r in enumerate(results):
        derive(r)  # against the run's own full cells (a merged report never re-derives)
        for c in r.get("cells", []):
            c["run"] = i
    merged = json.loads(json.dumps(results[0]))
    merged["merged_from"] = [
        {
            "command": r.get("command"),
            "device": _get(r, "environment", "device_name"),
            "started": r.get("started"),
            "bandwidth_tb_per_s": _get(r, "bandwidth", "tb_per_s"),
        }
        for r in results
    ]
    cells = {c["key"]: c for c in merged.get("cells", [])}

    def hf_key(h: dict) -> tuple:
        return h.get("context"), h.get("batch"), h.get("sdpa", "default")

    hf = {hf_key(h): h for h in merged.get("baselines", {}).get("hf_generate", [])}
    for r in results[1:]:
        for c in r.get("cells", []):
            old = cells.get(c["key"])
            if old is None or _RANK.get(c.get("status"), 0) >= _RANK.get(old.get("status"), 0):
                cells[c["key"]] = c
        for h in r.get("baselines", {}).get("hf_generate", []):
            if "step_ms" in h or hf_key(h) not in hf:
                hf[hf_key(h)] = h
    merged["cells"] = sorted(cells.values(), key=lambda c: (c["context"], c.get("order", 0)))
    merged.setdefault("baselines", {})["hf_generate"] = list(hf.values())
    merged["status"] = "merged"
    return merged
