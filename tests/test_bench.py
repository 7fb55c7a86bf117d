"""`kvpipe bench` on CPU with a tiny random Llama: the result structure, not the timings.

Benchmarks are tools, never timed assertions: this checks that a run covers every requested
cell (measured, or carrying its error), writes JSON + Markdown with the environment and the
command, and that the report derives ratios and target lines from what it measured.
"""

from __future__ import annotations

import json

import pytest
import torch

from jobs.bench_cmd import command_line
from jobs.cli import main
from pipeline.bench import report
from pipeline.bench.settings import BenchSettings

CONTEXTS = (128, 256)
POLICIES = ("full", "snapkv", "kivi", "no_such_policy")
RATIOS = (0.25,)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "bench", "--tiny", "--device", "cpu", "--contexts", ",".join(map(str, CONTEXTS)),
        "--policies", ",".join(POLICIES), "--ratios", ",".join(map(str, RATIOS)),
        "--decode-steps", "2", "--decode-warmup", "1", "--max-batch", "2", "--decode-batch", "1",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    (json_path,) = out.glob("bench-tiny-*.json")
    (md_path,) = out.glob("bench-tiny-*.md")
    return json.loads(json_path.read_text()), md_path.read_text(), out


def test_every_requested_cell_is_present_or_carries_an_error(tiny_run):
    result, _, _ = tiny_run
    assert result["status"] == "complete"
    cells = result["cells"]
    for context in CONTEXTS:
        for policy in POLICIES:
            for ratio in (None,) if policy == "full" else RATIOS:
                found = [
                    c
                    for c in cells
                    if c["context"] == context and c["policy"] == policy and report.covers(c, ratio)
                ]
                assert len(found) == 1, (context, policy, ratio)
                cell = found[0]
                assert cell["status"] in ("ok", "partial", "error")
                if cell["status"] != "ok":
                    assert cell["error"]
    bad = [c for c in cells if c["policy"] == "no_such_policy"]
    assert bad and all(c["status"] == "error" and "unknown policy" in c["error"] for c in bad)
    # kivi stores the same whatever the budget: one cell per context, covering the ratios
    kivi = [c for c in cells if c["policy"] == "kivi"]
    assert len(kivi) == len(CONTEXTS) and all(c["ratios_covered"] == list(RATIOS) for c in kivi)


def test_measured_cells_have_prefill_decode_and_batch(tiny_run):
    result, _, _ = tiny_run
    for cell in result["cells"]:
        if cell["policy"] == "no_such_policy":
            continue
        assert cell["status"] == "ok", cell.get("error")
        for mode in ("oneshot", "chunked"):
            pre = cell["prefill"][mode]
            assert pre["seconds"] > 0 and pre["cache_stored_bytes"] > 0
        assert cell["max_batch"]["batch"] == 2 and cell["max_batch"]["capped"]  # CPU: the cap
        for which in ("given", "max"):
            dec = cell["decode"][which]
            assert dec["median_ms"] > 0 and dec["tokens_per_s"] > 0 and dec["roofline_pct"] > 0
        assert 0 < cell["kv"]["kept_fraction"] <= 1.0 + 1e-6
        if cell["policy"] != "full":
            assert "overhead_pct_oneshot" in cell["derived"] and "throughput_x_full" in cell["derived"]
            assert cell["kv"]["kept_fraction"] < 0.9  # compression is real


def test_overhead_is_against_full_prefills_timed_beside_the_cell(tiny_run):
    """Each compressing cell times full-cache prefills of its ids beside its own runs, one per run
    (--tiny: one run), and the overhead is the median of the pairs' ratios; the comparison with
    the full cell stays in the derived figures under its own name."""
    result, _, _ = tiny_run
    checked = 0
    for cell in result["cells"]:
        if cell["status"] != "ok":
            continue
        for mode in ("oneshot", "chunked"):
            pre, derived = cell["prefill"][mode], cell["derived"]
            if cell["policy"] == "full":
                assert "paired_overhead_pct" not in pre
                continue
            (full_s,) = pre["paired_full_all_seconds"]
            assert full_s > 0 and pre["paired_full_seconds"] == full_s
            want = 100.0 * (pre["seconds"] / full_s - 1.0)
            assert derived[f"overhead_pct_{mode}"] == pytest.approx(want)
            assert f"overhead_pct_{mode}_vs_full_cell" in derived
            checked += 1
    assert checked == 2 * 2 * len(CONTEXTS)  # snapkv and kivi, both modes, at each context


def test_environment_baselines_targets_and_markdown(tiny_run):
    result, md, _ = tiny_run
    env = result["environment"]
    for key in ("device_name", "torch", "transformers", "python"):
        assert env[key]
    # `command` is the process's own command line (here pytest's), `resolved_command` the bench's
    assert result["command"] == command_line()
    assert result["resolved_command"].startswith("kvpipe bench --model tiny")
    assert result["model"]["num_hidden_layers"] == 4 and "shapes" in result["model"]["weights"]
    assert result["bandwidth"]["bytes_per_s"] > 0
    assert result["micro"]["decode"]["ms"]["kvpipe_shared_mask_gqa"] is not None
    assert result["micro"]["prefill_chunk"]["ms"]["kvpipe_bool_mask"] is not None
    hf = result["baselines"]["hf_generate"]
    assert {h["context"] for h in hf} == set(CONTEXTS) and all(h["step_ms"] is not None for h in hf)
    assert {h["sdpa"] for h in hf} == {"default", "no-cudnn"}  # the target takes the faster one
    kinds = {t["target"] for t in result["targets"]}
    assert kinds == {"overhead", "throughput", "roofline", "memory", "hf"}
    assert all(t["pass"] in (True, False, None) for t in result["targets"])
    assert "Random weights" in md and "## Targets" in md and result["command"] in md


def test_merge_prefers_measured_cells(tiny_run):
    result, _, out = tiny_run
    broken = json.loads(json.dumps(result))
    for cell in broken["cells"]:
        cell.update(status="error", error="boom")
    merged = report.merge([broken, result])
    assert all(c["status"] != "error" or c["policy"] == "no_such_policy" for c in merged["cells"])
    assert len(merged["merged_from"]) == 2
    paths = sorted(out.glob("bench-tiny-*.json"))
    assert main(["bench", "--report", *map(str, paths), "--out", str(out)]) == 0
    assert list(out.glob("bench-merged-*.md"))


def test_merge_keeps_each_cell_against_its_own_runs_full(tiny_run):
    """Prefill times move between runs: a merged report must not compare one run's cell with
    another run's full cell."""
    result, _, _ = tiny_run
    slower = json.loads(json.dumps(result))
    slower["cells"] = [c for c in slower["cells"] if c["policy"] == "full"]
    for c in slower["cells"]:
        for mode in ("oneshot", "chunked"):
            c["prefill"][mode]["seconds"] *= 2
    merged = report.merge([result, slower])
    report.finalize(merged)  # what `save` does
    own = {c["key"]: c["derived"] for c in result["cells"]}
    checked = 0
    for cell in merged["cells"]:
        if cell["policy"] == "full":
            assert cell["run"] == 1  # the later run's full cell replaced the first one's
        elif cell["status"] == "ok":
            assert cell["run"] == 0
            assert cell["derived"]["overhead_pct_oneshot"] == own[cell["key"]]["overhead_pct_oneshot"]
            checked += 1
    assert checked > 0
    md = report.markdown(merged)
    assert "## Merged runs" in md and "run 1: full" in md


def test_settings_validate():
    with pytest.raises(ValueError):
        BenchSettings(ratios=(1.5,))
    with pytest.raises(ValueError):
        BenchSettings(prefill_modes=("sideways",))


def test_a_named_commit_wins_over_the_surrounding_checkout(monkeypatch):
    """A `git archive` copy run inside another checkout must not report that checkout's HEAD."""
    import torch

    from pipeline.bench import gpu

    monkeypatch.setenv("KVPIPE_GIT_COMMIT", "0123abc")
    env = gpu.environment(torch.device("cpu"))
    assert (env["git_commit"], env["git_dirty"], env["git_commit_from"]) == (
        "0123abc",
        False,
        "KVPIPE_GIT_COMMIT",
    )
    monkeypatch.delenv("KVPIPE_GIT_COMMIT")
    env = gpu.environment(torch.device("cpu"))
    assert env["git_commit_from"] == "git" and env["git_commit"] != "0123abc"


def test_a_timed_prefill_starts_with_no_earlier_cache_alive(monkeypatch):
    """Each timed run's peak is its own: no earlier run's cache (the untimed run's, the previous
    rep's, the paired full run's) may still be referenced when a timed run of the cell starts."""
    import weakref

    from pipeline.bench import measure
    from pipeline.bench.runner import Bench

    class Result:
        cache = None

    alive: list = []
    started_with: list = []  # (generator, earlier results still referenced)

    def fake_prefill(gen, ids, chunk, room):
        started_with.append((gen, sum(r() is not None for r in alive)))
        out = Result()
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(measure, "kvpipe_prefill", fake_prefill)
    monkeypatch.setattr(measure, "kv_bytes", lambda cache: (1, 1))
    bench = Bench(BenchSettings(model="tiny", device="cpu", prefill_reps=3), "test")
    info, pre = bench._prefill("policy", torch.zeros((1, 8), dtype=torch.long), None, paired="full")
    assert len(info["paired_full_all_seconds"]) == 3 and len(info["all_seconds"]) == 3
    timed = [n for gen, n in started_with[2:] if gen == "policy"]  # after the two untimed runs
    assert len(timed) == 3 and timed == [0, 0, 0]
    assert all(n <= 1 for _, n in started_with)  # a paired run may follow the policy's kept cache
    assert isinstance(pre, Result)
