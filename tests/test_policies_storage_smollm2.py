"""Storage forms on the real SmolLM2 (fp32, CPU): bytes on target at ~2K tokens, batching, sanity."""

from __future__ import annotations

import pytest

from pipeline.generate import GenerationConfig, Generator
from policies import Budget, make_policy
from policies.compose import ComposedPolicy
from tests.conftest import long_prompt_ids

pytestmark = pytest.mark.slow
BUDGET = Budget(ratio=0.25)
POLICIES = [("kivi", {}), ("spindlekv", {"rope_theta": 100000.0}), ("snapkv+kivi", {})]


def stated_target(policy, prompt_tokens: int, head_dim: int) -> float:
    if isinstance(policy, ComposedPolicy):
        return policy.target_ratio(prompt_tokens, BUDGET, dtype_bytes=4, head_dim=head_dim)
    if policy.name == "kivi":
        return policy.target_ratio(prompt_tokens, dtype_bytes=4, head_dim=head_dim)
    return policy.target_ratio(prompt_tokens, BUDGET)


def test_bytes_on_target_at_2k_batch_of_two(smollm2):
    """kv_bytes_kept / kv_bytes_full (from the layers' real tensors) within 10% of the stated target."""
    model, tok = smollm2
    prompts = [long_prompt_ids(tok, 2048), long_prompt_ids(tok, 1800, needle="The secret word is plum. ")]
    assert 1900 < len(prompts[0]) <= 2048 and 1600 < len(prompts[1]) < 1900
    for name, params in POLICIES:
        policy = make_policy(name, **params)
        rows, _ = Generator(model, tok, policy, BUDGET).generate(prompts, GenerationConfig(max_new_tokens=1))
        for p, row in zip(prompts, rows):
            achieved = row.kv_bytes_kept / row.kv_bytes_full
            target = stated_target(policy, len(p), model.config.head_dim)
            assert achieved == pytest.approx(target, rel=0.10), (name, achieved, target)


def test_batched_equals_unbatched(smollm2):
    model, tok = smollm2
    prompts = [long_prompt_ids(tok, 300), long_prompt_ids(tok, 200, needle="The secret word is plum. ")]
    cfg = GenerationConfig(max_new_tokens=4)
    for name, params in POLICIES:
        gen = Generator(model, tok, make_policy(name, **params), Budget(ratio=0.5))
        batched, _ = gen.generate(prompts, cfg)
        for p, row in zip(prompts, batched):
            alone, _ = gen.generate([p], cfg)
            assert row.output_ids == alone[0].output_ids, name
            assert row.kv_bytes_kept == alone[0].kv_bytes_kept, name


def test_kivi_4bit_greedy_stays_with_full(smollm2):
    """Sanity check of de-quantisation: 4-bit KIVI decodes the same answer as the full cache."""
    model, tok = smollm2
    prompt = long_prompt_ids(tok, 600)  # the pass key in the middle: most of it is quantised
    cfg = GenerationConfig(max_new_tokens=6)
    full, _ = Generator(model, tok, make_policy("full"), None).generate([prompt], cfg)
    for params in ({"bits": 4}, {"bits": 4, "residual": 32}):
        kivi, _ = Generator(model, tok, make_policy("kivi", **params), BUDGET).generate([prompt], cfg)
        assert kivi[0].kv_bytes_kept < 0.5 * kivi[0].kv_bytes_full
        assert kivi[0].output_ids == full[0].output_ids, tok.decode(kivi[0].output_ids)
