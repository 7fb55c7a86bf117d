"""Every eviction policy at ratio 0.25 on ~2K-token prompts with the real SmolLM2 (batch of 2).

The achieved ratio is measured from the cache's real tensors (kept bytes per row after
prefill) and must be within 10% of 0.25; the tensors the cache stores must really shrink.
"""

from __future__ import annotations

import pytest

from pipeline.generate import GenerationConfig, Generator
from policies import Budget, make_policy

POLICIES = ["snapkv", "pyramidkv", "h2o", "tova", "knorm", "adakv"]
LENGTHS = (2048, 1800)


@pytest.fixture(scope="module")
def smollm2_and_prompts():
    from pipeline.models import load_model

    model, tok = load_model("smollm2", dtype="float32")
    text = (
        "The museum opens at nine. Visitors walk through halls of maps, clocks and old ships. "
        "A guide explains how sailors read the stars, and children count the brass instruments. "
    )
    ids = tok(text * 200, add_special_tokens=False)["input_ids"]
    prompts = [ids[:n] for n in LENGTHS]
    return model, tok, prompts


@pytest.mark.slow
@pytest.mark.parametrize("name", POLICIES)
def test_ratio_quarter_is_achieved_in_real_bytes(smollm2_and_prompts, name):
    model, tok, prompts = smollm2_and_prompts
    gen = Generator(model, tok, make_policy(name), Budget(ratio=0.25))
    results, stats = gen.generate(prompts, GenerationConfig(max_new_tokens=1))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    slot_bytes = 2 * head_dim * 4  # fp32 key + value
    for r, n in zip(results, LENGTHS):
        assert r.prompt_tokens == n
        assert r.kv_bytes_full == n * cfg.num_hidden_layers * cfg.num_key_value_heads * slot_bytes
        ratio = r.kv_bytes_kept / r.kv_bytes_full
        assert 0.225 <= ratio <= 0.275, f"{name}: achieved {ratio:.4f}"
    # the stored tensors (padding to the batch's longest row and positions included) shrank
    full_stored = (
        len(LENGTHS) * max(LENGTHS) * cfg.num_hidden_layers * cfg.num_key_value_heads * (slot_bytes + 4)
    )
    assert stats.cache_stored_bytes_after_prefill < 0.3 * full_stored
    kept_total = sum(r.kv_bytes_kept for r in results)
    assert stats.cache_stored_bytes_after_prefill >= kept_total
    print(
        f"{name}: ratios {[round(r.kv_bytes_kept / r.kv_bytes_full, 4) for r in results]}, "
        f"stored {stats.cache_stored_bytes_after_prefill / full_stored:.4f} of a full cache"
    )
