"""The generator against transformers' own generate, and the cache's real storage."""

from __future__ import annotations

import pytest
import torch

from pipeline.generate import GenerationConfig, Generator
from pipeline.kv_cache import EMPTY
from policies import Budget, make_policy
from tests.conftest import chat_ids, long_prompt_ids

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea, with waves, gulls and sailing ships at night.",
    "1+1=",
    "List three prime numbers greater than ten and explain briefly why each of them is prime.",
]


def hf_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    return out[:, batch["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_full_policy_is_token_identical_to_transformers_generate(smollm2):
    model, tok = smollm2
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts), "the batch must mix lengths"
    expected = hf_generate(model, tok, prompts, max_new_tokens=20)
    results, _ = Generator(model, tok, make_policy("full"), None).generate(
        prompts, GenerationConfig(max_new_tokens=20)
    )
    assert [r.output_ids for r in results] == expected
    for r, p in zip(results, prompts):
        assert r.prompt_tokens == len(p)
        assert r.kv_bytes_kept == r.kv_bytes_full  # nothing compressed


@pytest.mark.slow
def test_chunked_prefill_matches_one_shot_for_full_cache(smollm2):
    model, tok = smollm2
    prompts = [chat_ids(tok, p) for p in PROMPTS[:3]]
    gen = Generator(model, tok, make_policy("full"), None)
    one_shot, _ = gen.generate(prompts, GenerationConfig(max_new_tokens=12))
    chunked, _ = gen.generate(prompts, GenerationConfig(max_new_tokens=12, prefill_chunk_tokens=16))
    assert [r.output_ids for r in chunked] == [r.output_ids for r in one_shot]


@pytest.mark.slow
def test_streaming_llm_quarter_budget_stores_a_quarter(smollm2):
    model, tok = smollm2
    prompts = [long_prompt_ids(tok, 2048), long_prompt_ids(tok, 1900)]
    gen = Generator(model, tok, make_policy("streaming_llm"), Budget(ratio=0.25))
    results, stats = gen.generate(prompts, GenerationConfig(max_new_tokens=4))
    for r in results:
        assert r.prompt_tokens > 1800
        assert abs(r.kv_bytes_kept / r.kv_bytes_full - 0.25) <= 0.02
    # The real tensors shrank: stored bytes (keys, values, positions; padding included) are
    # about a quarter of what a full cache of the longest prompt would hold for the batch.
    full_batch_bytes = max(r.kv_bytes_full for r in results) * len(results)
    assert stats.cache_stored_bytes_after_prefill < 0.27 * full_batch_bytes


def test_streaming_llm_keeps_sinks_and_recent_window(tiny_llama):
    model, tok = tiny_llama
    policy = make_policy("streaming_llm", sink_tokens=4)
    gen = Generator(model, tok, policy, Budget(tokens=20))
    prompt = list(range(100, 200))
    captured = {}

    original = policy.compress_layer

    def spy(layer, *args):
        original(layer, *args)
        captured.setdefault("positions", layer.positions.clone())

    policy.compress_layer = spy
    gen.generate([prompt], GenerationConfig(max_new_tokens=1))
    kept = captured["positions"][0, 0].tolist()
    assert kept == [0, 1, 2, 3] + list(range(84, 100))


def test_left_padding_slots_are_empty_and_rows_are_independent(tiny_llama):
    model, tok = tiny_llama
    gen = Generator(model, tok, make_policy("full"), None)
    short, long = list(range(300, 310)), list(range(400, 440))
    alone, _ = gen.generate([short], GenerationConfig(max_new_tokens=6))
    together, _ = gen.generate([long, short], GenerationConfig(max_new_tokens=6))
    assert together[1].output_ids == alone[0].output_ids
    assert together[1].kv_bytes_kept == alone[0].kv_bytes_kept


def test_seeded_sampling_is_reproducible_and_stops_at_stop_tokens(tiny_llama):
    model, tok = tiny_llama
    gen = Generator(model, tok, make_policy("full"), None)
    cfg = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    a, _ = gen.generate([[5, 6, 7, 8]], cfg)
    b, _ = gen.generate([[5, 6, 7, 8]], cfg)
    assert a[0].output_ids == b[0].output_ids
    greedy, _ = gen.generate([[5, 6, 7, 8]], GenerationConfig(max_new_tokens=5))
    first = greedy[0].output_ids[0]
    stopped, _ = gen.generate([[5, 6, 7, 8]], GenerationConfig(max_new_tokens=5, stop_token_ids=(first,)))
    assert stopped[0].output_ids == [] and stopped[0].finish_reason == "stop"


def test_compression_physically_shrinks_layers(tiny_llama):
    model, tok = tiny_llama
    policy = make_policy("streaming_llm")
    gen = Generator(model, tok, policy, Budget(ratio=0.25))
    results, stats = gen.generate(
        [list(range(100, 180)), list(range(100, 140))], GenerationConfig(max_new_tokens=1)
    )
    # 80-token row keeps 20 per head, 40-token row keeps 10: slots = 20, the short row has 10 empty
    assert [r.kv_tokens_kept for r in results] == [20, 10]
    layers, kv_heads, head_dim = 4, 2, 16
    slot_bytes = 2 * head_dim * 4 + 4  # fp32 key + value, int32 position
    assert stats.cache_stored_bytes_after_prefill == layers * 2 * kv_heads * 20 * slot_bytes
    assert EMPTY == -1
    assert torch.is_tensor(torch.tensor(0))
