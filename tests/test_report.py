"""The report from collected figures: table, HTML, PNGs, and honest axis labels."""

from __future__ import annotations

import json

from pipeline.report import PLOTS, table, write_report


def point(name, policy, ratio, acc, kept, peak=0, tasks=None):
    metrics = {
        "accuracy": acc,
        "compression_ratio": kept,
        "kv_bytes_kept": int(kept * 4 * 2**20),
        "kv_bytes_full": 4 * 2**20,
        "rows_ok": 4,
        "peak_device_bytes": peak,
        "rows_per_s": 2.0 / kept,
        "prefill_tokens_per_s": 1000.0,
        "decode_tokens_per_s": 50.0 / kept,
        "ttft_p50_s": 0.1,
        "ttft_p95_s": 0.2,
    }
    for task, value in (tasks or {}).items():
        metrics[f"accuracy.{task}"] = value
    return {
        "name": name,
        "policy": policy,
        "ratio": ratio,
        "tokens": None,
        "batch_size": 4,
        "context_length": None,
        "metrics": metrics,
        "ok": True,
    }


def data(peak=0):
    tasks = lambda a: {"passkey": a, "niah": a / 2}  # noqa: E731
    return {
        "title": "Sweep test",
        "setup": {"model": "smollm2", "devices.gpus": "none"},
        "swept": ["policy.name", "policy.ratio"],
        "points": [
            point("full", "full", None, 1.0, 1.0, peak, tasks(1.0)),
            point("snapkv-r0.5", "snapkv", 0.5, 0.75, 0.5, peak, tasks(0.75)),
            point("snapkv-r0.25", "snapkv", 0.25, 0.5, 0.25, peak, tasks(0.5)),
            {
                "name": "tova-r0.5",
                "policy": "tova",
                "ratio": 0.5,
                "tokens": None,
                "batch_size": 4,
                "context_length": None,
                "metrics": {},
                "ok": False,
            },
        ],
    }


def test_report_writes_table_html_and_three_pngs(tmp_path):
    files = write_report(data(), tmp_path)
    names = {f.name for f in files}
    assert {"report.md", "report.html", *PLOTS} <= names
    for plot in PLOTS:
        png = (tmp_path / plot).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (tmp_path / "report.md").read_text()
    assert "| snapkv-r0.25 | snapkv | 0.25 | 0.5 |" in md
    assert "| tova-r0.5 | tova | 0.5 | failed |" in md
    assert "acc. niah" in md and "acc. passkey" in md  # several tasks: a column each
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and 'src="task_heatmap.png"' in html
    assert json.loads((tmp_path / "report.json").read_text())["title"] == "Sweep test"


def test_throughput_axis_says_which_memory(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    real = plt.Axes.set_xlabel

    def spy(self, label, *a, **k):
        labels.append(label)
        return real(self, label, *a, **k)

    monkeypatch.setattr(plt.Axes, "set_xlabel", spy)
    write_report(data(peak=0), tmp_path / "cpu")
    assert any("KV cache kept per row" in label and "CPU" in label for label in labels)
    labels.clear()
    write_report(data(peak=3 * 2**30), tmp_path / "gpu")
    assert any(label.startswith("peak device memory") for label in labels)


def test_table_columns_follow_the_grid():
    d = data()
    d["swept"].append("cluster.batch_size")
    head, rows = table(d)
    assert "batch" in head and "context" not in head
    assert rows[0][head.index("KV kept (bytes, of full)")] == "1"
