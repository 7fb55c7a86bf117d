"""Batched == unbatched for every eviction policy (tiny Llama, greedy, fp32, CPU).

Each policy's `compress_layer` is wrapped to record, after every call, the absolute positions
every (row, kv head) keeps. Positions are absolute, so a row's kept sets in a left-padded
batch compare directly with the same row generated alone; outputs must match too.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.generate import GenerationConfig, Generator
from pipeline.kv_cache import EMPTY
from policies import Budget, make_policy
from policies.ragged_heads import RaggedKVLayer

POLICIES = ["snapkv", "pyramidkv", "h2o", "tova", "knorm", "adakv"]
LENGTHS = [173, 96, 131, 40]


def recording(policy):
    """Wrap `policy.compress_layer`; return the list it appends (layer_idx, kept sets per row/head) to."""
    calls = []
    inner = policy.compress_layer

    def compress_layer(layer, queries, step, layer_idx, num_layers, scaling):
        inner(layer, queries, step, layer_idx, num_layers, scaling)
        pos = layer.kept_positions() if isinstance(layer, RaggedKVLayer) else layer.positions
        sets = [[frozenset(p for p in head.tolist() if p != EMPTY) for head in row] for row in pos]
        calls.append((layer_idx, sets))

    policy.compress_layer = compress_layer
    return calls


def run(model, tok, name, prompts, budget, new_tokens, **params):
    policy = make_policy(name, **params)
    calls = recording(policy)
    results, _ = Generator(model, tok, policy, budget).generate(
        prompts, GenerationConfig(max_new_tokens=new_tokens)
    )
    return results, calls


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("budget", [Budget(ratio=0.25), Budget(tokens=48)], ids=["ratio", "tokens"])
def test_batched_equals_unbatched(tiny_llama, name, budget):
    model, tok = tiny_llama
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in LENGTHS]
    params = {"window": 8} if name in ("snapkv", "pyramidkv", "adakv") else {}
    new_tokens = 8 if name in ("h2o", "tova") else 4  # these compress at every decode step too
    batched, batch_calls = run(model, tok, name, prompts, budget, new_tokens, **params)
    assert batch_calls, "the policy was never called"
    compared = 0
    for i, prompt in enumerate(prompts):
        alone, alone_calls = run(model, tok, name, [prompt], budget, new_tokens, **params)
        assert alone[0].output_ids == batched[i].output_ids
        assert alone[0].kv_tokens_kept == batched[i].kv_tokens_kept
        assert alone[0].kv_bytes_kept == batched[i].kv_bytes_kept
        assert len(alone_calls) == len(batch_calls)
        for (layer_b, sets_b), (layer_a, sets_a) in zip(batch_calls, alone_calls):
            assert layer_a == layer_b
            assert sets_b[i] == sets_a[0], f"row {i}, layer {layer_a}: kept sets differ"
            compared += len(sets_a[0])
    assert compared > 0


@pytest.mark.parametrize("name", POLICIES)
def test_chunked_prefill_keeps_the_budget(tiny_llama, name):
    """Compressing after every 64-token chunk still ends at the budget (pyramid: summed over layers)."""
    model, tok = tiny_llama
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (300, 211, 90)]
    results, _ = Generator(model, tok, make_policy(name), Budget(ratio=0.25)).generate(
        prompts, GenerationConfig(max_new_tokens=2, prefill_chunk_tokens=64)
    )
    for r in results:
        expected = -(-r.prompt_tokens // 4)  # ceil(0.25 n) tokens per (layer, head)
        assert r.kv_tokens_kept == expected * r.kv_tokens_full // r.prompt_tokens
