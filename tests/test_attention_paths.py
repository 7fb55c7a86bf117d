"""The attention fast paths (no mask, causal, lower-right causal) equal the masked reference path."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline import decode_kernels as dk
from pipeline.attention_math import CAUSAL, EMPTY, dense_bias, grouped_attention, position_mask
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


# -- the static-shape decode step's attention (pipeline/decode_kernels.py) ---------------------

kernel_test = pytest.mark.skipif(
    not (dk.triton_available() and (torch.cuda.is_available() or dk.interpreting())),
    reason="the Triton kernel runs on CUDA, or under TRITON_INTERPRET=1 (conftest sets it without CUDA)",
)


def _static_inputs(b, h, group, d, cap, last, seed, empty: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, h * group, d, generator=g).to(dtype)
    keys = torch.randn(b, h, cap, d, generator=g).to(dtype)
    values = torch.randn(b, h, cap, d, generator=g).to(dtype)
    keys[:, :, last + 1 :] = float("nan")  # spare capacity holds garbage: it must never be read
    values[:, :, last + 1 :] = float("nan")
    positions = torch.arange(cap, dtype=torch.int32).expand(b, h, cap).contiguous()
    if empty:
        positions[0, :, :7] = EMPTY  # left padding of row 0
        positions[-1, -1, ::3] = EMPTY  # a ragged head
        if b > 1:
            positions[1, 0, : last + 1] = EMPTY  # a (row, head) with nothing at all: zeros
    return query, keys, values, positions if empty else None


def test_static_reference_equals_masked_attention_over_the_used_slots():
    b, h, group, d, cap, last = 3, 2, 3, 16, 40, 29
    q, k, v, pos = _static_inputs(b, h, group, d, cap, last, 0, empty=True)
    ref = dk.static_decode_reference(q, k, v, pos, last, 0.3)
    mask = position_mask(pos[:, :, : last + 1], torch.full((b, 1), last + 1), heads_differ=True)
    dense = grouped_attention(q[:, :, None], k[:, :, : last + 1], v[:, :, : last + 1], mask, 0.3)[:, :, 0]
    has = mask.any(-1)[:, :, 0].repeat_interleave(group, 1)  # (row, head)s with some slot
    torch.testing.assert_close(ref[has], dense[has], rtol=1e-5, atol=1e-5)
    assert torch.all(ref[~has] == 0) and (~has).any()


@pytest.mark.parametrize("empty", [False, True])
def test_static_torch_form_equals_reference(empty):
    b, h, group, d, cap, last = 3, 2, 4, 16, 50, 33
    q, k, v, pos = _static_inputs(b, h, group, d, cap, last, 1, empty)
    out = dk.static_decode_torch(q, k, v, pos, torch.tensor([last]), 0.25)
    ref = dk.static_decode_reference(q, k, v, pos, last, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@kernel_test
@pytest.mark.parametrize(
    "b,h,group,d,cap,last,chunk,empty",
    [
        (2, 2, 4, 16, 300, 257, 128, True),  # several splits, splits past `last` exit at once
        (3, 1, 3, 32, 70, 5, None, True),  # a non-power-of-two group; most capacity spare
        (1, 2, 1, 16, 64, 63, None, False),  # no GQA, full capacity, no position loads
    ],
)
def test_static_kernel_equals_reference(monkeypatch, b, h, group, d, cap, last, chunk, empty):
    monkeypatch.setattr(dk, "CPU_INTERPRET", True)
    q, k, v, pos = _static_inputs(b, h, group, d, cap, last, 2, empty)
    if torch.cuda.is_available():
        q, k, v = q.cuda(), k.cuda(), v.cuda()
        pos = None if pos is None else pos.cuda()
    assert dk.usable(q)
    out = dk.static_decode_attention(q, k, v, pos, torch.tensor([last], device=q.device), 0.2, chunk=chunk)
    ref = dk.static_decode_reference(q, k, v, pos, last, 0.2)
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)


def test_static_append_writes_at_the_device_slot_and_commits_on_the_host():
    layer = KVLayer()
    layer.spare = 4
    layer.append(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.arange(5).expand(2, 5))
    assert layer.static_decode_ready() and layer.slots_used == 5
    k_new, v_new = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    buffer = layer._k.buf
    layer.append_static(k_new, v_new, torch.tensor([[5], [5]], dtype=torch.int32), torch.tensor([5]))
    assert layer.slots_used == 5  # the host count moves only on commit
    layer.commit_static()
    assert layer._k.buf is buffer and layer.slots_used == 6
    torch.testing.assert_close(layer.keys[:, :, 5:], k_new)
    torch.testing.assert_close(layer.values[:, :, 5:], v_new)
    assert layer.positions[:, :, 5].tolist() == [[5, 5], [5, 5]]
    layer.commit_static(3)
    assert not layer.static_decode_ready()  # capacity spent: the dynamic step takes over
