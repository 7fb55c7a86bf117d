"""AdaKV's prefill attention over the ragged store (`RaggedKVLayer.attend_prefill`) against the
exact masked path over the padded dense view (`attend_masked`), and the dense view itself.

On CPU the flash op is replaced by its float32 torch reference (`flash_forward_reference`,
same shapes and empty-sequence rules), which checks the varlen layout, the lower-right causal
tail and the log-sum-exp merge; with CUDA the real flash op runs too (bf16). On the GPU at
scale: `python -m pipeline.bench.check_ragged_prefill`.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.kv_cache import EMPTY, StepContext
from policies import ragged_kernels as rk
from policies.ragged_heads import RaggedKVLayer


def ragged_layer(b, h, d, chunk, earlier=0, max_len=90, seed=0, dtype=torch.float32, device="cpu"):
    """A compressed layer (random segment lengths, one empty, one of `max_len`), then `earlier`
    uncompressed tokens and a prefill chunk of `chunk` tokens appended to its tail."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (b, h), generator=g)
    lens[0, 0] = 0
    lens[-1, -1] = max_len
    n = int(lens.sum())
    layer = RaggedKVLayer()
    layer.spare = 5  # the tail is a strided view of a buffer with spare capacity
    layer.lazy_initialization(torch.empty((b, h, 0, d), dtype=dtype), torch.empty((b, h, 0, d), dtype=dtype))
    layer.flat_keys = torch.randn(n, d, generator=g).to(dtype)
    layer.flat_values = torch.randn(n, d, generator=g).to(dtype)
    layer.flat_positions = torch.cat(
        [torch.randperm(1000, generator=g)[: int(k)].sort().values for k in lens.view(-1)]
    )
    layer.flat_positions = layer.flat_positions.to(torch.int32)
    layer.seg_lens = lens
    layer._index_segments(int(lens.max()))
    start = 1000
    for q in (earlier, chunk):
        if q:
            pos = torch.arange(start, start + q)[None].expand(b, q)
            k = torch.randn(b, h, q, d, generator=g).to(dtype)
            layer.append(k, torch.randn(b, h, q, d, generator=g).to(dtype), pos)
            start += q
    if device != "cpu":
        for name in ("flat_keys", "flat_values", "flat_positions", "seg_lens"):
            setattr(layer, name, getattr(layer, name).to(device))
        layer._index_segments(layer.max_seg)
        for buf in (layer._k, layer._v, layer._p):
            buf.buf = buf.buf.to(device)
    return layer, torch.arange(start - chunk, start)[None].expand(b, chunk).to(device)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("earlier", [0, 7])
def test_prefill_matches_masked_path(group, d, earlier):
    b, h, chunk = 2, 3, 19
    layer, qpos = ragged_layer(b, h, d, chunk, earlier=earlier, seed=group * d + earlier)
    query = torch.randn(b, h * group, chunk, d, generator=torch.Generator().manual_seed(1))
    step = StepContext(cache=None, positions=qpos, padded=False)
    scaling = d**-0.5
    ref = layer.attend_masked(query, step, scaling)
    out = layer.attend_prefill(query, scaling, attn=rk.flash_forward_reference)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the hook's transpose back to [b, q, H, d] needs no copy
    assert out.transpose(1, 2).is_contiguous()


def test_attend_takes_the_masked_path_off_cuda():
    layer, qpos = ragged_layer(1, 2, 64, 5)
    query = torch.randn(1, 8, 5, 64)
    step = StepContext(cache=None, positions=qpos, padded=False)
    torch.testing.assert_close(layer.attend(query, step, 0.125), layer.attend_masked(query, step, 0.125))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash attention)")
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_flash_matches_masked_path_cuda(group, d):
    b, h, chunk = 2, 4, 200
    kw = dict(earlier=30, max_len=700, seed=group + d, device="cuda")
    layer, qpos = ragged_layer(b, h, d, chunk, dtype=torch.bfloat16, **kw)
    exact, _ = ragged_layer(b, h, d, chunk, dtype=torch.float32, **kw)  # the same values, unrounded
    query = torch.randn(b, h * group, chunk, d, device="cuda")
    step = StepContext(cache=None, positions=qpos, padded=False)
    ref = exact.attend_masked(query, step, d**-0.5)
    assert rk.prefill_usable(query.bfloat16())
    out = layer.attend(query.bfloat16(), step, d**-0.5)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2, err


def dense_reference(layer: RaggedKVLayer):
    """The padded dense view built one (row, head) at a time."""
    b, h, t, d = layer.keys.shape
    width = layer.max_seg + t
    keys = torch.zeros((b, h, width, d), dtype=layer.keys.dtype)
    values = torch.zeros_like(keys)
    positions = torch.full((b, h, width), EMPTY, dtype=torch.int32)
    start = 0
    for i, n in enumerate(layer.seg_lens.reshape(-1).tolist()):
        r, hh = divmod(i, h)
        keys[r, hh, :n] = layer.flat_keys[start : start + n]
        values[r, hh, :n] = layer.flat_values[start : start + n]
        positions[r, hh, :n] = layer.flat_positions[start : start + n]
        start += n
    keys[:, :, layer.max_seg :] = layer.keys
    values[:, :, layer.max_seg :] = layer.values
    positions[:, :, layer.max_seg :] = layer.positions
    return keys, values, positions


def test_dense_view_and_store_round_trip():
    layer, _ = ragged_layer(2, 3, 16, 4, earlier=2)
    for got, want in zip(layer.dense(), dense_reference(layer)):
        assert torch.equal(got, want)
    assert torch.equal(layer.dense_positions(), dense_reference(layer)[2])
    keys, values, positions = layer.dense()
    flat_lens = layer.seg_lens + 6
    layer.store_dense(keys, values, positions)
    assert torch.equal(layer.seg_lens, flat_lens)
    assert layer.max_seg == int(flat_lens.max()) and layer.keys.shape[2] == 0
    filled = positions != EMPTY  # the store keeps the filled slots in (row, head, slot) order
    assert torch.equal(layer.flat_keys, keys[filled]) and torch.equal(layer.flat_values, values[filled])
    assert torch.equal(layer.flat_positions, positions[filled])
    assert torch.equal(layer.seg_cu[1:].long(), torch.cumsum(flat_lens.reshape(-1), 0))
