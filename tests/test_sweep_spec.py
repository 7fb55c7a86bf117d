"""Sweep YAML validation and the grid's points (no Ray, no server)."""

from __future__ import annotations

import pytest

from jobs.spec import SpecError
from pipeline.sweep import build_sweep


def sweep_data(tmp_path, uri: str, experiment: str) -> dict:
    return {
        "model": "tiny-llama",
        "generation": {"max_new_tokens": 4},
        "input": {
            "path": str(tmp_path / "data" / "passkey.parquet"),
            "generate": {"task": "passkey", "context_length": 128, "samples": 3, "seed": 0},
        },
        "output": {"path": str(tmp_path / "sweep")},
        "tracking": {"uri": uri, "experiment": experiment},
        "grid": {"policies": ["streaming_llm", "snapkv"], "ratios": [0.5, 0.25]},
    }


def test_sweep_yaml_errors_name_the_key(tmp_path):
    base = sweep_data(tmp_path, "sqlite:///x.db", "e")
    cases = {
        "grid.nope": {"nope": [1]},
        "grid.policies": {"ratios": [0.5]},
        "grid.policies[1]": {"policies": ["full", "no_such_policy"]},
        "grid.ratios[0]": {"policies": ["snapkv"], "ratios": [1.5]},
        "grid.batch_sizes[0]": {"policies": ["full"], "batch_sizes": [0]},
        "grid.ratios:": {"policies": ["snapkv"]},  # a compressing policy without budgets
    }
    for key, grid in cases.items():
        with pytest.raises(SpecError, match=key.replace("[", r"\[").replace("]", r"\]")):
            build_sweep({**base, "grid": grid})
    with pytest.raises(SpecError, match="unknown key generation.bogus"):
        build_sweep({**base, "generation": {"bogus": 1}})
    with pytest.raises(SpecError, match="grid.context_lengths"):
        build_sweep(
            {
                **base,
                "input": {"path": "x.parquet", "generate": None},
                "grid": {"policies": ["full"], "context_lengths": [256]},
            }
        )


def test_grid_points_full_once_and_per_length_data(tmp_path):
    data = sweep_data(tmp_path, "sqlite:///x.db", "e")
    data["grid"] = {
        "policies": ["full", "snapkv"],
        "ratios": [0.5, 0.25],
        "context_lengths": [128, 256],
        "batch_sizes": [1, 2],
    }
    sweep = build_sweep(data)
    names = [p.name for p in sweep.points]
    assert len(names) == 2 * 2 * (1 + 2) and len(set(names)) == len(names)
    assert "full-b1-c128" in names and "snapkv-r0.25-b2-c256" in names
    for p in sweep.points:
        assert p.spec.input.generate.context_length == p.context_length
        assert p.spec.input.generate.seed == 0
        assert p.spec.input.path.endswith(f"passkey-{p.context_length}-n3-s0.parquet")
        assert p.spec.cluster.batch_size == p.batch_size
        assert (p.spec.policy.ratio is None) == (p.policy == "full")


def test_the_example_sweep_is_valid():
    from pathlib import Path

    from pipeline.sweep import load_sweep

    sweep = load_sweep(Path(__file__).parent.parent / "jobs" / "examples" / "sweep.yaml")
    assert [p.name for p in sweep.points] == [
        "full",
        "streaming_llm-r0.5",
        "streaming_llm-r0.25",
        "snapkv-r0.5",
        "snapkv-r0.25",
    ]
    assert {p.spec.model for p in sweep.points} == {"smollm2"}
