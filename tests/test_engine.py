"""The engine over rows: hf vs DeepSpeed-inference, per-row errors, batching order."""

from __future__ import annotations

import pytest

from jobs.spec import spec_from_dict
from pipeline.engine import InferenceEngine

ROWS = [
    {"id": "a", "prompt": "What is the capital of France?"},
    {"id": "b", "prompt": "Name three colours of the rainbow."},
    {
        "id": "c",
        "context": "Alice has 3 apples. Bob has 5 pears.",
        "question": "How many apples has Alice?",
        "answer": ["3", "three"],
    },
]
BAD_ROWS = [
    {"id": "missing"},
    {"id": "empty", "prompt": "   "},
    {"id": "wrong-type", "prompt": 42},
    {"id": "too-long", "prompt": "word " * 9000},
]


def engine_spec(**overrides) -> dict:
    spec = {
        "model": "smollm2",
        "dtype": "float32",
        "device": "cpu",
        "generation": {"max_new_tokens": 10},
        "cluster": {"batch_size": 2},
    }
    spec.update(overrides)
    return spec_from_dict(spec).to_dict()


@pytest.fixture(scope="module")
def hf_engine():
    return InferenceEngine(engine_spec())


@pytest.mark.slow
def test_deepspeed_engine_gives_the_same_outputs_as_hf(hf_engine):
    ds_engine = InferenceEngine(engine_spec(engine="deepspeed"))
    assert type(ds_engine.model).__name__ == "LlamaForCausalLM"  # the HF module DeepSpeed wrapped
    hf_out = [r["output_text"] for r in hf_engine.process(ROWS)]
    ds_out = [r["output_text"] for r in ds_engine.process(ROWS)]
    assert all(hf_out) and ds_out == hf_out


@pytest.mark.slow
def test_every_row_comes_out_in_order_with_result_or_error(hf_engine):
    rows = [ROWS[0], *BAD_ROWS, ROWS[2]]
    out = hf_engine.process(rows)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    errors = {r["id"]: r["error"] for r in out}
    assert errors["a"] is None and errors["c"] is None
    assert "missing prompt" in errors["missing"]
    assert "empty prompt" in errors["empty"]
    assert "wrong type" in errors["wrong-type"] and "int" in errors["wrong-type"]
    assert "prompt too long" in errors["too-long"] and "8192" in errors["too-long"]
    scored = next(r for r in out if r["id"] == "c")
    assert scored["score"] in (0.0, 1.0) and scored["output_tokens"] > 0
    assert next(r for r in out if r["id"] == "a")["score"] is None  # no answer, no score
