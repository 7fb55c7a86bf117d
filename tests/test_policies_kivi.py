"""KIVI: packing, quantisation error, grouping axes, residual window, bytes, batching, composition."""

from __future__ import annotations

import pytest
import torch

from pipeline.generate import GenerationConfig, Generator
from pipeline.kv_cache import EMPTY
from policies import Budget, describe, make_policy
from policies.compose import ComposedPolicy
from policies.kivi import QuantizedKVLayer, dequantize_groups, kivi_bytes, pack, quantize_groups, unpack


def _fill(layer, keys, values, positions=None):
    b, _, n, _ = keys.shape
    if positions is None:
        positions = torch.arange(n)[None].expand(b, n)
    layer.append(keys, values, positions)
    layer.flush()
    return layer


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_round_trip_and_packed_size(bits):
    q = torch.randint(0, 2**bits, (3, 5, 64))
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits).long(), q)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantise_error_within_half_a_step(bits):
    torch.manual_seed(0)
    x = torch.randn(100, 32) * torch.rand(100, 1) * 5
    packed, scale, zero = quantize_groups(x, bits, torch.float32)
    y = dequantize_groups(packed, scale, zero, bits, torch.float32)
    step = (x.amax(-1) - x.amin(-1)) / (2**bits - 1)
    assert torch.allclose(scale, step)
    assert ((x - y).abs() <= step[:, None] / 2 + 1e-5).all()
    # the extremes of each group are exact (they are 0 and the top level)
    assert torch.allclose(y.amin(-1), x.amin(-1), atol=1e-5)


def test_four_bits_beat_two_bits():
    torch.manual_seed(1)
    x = torch.randn(64, 32)
    errs = []
    for bits in (2, 4):
        y = dequantize_groups(*quantize_groups(x, bits, torch.float32), bits, torch.float32)
        errs.append((x - y).abs().mean().item())
    assert errs[1] < errs[0] / 3


def test_keys_per_channel_values_per_token():
    # constant along tokens, different per channel: per-channel (keys) exact, per-token (values) not
    n, d = 64, 64
    by_channel = (torch.arange(d).float() * 10)[None, None, None, :].expand(1, 1, n, d).contiguous()
    layer = _fill(QuantizedKVLayer(2, 32, 0), by_channel, by_channel)
    assert torch.equal(layer.keys, by_channel)
    assert (layer.values - by_channel).abs().max() > 10
    # constant along channels, different per token: per-token (values) exact, per-channel (keys) not
    by_token = (torch.arange(n).float() * 10)[None, None, :, None].expand(1, 1, n, d).contiguous()
    layer = _fill(QuantizedKVLayer(2, 32, 0), by_token, by_token)
    assert torch.equal(layer.values, by_token)
    assert (layer.keys - by_token).abs().max() > 10


def test_exact_bytes_and_storage_dtypes():
    torch.manual_seed(0)
    n, d = 256, 64
    k, v = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    layer = _fill(QuantizedKVLayer(2, 32, 128), k, v)
    # keys: 256 quantised = 8 groups x 64 channels x (8 payload bytes + fp32 scale + fp32 zero)
    keys = 256 * 64 * 2 // 8 + 8 * 64 * 2 * 4
    # values: 128 quantised (16 payload bytes + 2 groups x 2 x 4 bytes each) + 128 fp32 residual
    values = 128 * (64 * 2 // 8 + 2 * 2 * 4) + 128 * 64 * 4
    assert keys == 8192 and values == 2048 + 2048 + 32768
    assert layer.kept_bytes_per_row().tolist() == [2 * (keys + values)]
    assert kivi_bytes(n, d, 2, 32, 128, 4) == (keys, values)
    assert layer._kq.dtype == torch.uint8 and layer._kq.shape == (1, 2, 8, 64, 8)
    assert layer._vq.dtype == torch.uint8 and layer._vq.shape == (1, 2, 128, 16)
    assert layer._kscale.dtype == torch.float32 and layer._kres.dtype == torch.float32
    # every key quantised, the newest 128 values in the (ring) residual
    assert (layer._n - layer._nk).tolist() == [[0, 0]] and (layer._n - layer._nv).tolist() == [[128, 128]]
    full = 2 * n * d * 4 * 2
    assert layer.kept_bytes_per_row().item() / full == pytest.approx(
        make_policy("kivi", bits=2).target_ratio(n, dtype_bytes=4, head_dim=d)
    )


def test_residual_window_one_token_at_a_time():
    torch.manual_seed(0)
    d, r = 32, 64
    layer = QuantizedKVLayer(4, 32, r)
    ks, vs = torch.randn(1, 1, 200, d), torch.randn(1, 1, 200, d)
    for t in range(200):
        layer.append(ks[:, :, t : t + 1], vs[:, :, t : t + 1], torch.tensor([[t]]))
        n = t + 1
        # quantisation happens for earlier tokens when the next one arrives (or at flush)
        assert layer._n.item() == n
        seen_before = n - 1
        assert layer._nk.item() == (seen_before // r) * r
        assert layer._nv.item() == max(0, seen_before - r) // 32 * 32  # whole groups of G = 32
        keys = layer.keys
        nk = layer._nk.item()
        assert torch.equal(keys[:, :, nk:n], ks[:, :, nk:n])  # key residual is full precision
        nv = layer._nv.item()
        assert n - nv >= min(n, r)  # at least the newest `r` values are in full precision
        assert n - nv <= r + 32  # and fewer than r + G once the next token arrives
        assert torch.equal(layer.values[:, :, nv:n], vs[:, :, nv:n])
        assert torch.equal(layer.positions[0, 0], torch.arange(n, dtype=torch.int32))
    layer.flush()
    assert layer._nk.item() == 192 and layer._nv.item() == (200 - r) // 32 * 32


def test_left_padding_is_not_stored_and_rows_match_alone():
    torch.manual_seed(0)
    d = 32
    k, v = torch.randn(1, 2, 100, d), torch.randn(1, 2, 100, d)
    alone = _fill(QuantizedKVLayer(2, 32, 32), k, v)
    # the same row behind 37 padding tokens, in a batch with a longer row
    pad = 37
    kb = torch.cat([torch.randn(1, 2, pad, d) * 100, k], dim=2)
    vb = torch.cat([torch.randn(1, 2, pad, d) * 100, v], dim=2)
    other_k, other_v = torch.randn(1, 2, 137, d), torch.randn(1, 2, 137, d)
    pos = torch.stack([torch.cat([torch.full((pad,), EMPTY), torch.arange(100)]), torch.arange(137)])
    batched = _fill(QuantizedKVLayer(2, 32, 32), torch.cat([kb, other_k]), torch.cat([vb, other_v]), pos)
    assert batched.kept_bytes_per_row()[0] == alone.kept_bytes_per_row()[0]
    assert torch.equal(batched.keys[0, :, :100], alone.keys[0])
    assert torch.equal(batched.values[0, :, :100], alone.values[0])
    assert (batched.positions[0, :, 100:] == EMPTY).all()
    mask = batched.attention_mask(torch.tensor([[100], [137]]))
    assert not mask[0, :, 0, 100:].any() and mask[0, :, 0, :100].all()


def test_keep_on_quantised_storage_requantises_kept_tokens():
    torch.manual_seed(0)
    k, v = torch.randn(1, 1, 128, 32), torch.randn(1, 1, 128, 32)
    layer = _fill(QuantizedKVLayer(4, 32, 32), k, v)
    before = layer.keys
    index = torch.arange(0, 128, 2)[None, None]
    layer.keep(index, torch.ones_like(index, dtype=torch.bool))
    assert layer._n.item() == 64 and layer._nk.item() == 0  # everything back in the residual
    assert torch.equal(layer.keys, before[:, :, ::2])
    layer.flush()
    assert layer._nk.item() == 64 and layer._nv.item() == 32
    assert torch.equal(layer.positions[0, 0], torch.arange(0, 128, 2, dtype=torch.int32))


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (240, 130, 190)]


@pytest.mark.parametrize(
    "name,params", [("kivi", {"bits": 2}), ("kivi", {"bits": 4}), ("snapkv+kivi", {"kivi.residual": 32})]
)
def test_batched_equals_unbatched_and_ratio_on_target(tiny_llama, name, params):
    model, tok = tiny_llama
    policy = make_policy(name, **params)
    budget = Budget(ratio=0.25)
    gen = Generator(model, tok, policy, budget)
    cfg = GenerationConfig(max_new_tokens=4)
    prompts = _prompts()
    batched, _ = gen.generate(prompts, cfg)
    d = model.config.head_dim
    for p, row in zip(prompts, batched):
        alone, _ = gen.generate([p], cfg)
        assert row.output_ids == alone[0].output_ids
        assert row.kv_bytes_kept == alone[0].kv_bytes_kept
        if isinstance(policy, ComposedPolicy):
            target = policy.target_ratio(len(p), budget, dtype_bytes=4, head_dim=d)
        else:
            target = policy.target_ratio(len(p), dtype_bytes=4, head_dim=d)
        assert row.kv_bytes_kept / row.kv_bytes_full == pytest.approx(target, rel=1e-9)


def test_composition_routes_parameters():
    p = make_policy("snapkv+kivi", **{"kivi.bits": 4, "snapkv.window": 8})
    assert p.storage.params.bits == 4 and p.evictor.params.window == 8
    p = make_policy("snapkv+kivi", kivi={"group_size": 16, "residual": 32}, kernel=5)
    assert p.storage.params.group_size == 16 and p.evictor.params.kernel == 5
    p = make_policy("streaming_llm+kivi", bits=4, sink_tokens=2)
    assert p.name == "streaming_llm+kivi" and p.storage.params.bits == 4
    with pytest.raises(ValueError, match="no component"):
        make_policy("snapkv+kivi", nonsense=1)
    with pytest.raises(ValueError, match="not an eviction policy"):
        make_policy("kivi+snapkv")
    with pytest.raises(ValueError, match="not a storage form"):
        make_policy("snapkv+h2o")
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope+kivi")
    with pytest.raises(ValueError):
        make_policy("kivi", bits=3)
    names = {row["name"] for row in describe()}
    assert {"kivi", "spindlekv", "snapkv+kivi", "streaming_llm+kivi", "h2o+kivi"} <= names
    row = next(r for r in describe() if r["name"] == "snapkv+kivi")
    assert row["params"]["kivi"]["bits"] == 2 and "window" in row["params"]["snapkv"]


def _dense_layer_and_reference(bits, residual, chunks, d=32, h=2, group=2, seed=0):
    """Chunked prefill of two rows of equal length: attention of every chunk through the layer's
    dense path (no mask) and through the masked reference path over the same storage."""
    from pipeline.kv_cache import KVLayer, StepContext

    torch.manual_seed(seed)
    b = 2
    layer = QuantizedKVLayer(bits, 32, residual)
    lo = 0
    for q in chunks:
        k, v = torch.randn(b, h, q, d), torch.randn(b, h, q, d)
        pos = torch.arange(lo, lo + q)[None].expand(b, q)
        step = StepContext(cache=None, positions=pos, padded=False)
        layer.append(k, v, pos)
        layer.note_padding(False)
        query = torch.randn(b, h * group, q, d)
        dense = layer.attend(query, step, d**-0.5)
        reference = KVLayer.attend(layer, query, step, d**-0.5)
        yield layer, lo, dense, reference
        layer.flush()
        lo += q


@pytest.mark.parametrize("bits,residual", [(2, 128), (4, 32), (2, 0)])
def test_prefill_attends_without_a_mask_and_matches_the_masked_path(bits, residual, monkeypatch):
    from pipeline import kv_cache

    seen = []
    real = kv_cache.position_mask
    monkeypatch.setattr(kv_cache, "position_mask", lambda *a: seen.append(1) or real(*a))
    for layer, lo, dense, reference in _dense_layer_and_reference(bits, residual, [100, 64, 37, 160]):
        assert torch.allclose(dense, reference, atol=1e-5), lo
        assert len(seen) == 1  # only the reference path built a mask
        seen.clear()
        if lo == 0:  # a first forward attends over its own tokens: a view of the residual ring
            assert layer._dense(100, 0, 0)[0].data_ptr() == layer._kring.data_ptr()
    assert layer._nk.min() > 0 and layer._nv.min() > 0


def test_padded_or_ragged_forwards_keep_the_masked_path():
    from pipeline.kv_cache import StepContext

    torch.manual_seed(0)
    layer = QuantizedKVLayer(2, 32, 32)
    pos = torch.stack([torch.cat([torch.full((5,), EMPTY), torch.arange(35)]), torch.arange(40)])
    layer.append(torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32), pos)
    layer.note_padding(True)
    assert layer._uniform() is None  # rows of 35 and 40 tokens
    step = StepContext(cache=None, positions=torch.tensor([[35, 36], [40, 41]]), padded=False)
    layer.append(torch.randn(2, 2, 2, 32), torch.randn(2, 2, 2, 32), step.positions)
    layer.note_padding(False)
    assert layer._uniform() is None
    out = layer.attend(torch.randn(2, 4, 2, 32), step, 0.2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bits,residual", [(2, 32), (4, 0)])
def test_uniform_decode_steps_store_what_the_general_path_stores(bits, residual):
    """Equal counts everywhere: decode appends and flushes at host-known slots, and the storage
    equals the general (index tensor) path's, bit for bit, with no device read-back."""
    torch.manual_seed(0)
    b, h, d = 2, 2, 64
    fast, slow = QuantizedKVLayer(bits, 32, residual), QuantizedKVLayer(bits, 32, residual)
    slow._uniform = lambda: None
    k, v = torch.randn(b, h, 50, d), torch.randn(b, h, 50, d)
    pos = torch.arange(50)[None].expand(b, 50)
    for layer in (fast, slow):
        layer.append(k, v, pos)
        layer.note_padding(False)
        layer.flush()
    for t in range(50, 150):
        k, v = torch.randn(b, h, 1, d), torch.randn(b, h, 1, d)
        for layer in (fast, slow):
            layer.append(k, v, torch.full((b, 1), t))
            layer.note_padding(False)
        assert fast._pending is None and fast._uni[0] == t + 1
    for layer in (fast, slow):
        layer.flush()
    assert fast._uni == (150, fast._nk[0, 0].item(), fast._nv[0, 0].item())
    for name in ("_n", "_nk", "_nv", "_hn", "_hnk", "_hnv", "_kq", "_kscale", "_kzero", "_vq", "_vscale"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert torch.equal(fast.keys, slow.keys) and torch.equal(fast.values, slow.values)
    assert torch.equal(fast.positions, slow.positions)
    assert torch.equal(fast.kept_bytes_per_row(), slow.kept_bytes_per_row())


def _live(layer: QuantizedKVLayer) -> dict:
    """What a uniform layer stores, live parts only: counts, positions, the packed store, scales and
    zero points, and every token's key and value (de-quantised or residual, the reference view)."""
    out = {name: getattr(layer, name) for name in ("_n", "_nk", "_nv", "_kq", "_kscale", "_kzero")}
    out.update({name: getattr(layer, name) for name in ("_vq", "_vscale", "_vzero", "_pos")})
    out.update(keys=layer.keys, values=layer.values)
    return out


def _assert_same(a: dict, b: dict) -> None:
    for name, x in a.items():
        assert x.shape == b[name].shape and torch.equal(x, b[name]), name


@pytest.mark.parametrize(
    "bits,residual,chunks,compress",
    [
        (2, 128, [100, 64, 37, 160, 300], [True] * 5),
        (4, 32, [100, 64, 37, 160, 70], [True, False, True, False, True]),  # rings that wrap
        (2, 0, [33, 64, 100, 5], [False, True, True, True]),
    ],
)
def test_chunks_stored_by_slices_equal_the_index_path(bits, residual, chunks, compress):
    """A chunked prefill through `append_step` (host-known slices; the wide ring of a compressing
    forward, attended in place) stores exactly what `append` + `note_padding` store (the index-tensor
    path, also with the uniform paths switched off) and attends exactly as the dense path did before
    (SDPA over the reference de-quantised view), chunk after chunk."""
    from pipeline.attention_math import dense_bias, grouped_attention
    from pipeline.kv_cache import StepContext

    torch.manual_seed(0)
    b, h, d, group = 2, 2, 64, 3
    fast, slow, index = (QuantizedKVLayer(bits, 32, residual) for _ in range(3))
    index._uniform = lambda: None
    lo = 0
    for q, comp in zip(chunks, compress):
        k, v = torch.randn(b, h, q, d), torch.randn(b, h, q, d) * 2
        pos = torch.arange(lo, lo + q)[None].expand(b, q)
        step = StepContext(cache=None, positions=pos, padded=False, compress=comp)
        query = torch.randn(b, h * group, q, d)
        fast.append_step(k, v, step)
        for layer in (slow, index):
            layer.append(k, v, pos)
            layer.note_padding(False)
        assert fast._uni == slow._uniform() and fast._pending is None
        out = fast.attend(query, step, d**-0.5)
        if comp:  # the compressing forward's rings hold every token at its own index
            assert fast._kring.shape[2] - 1 >= lo + q and fast._vring.shape[2] - 1 >= lo + q
        assert torch.equal(out, slow.attend(query, step, d**-0.5))
        expected = grouped_attention(query, slow.keys, slow.values, dense_bias(q, lo + q), d**-0.5)
        assert torch.equal(out, expected)
        if comp:
            for layer in (fast, slow, index):
                layer.flush()
            for which in ("k", "v"):  # back to what decoding needs
                ring = getattr(fast, f"_{which}ring")
                assert ring.shape == getattr(slow, f"_{which}ring").shape
        _assert_same(_live(fast), _live(slow))
        _assert_same(_live(fast), _live(index))
        lo += q
    assert fast._nk.min() > 0 and fast._nv.min() > 0
    assert torch.equal(fast._hn, fast._n) and torch.equal(fast._hnk, fast._nk)


@pytest.mark.parametrize("chunk", [48, 100])
@pytest.mark.parametrize("lengths", [(240, 240), (240, 130, 190)])
def test_chunked_prefill_equals_the_append_route(tiny_llama, chunk, lengths, monkeypatch):
    """The engine's chunked prefill stores and computes exactly what it did through `append` +
    `note_padding` for every forward (same logits, same stored tensors, same tokens generated),
    padded batches included."""
    from pipeline.kv_cache import EMPTY, CompressedCache, KVLayer
    from policies.base import row_budgets

    model, tok = tiny_llama
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in lengths]
    cfg = GenerationConfig(max_new_tokens=3, prefill_chunk_tokens=chunk)
    runs = []
    for route in ("step", "append"):
        if route == "append":
            monkeypatch.setattr(QuantizedKVLayer, "append_step", KVLayer.append_step)
        gen = Generator(model, tok, make_policy("kivi", residual=32), Budget(ratio=0.25), decode_mode="eager")
        cache = CompressedCache(gen.num_layers, gen.policy)
        ids, filled = gen._left_pad(prompts)
        positions = torch.where(filled, filled.long().cumsum(-1) - 1, torch.full_like(ids, EMPTY))
        budgets = row_budgets(gen.budget, list(lengths), gen.device)
        with torch.inference_mode():
            logits = gen.prefill(
                cache, ids, positions, budgets, chunk, 2, ids.shape[1] - min(lengths), list(lengths)
            )
        rows, _ = gen.generate(prompts, cfg)
        runs.append((cache, logits, [r.output_ids for r in rows]))
    (fast, fast_logits, fast_ids), (slow, slow_logits, slow_ids) = runs
    assert torch.equal(fast_logits, slow_logits) and fast_ids == slow_ids
    for a, b in zip(fast.layers, slow.layers):
        _assert_same(_live(a), _live(b))
        assert a.stored_bytes() == b.stored_bytes()


def test_chunked_prefill_sizes_the_store_once(tiny_llama, monkeypatch):
    """kivi keeps every token: the engine sizes its store once for the prompt and the decode tokens
    (as for a full cache), so no chunk reallocates it and `reserve` after the prefill keeps it;
    composed after an evictor it grows chunk by chunk (the evictor keeps less than the prompt)."""
    model, tok = tiny_llama
    prompt = torch.randint(3, 1000, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    grown = []
    real = QuantizedKVLayer._grow

    def grow(layer, name, need, top, fill=0):
        before = getattr(layer, name)
        real(layer, name, need, top, fill)
        if getattr(layer, name) is not before:
            grown.append((id(layer), name))

    monkeypatch.setattr(QuantizedKVLayer, "_grow", grow)
    cfg = GenerationConfig(max_new_tokens=4, prefill_chunk_tokens=64)
    for name, once in (("kivi", True), ("snapkv+kivi", False)):
        grown.clear()
        gen = Generator(model, tok, make_policy(name, residual=32), Budget(ratio=0.5))
        gen.generate([prompt], cfg)
        per_buffer = max(grown.count(x) for x in set(grown))
        assert (per_buffer == 1) == once, (name, per_buffer)
