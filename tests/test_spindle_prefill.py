"""SpindleKV prefill: the running sum of kept bytes (one `kept_bytes_per_row` per layer and forward)
allots the deep layers what summing every earlier layer at each layer allotted."""

from __future__ import annotations

import pytest
import torch

from pipeline.generate import Generator
from pipeline.kv_cache import EMPTY, CompressedCache
from policies import Budget, make_policy
from policies import spindlekv as sp
from policies.base import row_budgets

PROMPTS = [list(range(300, 420)), list(range(400, 470))]


@torch.inference_mode()
def _prefill(model, tok, chunk):
    gen = Generator(model, tok, make_policy("spindlekv"), Budget(ratio=0.3), decode_mode="eager")
    cache = CompressedCache(gen.num_layers, gen.policy)
    ids, filled = gen._left_pad(PROMPTS)
    positions = torch.where(filled, filled.long().cumsum(-1) - 1, torch.full_like(ids, EMPTY))
    budgets = row_budgets(gen.budget, [len(p) for p in PROMPTS], gen.device)
    gen.prefill(cache, ids, positions, budgets, chunk, 2, ids.shape[1] - min(map(len, PROMPTS)))
    return cache


def _summed(step, layer_idx):
    return sum(step.cache.layers[j].kept_bytes_per_row() for j in range(layer_idx))


@pytest.mark.parametrize("chunk", [None, 32])
def test_running_spent_equals_the_sum_over_layers(tiny_llama, monkeypatch, chunk):
    model, tok = tiny_llama
    calls = []
    spent_before = sp.SpindleKV._spent_before
    monkeypatch.setattr(
        sp.SpindleKV, "_spent_before", staticmethod(lambda *a: calls.append(a) or spent_before(*a))
    )
    fast = _prefill(model, tok, chunk)
    assert calls
    monkeypatch.setattr(sp.SpindleKV, "_spent_before", staticmethod(_summed))  # every layer sums them
    slow = _prefill(model, tok, chunk)
    for a, b in zip(fast.layers, slow.layers):
        assert a.mode == b.mode
        assert torch.equal(a._n, b._n) and torch.equal(a.kbook_n, b.kbook_n)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys)
    assert torch.equal(fast.kept_bytes_per_row(), slow.kept_bytes_per_row())
