"""The attention fast paths (no mask, causal, lower-right causal) equal the masked reference path."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.attention_math import CAUSAL, dense_bias, grouped_attention, position_mask
from pipeline.kv_cache import KVLayer, SlotBuffer, StepContext


def _layer(b, h, s, d, per_head_positions: bool, gen) -> KVLayer:
    layer = KVLayer()
    layer.lazy_initialization(torch.zeros(b, h, 0, d), torch.zeros(b, h, 0, d))
    keys, values = torch.randn(b, h, s, d, generator=gen), torch.randn(b, h, s, d, generator=gen)
    if per_head_positions:  # each head kept a different, increasing subset of 2*s positions
        pos = torch.stack([torch.randperm(2 * s, generator=gen)[:s].sort().values for _ in range(b * h)])
        pos = pos.reshape(b, h, s)
    else:
        pos = torch.arange(s).expand(b, h, s)
    layer.keys, layer.values, layer.positions = keys, values, pos.to(torch.int32).contiguous()
    layer.heads_differ = per_head_positions
    return layer


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("q_len", [1, 5, 12])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_fast_path_equals_masked_path(per_head, q_len, heads, kv_heads):
    gen = torch.Generator().manual_seed(q_len * 10 + heads)
    b, s_old, d = 2, 12, 16
    layer = _layer(b, kv_heads, s_old if q_len < 12 else 0, d, per_head, gen)
    newest = int(layer.positions.max()) + 1 if layer.positions.numel() else 0
    new_pos = torch.arange(newest, newest + q_len).expand(b, q_len)
    layer.append(
        torch.randn(b, kv_heads, q_len, d, generator=gen), torch.randn(b, kv_heads, q_len, d), new_pos
    )
    query = torch.randn(b, heads, q_len, d, generator=gen)
    step = StepContext(cache=None, positions=new_pos, padded=False)
    fast = layer.attend(query, step, 0.25)
    mask = position_mask(layer.positions, new_pos, heads_differ=True)
    reference = grouped_attention(query, layer.keys, layer.values, mask, 0.25)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_dense_bias_forms():
    assert dense_bias(1, 100) is None
    assert dense_bias(7, 7) is CAUSAL
    lower_right = dense_bias(3, 10)
    assert lower_right.seq_len_q == 3 and lower_right.seq_len_kv == 10


def test_appends_write_in_place_within_capacity_and_copies_are_independent():
    layer = KVLayer()
    layer.spare = 8
    layer.append(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.arange(4)[None])
    buffer = layer._k.buf
    assert layer._k.capacity == 12 and layer.get_seq_length() == 4
    for t in range(4, 12):  # decode steps: no reallocation while the spare lasts
        layer.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.tensor([[t]]))
    assert layer._k.buf is buffer and layer.get_seq_length() == 12
    assert layer.positions[0, 0].tolist() == list(range(12))
    twin = copy.copy(layer)
    twin.select_rows(torch.tensor([0, 0]))  # the copy grows to two rows; the original does not change
    assert twin.keys.shape[0] == 2 and layer.keys.shape[0] == 1 and layer._k.buf is buffer
    layer.reserve(3)
    assert layer._k.capacity == 15 and torch.equal(layer.keys, twin.keys[:1])


def test_slot_buffer_set_with_spare_copies_into_a_larger_buffer():
    t = torch.arange(6.0).reshape(1, 1, 6, 1)
    buf = SlotBuffer(t, spare=2)
    assert buf.capacity == 8 and torch.equal(buf.view, t)
    assert buf.stored_bytes() == 8 * t.element_size()
