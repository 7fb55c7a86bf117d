"""`kvpipe accuracy`: the in-process policy x ratio matrix, on the tiny random Llama (fast)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.accuracy import AccuracyConfig, engine_spec, plan_cells
from policies import policy_names

# snapkv joins the matrix when it is registered (policies are being added concurrently).
POLICIES = ["full", "streaming_llm"] + [p for p in ("snapkv",) if p in policy_names()]
RATIOS = [0.5, 0.25]


def test_plan_runs_full_once():
    cells = plan_cells(["streaming_llm", "full", "snapkv", "full"], [0.5, 0.25])
    assert cells == [
        ("full", None),
        ("streaming_llm", 0.5),
        ("streaming_llm", 0.25),
        ("snapkv", 0.5),
        ("snapkv", 0.25),
    ]
    assert plan_cells(["streaming_llm"], [0.5]) == [("streaming_llm", 0.5)]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    argv = [
        "accuracy",
        "--model",
        "tiny-llama",
        "--tasks",
        "passkey,niah_single",
        "--lengths",
        "256",
        "--policies",
        ",".join(POLICIES),
        "--ratios",
        ",".join(map(str, RATIOS)),
        "--samples",
        "3",
        "--depths",
        "0.1,0.9",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return out


def test_json_structure(matrix):
    data = json.loads((matrix / "accuracy.json").read_text())
    meta, cells = data["meta"], data["cells"]
    for key in ("model", "device", "torch", "transformers", "command", "config"):
        assert meta[key]
    assert meta["model"] == "tiny-llama" and meta["command"].startswith("kvpipe accuracy")
    assert len(cells) == 2 * (1 + (len(POLICIES) - 1) * len(RATIOS))
    for cell in cells:
        assert {
            "task",
            "length",
            "policy",
            "ratio",
            "samples",
            "accuracy",
            "kv_ratio",
            "prefill_s",
            "errors",
        } <= set(cell)
        assert cell["samples"] == 3 and cell["errors"] == 0
        assert 0.0 <= cell["accuracy"] <= 1.0
        assert cell["prefill_s"] > 0
        if cell["policy"] == "full":
            assert cell["ratio"] is None and cell["kv_ratio"] == pytest.approx(1.0)
        else:
            assert cell["ratio"] in RATIOS and cell["kv_ratio"] <= cell["ratio"] + 0.05
    for task in ("passkey", "niah_single"):
        assert [c["policy"] for c in cells if c["task"] == task].count("full") == 1


def test_every_policy_sees_the_same_rows(matrix):
    rows = pq.read_table(matrix / "rows.parquet").to_pylist()
    assert len(rows) == 3 * len(json.loads((matrix / "accuracy.json").read_text())["cells"])
    by_cell: dict = {}
    for r in rows:
        by_cell.setdefault((r["task"], r["length"]), {}).setdefault((r["policy"], r["ratio"]), []).append(
            (r["id"], r["row_sha1"], r["depth"])
        )
    for cells in by_cell.values():
        seen = list(cells.values())
        assert len(seen) == 1 + (len(POLICIES) - 1) * len(RATIOS)
        assert all(s == seen[0] for s in seen)
        assert [d for _, _, d in seen[0]] == [0.1, 0.9, 0.1]
    for r in rows:
        assert r["error"] is None and 0.0 <= r["score"] <= 1.0


def test_markdown_table(matrix):
    md = (matrix / "accuracy.md").read_text()
    assert "## passkey @ 256 tokens" in md and "## niah_single @ 256 tokens" in md
    assert "| policy | full cache | 0.5 | 0.25 |" in md
    assert "transformers" in md and "kvpipe accuracy" in md
    assert md.count("| full |") == 2


def test_set_policy_matches_a_fresh_engine(tiny_llama):
    from pipeline.engine import InferenceEngine
    from pipeline.tasks import generate

    cfg = AccuracyConfig(model="tiny-llama", device="cpu", max_new_tokens=3, batch_size=2)
    rows = generate("passkey", 200, 2, 0, tiny_llama[1], depths=[0.5])
    swapped = InferenceEngine(engine_spec(cfg))
    swapped.set_policy("streaming_llm", ratio=0.25)
    fresh = InferenceEngine(engine_spec(cfg, "streaming_llm", 0.25))
    a, b = swapped.process(rows), fresh.process(rows)
    assert [r["output_text"] for r in a] == [r["output_text"] for r in b]
    assert [r["kv_bytes_kept"] for r in a] == [r["kv_bytes_kept"] for r in b]
    assert all(r["policy"] == "streaming_llm" for r in a)


def test_unknown_policy_fails_before_loading(tmp_path, capsys):
    rc = main(["accuracy", "--model", "tiny-llama", "--policies", "full,nope", "--out", str(tmp_path)])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "accuracy.json").exists()
