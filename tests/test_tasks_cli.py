"""`kvpipe data make` / `kvpipe data tasks` through the real CLI entry point."""

import hashlib
import json

import pyarrow.parquet as pq

from jobs.cli import main
from pipeline.tasks import TASKS, load_rows


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make(out, *extra, seed="7"):
    argv = ["data", "make", "niah_single", "--context-length", "1024", "--samples", "3", "--seed", seed]
    return main(argv + ["--model", "smollm2", "--out", str(out), "--depths", "0.2,0.8", *extra])


def test_parquet_is_byte_identical_for_the_same_command(tmp_path):
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    assert _make(a) == 0
    assert _make(b) == 0
    assert _make(c, seed="8") == 0
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)
    table = pq.read_table(a)
    assert table.num_rows == 3
    params = json.loads(table.schema.metadata[b"kvpipe.data_params"])
    assert params["seed"] == 7 and params["depths"] == [0.2, 0.8]
    rows = load_rows(a)
    assert [r["id"] for r in rows] == ["niah_single-1024-0", "niah_single-1024-1", "niah_single-1024-2"]
    assert [r["depth"] for r in rows] == [0.2, 0.8, 0.2]
    assert all(abs(r["prompt_tokens"] - 1024) <= 20 for r in rows)


def test_jsonl_output_and_task_options(tmp_path):
    out = tmp_path / "mq.jsonl"
    argv = ["data", "make", "niah_multiquery", "--context-length", "1024,2048", "--samples", "2"]
    assert main(argv + ["--num-queries", "3", "--prompt-mode", "context_only", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["context_length"] for r in rows] == [1024, 1024, 2048, 2048]
    assert all(len(r["answer"]) == 3 and r["prompt_mode"] == "context_only" for r in rows)
    assert load_rows(out) == rows


def test_rejects_options_of_other_tasks(tmp_path, capsys):
    argv = ["data", "make", "passkey", "--context-length", "1024", "--num-keys", "3"]
    assert main(argv + ["--out", str(tmp_path / "x.parquet")]) == 2
    assert "--num-keys" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


def test_tasks_lists_every_task_with_its_scorer(capsys):
    assert main(["data", "tasks"]) == 0
    out = capsys.readouterr().out
    for name, spec in TASKS.items():
        assert any(line.startswith(name) and f"scorer={spec.scorer}" in line for line in out.splitlines())
