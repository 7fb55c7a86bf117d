"""The memory-aware batch planner's arithmetic (pipeline/planner.py), on built shapes."""

from __future__ import annotations

import math

import pytest

from pipeline.planner import MemoryModel, Planner, cache_ratio, fixed_batches, length_bucket
from policies import Budget, make_policy

# Llama-3.1-8B-like shapes in bfloat16: 32 layers, 8 kv heads, 32 query heads, head_dim 128
LLAMA8B = MemoryModel(
    num_layers=32,
    kv_heads=8,
    q_heads=32,
    head_dim=128,
    hidden=4096,
    intermediate=14336,
    vocab=128256,
    dtype_bytes=2,
)
GiB = 1 << 30


def test_full_cache_bytes_per_token():
    # 32 layers * 8 heads * (2 * 128 * 2 bytes + a 4-byte position) = 132 KiB per token
    assert LLAMA8B.kv_bytes_per_token() == 32 * 8 * (512 + 4) == 132096
    # 32K tokens of one row: about 4 GiB, as the README says
    assert LLAMA8B.cache_bytes(32768, 1.0, 0) / GiB == pytest.approx(4.03, abs=0.01)


def test_tensor_parallel_divides_the_heads():
    class Config:
        num_hidden_layers, num_attention_heads, num_key_value_heads = 32, 32, 8
        hidden_size, intermediate_size, vocab_size, head_dim = 4096, 14336, 128256, 128

    tp2 = MemoryModel.from_config(Config, dtype_bytes=2, tensor_parallel=2)
    assert (tp2.kv_heads, tp2.q_heads, tp2.intermediate) == (4, 16, 7168)
    assert tp2.kv_bytes_per_token() * 2 == LLAMA8B.kv_bytes_per_token()


def test_cache_and_prefill_formulas_by_hand():
    m = MemoryModel(
        num_layers=2, kv_heads=2, q_heads=4, head_dim=8, hidden=32, intermediate=64, vocab=100, dtype_bytes=4
    )
    f = 2 * 2 * (2 * 8 * 4 + 4)  # 272 bytes per token
    assert m.kv_bytes_per_token() == f
    assert m.cache_bytes(100, 0.25, 10) == f * (25 + 10)
    n = 100
    layer_kv = 2 * n * (2 * 8 * 4 + 4)
    acts = n * (4 * 8 + 4 * 32 + 3 * 64) * 4
    mask = n * n * (4 + 4)
    signals = 4 * 100 * n * 4 * 2
    logits = 100 * 4 * 2
    assert m.prefill_peak_bytes(n) == layer_kv + acts + mask + signals + logits
    # chunked prefill: q = chunk, the layer holds the kept tokens + the chunk
    q, slots = 16, 25 + 16
    chunked = 2 * slots * 68 + q * (4 * 8 + 4 * 32 + 3 * 64) * 4 + q * slots * 8 + 4 * 16 * slots * 8 + 800
    assert m.prefill_peak_bytes(n, chunk=16, kept=25) == chunked


def test_compression_turns_into_bigger_batches():
    n, new = 32768, 64
    full = Planner(LLAMA8B, make_policy("full"), None, new_tokens=new, max_batch_size=1024)
    quarter = Planner(LLAMA8B, make_policy("snapkv"), Budget(ratio=0.25), new_tokens=new, max_batch_size=1024)
    budget = 60 * GiB
    b_full, b_quarter = full.batch_size(n, budget), quarter.batch_size(n, budget)
    assert b_full == math.floor(budget / (LLAMA8B.cache_bytes(n, 1.0, new) + LLAMA8B.prefill_peak_bytes(n)))
    assert b_quarter == math.floor(
        budget / (LLAMA8B.cache_bytes(n, 0.25, new) + LLAMA8B.prefill_peak_bytes(n, None, n // 4))
    )
    assert b_quarter > b_full >= 1
    # chunked prefill bounds the quadratic mask term: bigger batches still
    chunked = Planner(LLAMA8B, make_policy("snapkv"), Budget(ratio=0.25), new_tokens=new, prefill_chunk=4096)
    assert chunked.batch_size(n, budget) > b_quarter


def test_storage_forms_report_their_byte_ratio():
    n = 2048
    assert cache_ratio(make_policy("full"), None, n, 2, 128) == 1.0
    assert cache_ratio(make_policy("snapkv"), Budget(ratio=0.25), n, 2, 128) == 0.25
    kivi = make_policy("kivi")
    assert cache_ratio(kivi, Budget(ratio=1.0), n, 2, 64) == pytest.approx(kivi.target_ratio(n, 2, 64))
    composed = cache_ratio(make_policy("snapkv+kivi"), Budget(ratio=0.25), n, 2, 64)
    assert composed < 0.25 * 0.5  # the evictor's quarter, stored at about 2 bits


def test_caps_and_floor():
    p = Planner(LLAMA8B, make_policy("full"), None, new_tokens=16, max_batch_size=8, max_batch_tokens=10_000)
    assert p.batch_size(100, 1e15) == 8  # max_batch_size
    assert p.batch_size(2000, 1e15) == 5  # max_batch_tokens // n
    assert p.batch_size(32768, 1.0) == 1  # never below one row: the OOM split-retry has the last word


def test_plan_is_greedy_within_power_of_two_buckets():
    assert [length_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 1024, 1025)] == [0, 1, 2, 2, 3, 3, 4, 10, 11]
    p = Planner(LLAMA8B, make_policy("full"), None, new_tokens=0, max_batch_size=3)
    lengths = [10, 11, 12, 13, 14, 20, 40, 60]
    assert p.plan(lengths, 1e15) == [[0, 1, 2], [3, 4], [5], [6, 7]]
    # a tight memory budget: one row per batch
    assert p.plan(lengths, 1.0) == [[i] for i in range(len(lengths))]


def test_fixed_batches_on_cpu():
    assert fixed_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert fixed_batches(0, 3) == []
