"""The generator against transformers' own generate, and the cache's real storage."""

from __future__ import annotations

import pytest
import torch

from pipeline.generate import GenerationConfig, Generator
from pipeline.kv_cache import EMPTY
from policies import Budget, make_policy
from tests.conftest import chat_ids, long_prompt_ids, prefilled

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


# -- the static-shape decode step (pipeline/decode_graph.py), run eagerly on CPU ----------------

STATIC_PROMPTS = [list(range(300, 340)), list(range(400, 410)), list(range(500, 530))]  # left padding


@pytest.mark.parametrize(
    "policy,budget",
    [
        ("full", None),
        ("streaming_llm", Budget(tokens=24)),
        ("snapkv", Budget(tokens=16)),
        ("adakv", Budget(tokens=16)),  # ragged per-head store: its own static step (kernel only)
    ],
)
@pytest.mark.parametrize("interpret_kernel", [False, True])
def test_static_decode_step_equals_dynamic_step(tiny_llama, monkeypatch, policy, budget, interpret_kernel):
    """Logits of every step and the tokens, with padded rows (EMPTY slots) and a compressed cache."""
    from pipeline import decode_kernels as dk
    from policies import ragged_kernels

    if interpret_kernel or policy == "adakv":
        if not (dk.triton_available() and dk.interpreting()):
            pytest.skip("the Triton kernel runs on CPU under TRITON_INTERPRET=1 only")
        monkeypatch.setattr(dk, "CPU_INTERPRET", True)
        monkeypatch.setattr(ragged_kernels, "CPU_INTERPRET", True)
    if policy == "adakv" and not interpret_kernel:
        pytest.skip("AdaKV's static step has no torch form: the interpreted case covers it")
    model, tok = tiny_llama
    steps = 6
    runs = {}
    for mode in ("eager", "static"):
        gen = Generator(model, tok, make_policy(policy), budget, decode_mode=mode)
        cache, logits, budgets, next_pos = prefilled(gen, STATIC_PROMPTS, steps)
        if policy == "adakv":  # compression dropped the padding: per-head segments of unequal length
            assert cache.layers[0].max_seg > 0 and cache.layers[0].seg_lens.unique().numel() > 1
        else:
            assert cache.layers[0].has_empty  # the padded rows are masked by position
        seen = []
        with torch.inference_mode():
            for _ in range(steps):
                tokens = logits.argmax(-1)
                logits = gen.decode_step(cache, tokens, next_pos, budgets).clone()
                next_pos = next_pos + 1
                seen.append(logits)
        runs[mode] = (torch.stack(seen), cache, gen.decode.counts)
    (dyn, dyn_cache, dyn_counts), (sta, sta_cache, sta_counts) = runs["eager"], runs["static"]
    assert dyn_counts["eager"] == 0 and sta_counts["eager"] == steps  # each took its own path
    torch.testing.assert_close(sta, dyn, rtol=1e-4, atol=1e-4)
    assert torch.equal(sta.argmax(-1), dyn.argmax(-1))
    for a, b in zip(sta_cache.layers, dyn_cache.layers):  # the same slots, written in place
        assert a.get_seq_length() == b.get_seq_length()
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys)


def test_static_decode_generate_matches_eager_when_rows_leave(tiny_llama):
    model, tok = tiny_llama
    eager = Generator(model, tok, make_policy("full"), None, decode_mode="eager")
    static = Generator(model, tok, make_policy("full"), None, decode_mode="static")
    cfg = GenerationConfig(max_new_tokens=10)
    first, _ = eager.generate(STATIC_PROMPTS, cfg)
    stop = first[1].output_ids[3]  # row 1 stops after 3 tokens: the batch shrinks mid-decode
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=(stop,))
    a, _ = eager.generate(STATIC_PROMPTS, cfg)
    b, _ = static.generate(STATIC_PROMPTS, cfg)
    assert [r.output_ids for r in b] == [r.output_ids for r in a]
    reasons = [r.finish_reason for r in a]
    assert [r.finish_reason for r in b] == reasons and "stop" in reasons
    assert static.decode.counts["eager"] > 0


def test_adakv_static_step_goes_on_after_a_row_leaves(tiny_llama, monkeypatch):
    """The ragged layer's row selection keeps its tail's capacity: every step stays static and
    equals the dynamic step (the flat store is rebuilt, so a captured step would be re-made)."""
    from pipeline import decode_kernels as dk
    from policies import ragged_kernels

    if not (dk.triton_available() and dk.interpreting()):
        pytest.skip("the Triton kernel runs on CPU under TRITON_INTERPRET=1 only")
    monkeypatch.setattr(ragged_kernels, "CPU_INTERPRET", True)
    model, tok = tiny_llama
    runs = {}
    for mode in ("eager", "static"):
        gen = Generator(model, tok, make_policy("adakv"), Budget(tokens=16), decode_mode=mode)
        cache, logits, budgets, next_pos = prefilled(gen, STATIC_PROMPTS, 6)
        seen = []
        with torch.inference_mode():
            for step in range(6):
                if step == 3:  # row 1 leaves
                    keep = torch.tensor([0, 2])
                    cache.select_rows(keep)
                    logits, budgets, next_pos = logits[keep], budgets[keep], next_pos[keep]
                tokens = logits.argmax(-1)
                logits = gen.decode_step(cache, tokens, next_pos, budgets).clone()
                next_pos = next_pos + 1
                seen.append(logits)
        runs[mode] = (seen, gen.decode.counts)
    (dyn, dyn_counts), (sta, sta_counts) = runs["eager"], runs["static"]
    assert dyn_counts["eager"] == 0 and sta_counts["eager"] == 6
    for a, b in zip(sta, dyn):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_decode_mode_switch(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    assert Generator(model, tok, make_policy("full"), None).decode.mode == "eager"  # CPU default
    monkeypatch.setenv("KVPIPE_DECODE", "static")
    assert Generator(model, tok, make_policy("full"), None).decode.mode == "static"
    monkeypatch.setenv("KVPIPE_DECODE", "sometimes")
    with pytest.raises(ValueError):
        Generator(model, tok, make_policy("full"), None)
    # a policy that compresses during decode never takes the static step
    monkeypatch.delenv("KVPIPE_DECODE")
    gen = Generator(model, tok, make_policy("h2o"), Budget(tokens=8), decode_mode="static")
    gen.generate([list(range(100, 140))], GenerationConfig(max_new_tokens=4))
    assert gen.decode.counts["eager"] == 0
    # nor do AdaKV's ragged layers and kivi's packed layers where their kernels cannot run (here:
    # CPU without the interpreter opted in; kivi's also: tiny-llama's head_dim 16, which its
    # kernel does not tile; tests/test_kivi_static.py has its static step)
    for name in ("adakv", "kivi"):
        gen = Generator(model, tok, make_policy(name), Budget(ratio=0.5), decode_mode="static")
        gen.generate([list(range(100, 140))], GenerationConfig(max_new_tokens=3))
        assert gen.decode.counts["eager"] == 0, name
