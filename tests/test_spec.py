"""Job spec: defaults, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from jobs.run_cmd import overrides_from_args
from jobs.spec import SpecError, dump_spec, load_spec, spec_from_dict


def test_defaults_are_the_embedded_job():
    spec = load_spec()
    assert spec.model == "smollm2" and spec.policy.name == "full" and spec.engine == "hf"
    assert spec.input.generate is not None and spec.input.generate.task == "passkey"


def test_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("policy:\n  name: streaming_llm\n  ratio: 0.5\n")
    spec = load_spec(
        path, ["policy.ratio=0.25", "generation.max_new_tokens=7", "policy.params={sink_tokens: 2}"]
    )
    assert spec.policy.ratio == 0.25 and spec.generation.max_new_tokens == 7
    assert spec.policy.params == {"sink_tokens": 2}
    assert load_spec(None, overrides=[f"{k}={v}" for k, v in [("model", "tiny-llama")]]).model == "tiny-llama"
    assert "streaming_llm" in dump_spec(spec)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"modle": "x"}, "modle"),
        ({"policy": {"name": "snapkv", "ratoi": 0.2}}, "policy.ratoi"),
        ({"generation": {"max_new_tokens": "ten"}}, "generation.max_new_tokens"),
        ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens"),
        ({"engine": "vllm"}, "engine"),
        ({"policy": {"name": "nope"}}, "policy.name"),
        ({"policy": {"name": "streaming_llm"}}, "policy.ratio"),
        ({"policy": {"name": "streaming_llm", "ratio": 1.5}}, "policy.ratio"),
        ({"input": {"prompt_mode": "sideways"}}, "input.prompt_mode"),
        ({"generation": {"do_sample": "yes"}}, "generation.do_sample"),
    ],
)
def test_bad_specs_name_the_key(data, key):
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        spec_from_dict(data)


def test_shorthand_flags_become_overrides():
    class Args:
        model = "tiny-llama"
        policy = "streaming_llm"
        ratio = 0.25
        overrides = ["generation.seed=3"]

    sets = overrides_from_args(Args())
    spec = load_spec(None, sets)
    assert (spec.model, spec.policy.name, spec.policy.ratio, spec.generation.seed) == (
        "tiny-llama",
        "streaming_llm",
        0.25,
        3,
    )
