"""A sweep's report: one table (Markdown and HTML) and three plots people can read.

Sources: a sweep's output directory (`_sweep.json` + each point's `_summary.json`), or an
MLflow parent run (its children's params and metrics). Plots (matplotlib, Agg):
- accuracy against the KV budget actually kept (bytes kept / full), one line per policy;
- decode tokens/s and rows/s against peak device memory (on CPU, where that is 0, against
  the KV cache bytes kept per row; the axis says which);
- a heat map of accuracy per policy (and budget) x task.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path

from pipeline import tracking

MANIFEST_NAME = tracking.SWEEP_MANIFEST
PLOTS = ("accuracy_vs_budget.png", "throughput_vs_memory.png", "task_heatmap.png")
MIB = 2**20


# -- collecting ------------------------------------------------------------------------------
def _num(value) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def collect_from_dir(sweep_dir: Path) -> dict:
    """{"title", "setup": {...}, "swept": [...], "points": [{name, policy, ratio, ..., metrics}]}"""
    sweep_dir = Path(sweep_dir)
    manifest = json.loads((sweep_dir / MANIFEST_NAME).read_text())
    points = []
    for p in manifest["points"]:
        out = sweep_dir / p["dir"]
        summary_path = out / "_summary.json"
        metrics: dict = {}
        if summary_path.exists():
            metrics = json.loads(summary_path.read_text())
        record_path = out / tracking.RECORD_NAME
        if record_path.exists():  # the sweep adds system figures to the record
            metrics = {**tracking.RunRecord.load(record_path).metrics, **metrics}
        points.append({**p, "metrics": metrics, "ok": bool(metrics)})
    setup: dict = {}
    parent = sweep_dir / tracking.RECORD_NAME
    if parent.exists():
        setup = tracking.RunRecord.load(parent).params
    return {
        "title": f"Sweep {sweep_dir.name}",
        "setup": setup,
        "swept": manifest.get("swept", []),
        "points": points,
    }


def collect_from_mlflow(run_id: str, uri: str) -> dict:
    """The same, from a parent run and its child runs in MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{run_id}'",
        max_results=5000,
    )
    points = []
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        p, m = run.data.params, run.data.metrics

        def param(key, cast, p=p):
            v = p.get(key)
            return None if v in (None, "null", "None") else cast(json.loads(v) if cast is not str else v)

        gen_len = param("input.generate.context_length", int)
        points.append(
            {
                "name": run.data.tags.get("kvpipe.sweep.point") or run.info.run_name,
                "policy": p.get("policy.name"),
                "ratio": param("policy.ratio", float),
                "tokens": param("policy.tokens", int),
                "batch_size": param("cluster.batch_size", int),
                "context_length": gen_len,
                "metrics": dict(m),
                "ok": bool(m),
            }
        )
    swept = [k.removeprefix("grid.") for k in parent.data.params if k.startswith("grid.")]
    swept_keys = ["policy.name"]
    if "batch_sizes" in swept:
        swept_keys.append("cluster.batch_size")
    if "context_lengths" in swept:
        swept_keys.append("input.generate.context_length")
    return {
        "title": f"{parent.info.run_name} (MLflow run {run_id})",
        "setup": dict(parent.data.params),
        "swept": swept_keys,
        "points": points,
    }


# -- the table -------------------------------------------------------------------------------
def _budget(p: dict) -> str:
    if p["policy"] == "full":
        return "—"
    if p.get("ratio") is not None:
        return f"{p['ratio']:g}"
    if p.get("tokens") is not None:
        return f"{p['tokens']} tok"
    return "?"


def _tasks(points: list[dict]) -> list[str]:
    tasks = {k.removeprefix("accuracy.") for p in points for k in p["metrics"] if k.startswith("accuracy.")}
    return sorted(tasks)


def _fmt(v, digits: int = 3) -> str:
    v = _num(v)
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}g}"


def table(data: dict) -> tuple[list[str], list[list[str]]]:
    points = data["points"]
    swept = data.get("swept", [])
    by_batch = "cluster.batch_size" in swept
    by_ctx = any(k.startswith("input.generate.context_length") for k in swept)
    tasks = _tasks(points)
    head = ["point", "policy", "budget"]
    head += ["batch"] if by_batch else []
    head += ["context"] if by_ctx else []
    head += ["accuracy"] + ([f"acc. {t}" for t in tasks] if len(tasks) > 1 else [])
    head += [
        "KV kept (bytes, of full)",
        "KV MiB / row",
        "peak dev. MiB",
        "rows/s",
        "prefill tok/s",
        "decode tok/s",
        "TTFT p50 s",
        "TTFT p95 s",
    ]
    rows = []
    for p in points:
        m = p["metrics"]
        if not p.get("ok"):
            rows.append([p["name"], p["policy"], _budget(p)] + ["failed"] + [""] * (len(head) - 4))
            continue
        ok_rows = _num(m.get("rows_ok")) or 0
        kv_row = (_num(m.get("kv_bytes_kept")) or 0) / ok_rows / MIB if ok_rows else None
        row = [p["name"], p["policy"], _budget(p)]
        row += [str(p.get("batch_size"))] if by_batch else []
        row += [str(p.get("context_length"))] if by_ctx else []
        row += [_fmt(m.get("accuracy"))]
        row += [_fmt(m.get(f"accuracy.{t}")) for t in tasks] if len(tasks) > 1 else []
        row += [
            _fmt(m.get("compression_ratio")),
            _fmt(kv_row),
            _fmt((_num(m.get("peak_device_bytes")) or 0) / MIB),
            _fmt(m.get("rows_per_s")),
            _fmt(m.get("prefill_tokens_per_s")),
            _fmt(m.get("decode_tokens_per_s")),
            _fmt(m.get("ttft_p50_s")),
            _fmt(m.get("ttft_p95_s")),
        ]
        rows.append(row)
    return head, rows


def _setup_lines(data: dict) -> list[str]:
    s = data.get("setup", {})
    keys = [
        ("model", "model"),
        ("engine", "engine"),
        ("input", "input.path"),
        ("generated data", "input.generate.task"),
        ("samples", "input.generate.samples"),
        ("max new tokens", "generation.max_new_tokens"),
        ("batch size", "cluster.batch_size"),
        ("CPU", "devices.cpu"),
        ("GPUs", "devices.gpus"),
        ("torch / transformers / ray / mlflow", None),
    ]
    lines = []
    for label, key in keys:
        if key is None:
            vs = [s.get(f"versions.{n}") for n in ("torch", "transformers", "ray", "mlflow")]
            if any(vs):
                lines.append(f"{label}: {' / '.join(v or '?' for v in vs)}")
        elif key in s:
            lines.append(f"{label}: {s[key]}")
    return lines


def markdown(data: dict, plots: list[str]) -> str:
    head, rows = table(data)
    out = [f"# {data['title']}", ""]
    out += [f"- {line}" for line in _setup_lines(data)]
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += [
        "",
        "KV kept: bytes of the prompt's cache kept after compression over the full cache's bytes. "
        "Prefill/decode tok/s: tokens over the batches' own prefill/decode time. "
        "Peak dev. MiB: peak device memory (0 on CPU).",
        "",
    ]
    out += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


def html_page(data: dict, plots: list[str]) -> str:
    head, rows = table(data)
    esc = html.escape
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    setup = "".join(f"<li>{esc(line)}</li>" for line in _setup_lines(data))
    imgs = "".join(f'<p><img src="{esc(Path(p).name)}" style="max-width:100%"></p>' for p in plots)
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,td:nth-child(2){text-align:left}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(data['title'])}</title>"
        f"<style>{style}</style></head><body><h1>{esc(data['title'])}</h1><ul>{setup}</ul>"
        f"<table><tr>{cells}</tr>{body}</table>{imgs}</body></html>\n"
    )


# -- plots -----------------------------------------------------------------------------------
def _ok(points):
    return [p for p in points if p.get("ok")]


def _series_label(p: dict, by_ctx: bool) -> str:
    return p["policy"] + (f" @ {p['context_length']}" if by_ctx else "")


def plot_accuracy(data: dict, path: Path, plt) -> Path:
    points = _ok(data["points"])
    by_ctx = len({p.get("context_length") for p in points}) > 1
    lines: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        x, y = _num(p["metrics"].get("compression_ratio")), _num(p["metrics"].get("accuracy"))
        if x is not None and y is not None:
            lines[_series_label(p, by_ctx)][round(x, 4)].append(y)  # batch sizes: averaged
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs in sorted(lines.items()):
        pts = sorted((x, sum(ys) / len(ys)) for x, ys in xs.items())
        style = "*" if label.startswith("full") else "o-"
        ax.plot(
            [x for x, _ in pts], [y for _, y in pts], style, label=label, markersize=9 if style == "*" else 6
        )
    ax.set_xlabel("KV budget kept (achieved: cache bytes kept / full cache bytes)")
    ax.set_ylabel("accuracy (mean score)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against KV budget, per policy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(data: dict, path: Path, plt) -> Path:
    points = _ok(data["points"])
    peak = [(_num(p["metrics"].get("peak_device_bytes")) or 0) for p in points]
    use_device = any(v > 0 for v in peak)

    def x_of(p):
        m = p["metrics"]
        if use_device:
            return (_num(m.get("peak_device_bytes")) or 0) / MIB
        rows = _num(m.get("rows_ok")) or 0
        return (_num(m.get("kv_bytes_kept")) or 0) / rows / MIB if rows else None

    xlabel = (
        "peak device memory (MiB)"
        if use_device
        else "KV cache kept per row (MiB) — CPU run: no device memory to measure"
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = "osD^v<>ph*"
    policies = sorted({p["policy"] for p in points})
    for ax, key, ylabel in (
        (axes[0], "decode_tokens_per_s", "decode tokens/s"),
        (axes[1], "rows_per_s", "rows/s (whole job)"),
    ):
        for i, policy in enumerate(policies):
            pts = [(x_of(p), _num(p["metrics"].get(key)), p) for p in points if p["policy"] == policy]
            pts = [t for t in pts if t[0] is not None and t[1] is not None]
            ax.scatter(
                [t[0] for t in pts], [t[1] for t in pts], marker=markers[i % len(markers)], label=policy, s=45
            )
            for x, y, p in pts:
                note = _budget(p) if p["policy"] != "full" else ""
                if len({q.get("batch_size") for q in points}) > 1:
                    note += f" b{p['batch_size']}"
                if note.strip():
                    ax.annotate(note.strip(), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Throughput against memory (labels: budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(data: dict, path: Path, plt) -> Path:
    points = _ok(data["points"])
    tasks = _tasks(points) or ["all"]
    by_ctx = len({p.get("context_length") for p in points}) > 1
    cols = sorted(
        {(t, p.get("context_length")) for t in tasks for p in points}, key=lambda c: (c[0], c[1] or 0)
    )
    if not by_ctx:
        cols = [(t, None) for t in tasks]
    cells: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    order: list[str] = []
    for p in points:
        label = p["policy"] + ("" if p["policy"] == "full" else f" {_budget(p)}")
        if label not in order:
            order.append(label)
        for t in tasks:
            key = "accuracy" if t == "all" else f"accuracy.{t}"
            v = _num(p["metrics"].get(key))
            if v is not None:
                cells[label][(t, p.get("context_length") if by_ctx else None)].append(v)
    grid = [[(sum(v) / len(v)) if (v := cells[r].get(c)) else float("nan") for c in cols] for r in order]
    fig, ax = plt.subplots(figsize=(max(5.0, 2.8 + 1.3 * len(cols)), 1.4 + 0.45 * len(order)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([t + (f"\n{c}" if c else "") for t, c in cols], fontsize=8)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(order, fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title("Accuracy per policy x task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(data: dict, out_dir: Path) -> list[Path]:
    """Write report.md, report.html and the PNGs into `out_dir`; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    if _ok(data["points"]):
        plots = [
            plot_accuracy(data, out_dir / PLOTS[0], plt),
            plot_throughput(data, out_dir / PLOTS[1], plt),
            plot_heatmap(data, out_dir / PLOTS[2], plt),
        ]
    names = [str(p) for p in plots]
    md = out_dir / "report.md"
    md.write_text(markdown(data, names))
    page = out_dir / "report.html"
    page.write_text(html_page(data, names))
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=str))
    return [md, page, out_dir / "report.json", *plots]


def log_report(files: list[Path], run_id: str, uri: str, timeout_s: float = 60.0) -> bool:
    """Log the report files to the (parent) run, within a deadline; False when MLflow did not answer."""
    import threading

    tracking._bounded_env(timeout_s)
    done: dict = {}

    def work() -> None:
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            for f in files:
                client.log_artifact(run_id, str(f), "report")
            done["ok"] = True
        except Exception as exc:  # noqa: BLE001
            done["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(done.get("ok"))
