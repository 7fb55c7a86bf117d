"""SpindleKV: codebook merging, RoPE round trip, unfolded eviction storage, bytes, batching."""

from __future__ import annotations

import pytest
import torch

from pipeline.generate import GenerationConfig, Generator
from policies import Budget, make_policy
from policies.spindlekv import SpindleLayer, build_codebook, rope


def test_codebook_merges_identical_and_near_identical_keeps_distinct():
    torch.manual_seed(0)
    a, b, c = torch.eye(8)[0], torch.eye(8)[1], torch.eye(8)[2]  # orthogonal directions
    near_a = a + 0.01 * torch.eye(8)[3]  # cos ~ 0.99995 with a
    x = torch.stack([a * 2, b, a * 3, near_a * 5, c, b * 0.5, a])
    book, index, mag = build_codebook(x, 0.98)
    assert book.shape[0] == 3  # {a, 3a, near a, a}, {b, b/2}, {c}
    assert index[0] == index[2] == index[3] == index[6] == 0  # a's cluster is the largest: entry 0
    assert index[1] == index[5] and index[1] != index[4] and index[4] != 0
    assert torch.allclose(mag, x.norm(dim=-1))
    recon = book[index] * mag[:, None]
    assert torch.allclose(recon[[0, 1, 2, 4, 5, 6]], x[[0, 1, 2, 4, 5, 6]], atol=1e-6)
    assert (recon[3] - x[3]).norm() < 0.06  # the near-identical token takes a's direction
    # a threshold above the near-identical similarity keeps it apart
    book, index, _ = build_codebook(x, 0.999999)
    assert book.shape[0] == 4 and index[3] != index[0]


def test_rope_inverse_round_trip():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 16)
    pos = torch.arange(10).expand(2, 3, 10) * 7
    y = rope(x, pos, 10000.0)
    assert not torch.allclose(x, y)
    assert torch.allclose(rope(y, pos, 10000.0, inverse=True), x, atol=1e-5)


def test_codebook_layer_stores_books_indices_magnitudes():
    d = 16
    base = torch.randn(3, d)
    # 40 tokens: every token is one of 3 directions with its own magnitude
    which = torch.arange(40) % 3
    mags = torch.linspace(0.5, 4.0, 40)
    tokens = base[which] / base[which].norm(dim=-1, keepdim=True) * mags[:, None]
    keys = tokens[None, None].clone()
    values = tokens.flip(0)[None, None].clone()
    layer = SpindleLayer()
    layer.append(keys, values, torch.arange(40)[None])
    layer.to_codebook(0.98, 0.95, None)
    assert layer.kbook_n.item() == 3 and layer.vbook_n.item() == 3
    assert layer.rk.dtype == torch.int16 and layer.mk.dtype == torch.float32
    assert torch.allclose(layer.keys, keys, atol=1e-5) and torch.allclose(layer.values, values, atol=1e-5)
    # 2 books x 3 entries x 16 fp32 + 40 tokens x (2 int16 indices + 2 fp32 magnitudes)
    assert layer.kept_bytes_per_row().tolist() == [2 * 3 * d * 4 + 40 * (2 + 2 + 4 + 4)]
    # decode: a token along an existing direction joins it, a new direction opens an entry
    new_dir = torch.zeros(d)
    new_dir[0] = 1.0
    layer.append(keys[:, :, :1] * 2, new_dir[None, None, None] * 3, torch.tensor([[40]]))
    assert layer.kbook_n.item() == 3 and layer.vbook_n.item() in (3, 4)
    assert torch.allclose(layer.keys[0, 0, 40], keys[0, 0, 0] * 2, atol=1e-5)
    assert torch.allclose(layer.values[0, 0, 40], new_dir * 3, atol=1e-5)
    assert layer.positions[0, 0, -1].item() == 40


def test_unfolded_eviction_stores_each_kept_vector_once():
    torch.manual_seed(0)
    b, hk, group, s, d = 1, 1, 2, 6, 8
    keys, values = torch.randn(b, hk, s, d), torch.randn(b, hk, s, d)
    layer = SpindleLayer()
    layer.append(keys, values, torch.arange(s)[None])
    # query head 0 keeps tokens {0, 1, 5}, query head 1 keeps {1, 3, 5}: union {0, 1, 3, 5}
    selected = torch.zeros(b, hk * group, s, dtype=torch.bool)
    selected[0, 0, [0, 1, 5]] = True
    selected[0, 1, [1, 3, 5]] = True
    layer.evict_unfolded(selected, hk * group)
    assert layer.kbook_n.item() == 4 and layer.rk.dtype == torch.int16
    assert layer.keys.shape == (1, 2, 3, d)
    assert torch.equal(layer.keys[0, 0], keys[0, 0, [0, 1, 5]])
    assert torch.equal(layer.values[0, 1], values[0, 0, [1, 3, 5]])
    assert layer.positions[0].tolist() == [[0, 1, 5], [1, 3, 5]]
    # which query heads keep each union row (bit g: query head g): 0 -> head 0, 1 and 5 -> both, 3 -> head 1
    assert layer.mb.dtype == torch.uint8 and layer.mb[0, 0].tolist() == [1, 3, 2, 3]
    # 4 distinct tokens x (key + value) x 8 fp32 + their 4 member bytes + 6 int16 indices
    assert layer.kept_bytes_per_row().tolist() == [4 * 2 * d * 4 + 4 + 6 * 2]
    assert layer.filled_slots_per_row().tolist() == [4]
    # a decoded token is one new entry shared by both query heads
    layer.append(torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d), torch.tensor([[6]]))
    assert layer.kbook_n.item() == 5 and layer.positions[0, :, -1].tolist() == [6, 6]
    assert layer.mb[0, 0].tolist() == [1, 3, 2, 3, 3]
    mask = layer.attention_mask(torch.tensor([[6]]))
    assert mask.shape == (1, 2, 1, 4) and mask.all()


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (240, 130, 190)]


@pytest.mark.parametrize("params", [{}, {"rope_theta": 10000.0, "theta_k": 0.3, "theta_v": 0.3}])
def test_batched_equals_unbatched_and_ratio_on_target(tiny_llama, params):
    model, tok = tiny_llama
    policy = make_policy("spindlekv", **params)
    budget = Budget(ratio=0.25)
    gen = Generator(model, tok, policy, budget)
    cfg = GenerationConfig(max_new_tokens=4)
    prompts = _prompts()
    batched, _ = gen.generate(prompts, cfg)
    for p, row in zip(prompts, batched):
        alone, _ = gen.generate([p], cfg)
        assert row.output_ids == alone[0].output_ids
        assert row.kv_bytes_kept == alone[0].kv_bytes_kept
        ratio = row.kv_bytes_kept / row.kv_bytes_full
        assert ratio == pytest.approx(policy.target_ratio(len(p), budget), rel=0.10)


def test_parameters_and_layer_split():
    p = make_policy("spindlekv")
    assert p.num_shallow(30) == 6 and p.num_shallow(4) == 1
    assert make_policy("spindlekv", shallow_layers=3).num_shallow(30) == 3
    w = p.pyramid_weights(30)
    assert w[:6] == [0.0] * 6 and w[6] == pytest.approx(0.525) and w[-1] == pytest.approx(0.05)
    with pytest.raises(ValueError):
        make_policy("spindlekv", kernel=4)


def _clustered(b, h, n, d, base, gen):
    which = torch.randint(0, base.shape[0], (b, h, n), generator=gen)
    noise = 0.1 * torch.randn(b, h, n, d, generator=gen) * (torch.rand(b, h, n, 1, generator=gen) < 0.5)
    return (base[which] + noise) * (torch.rand(b, h, n, 1, generator=gen) + 0.5)


def test_batched_codebooks_equal_the_one_sequence_greedy():
    """`build_codebooks` (all (row, head) at once, greedy over linked tokens only) == `build_codebook`."""
    from policies.spindlekv import build_codebooks

    gen = torch.Generator().manual_seed(0)
    for trial, theta in enumerate((0.98, 0.95, 0.9, 0.5)):
        base = torch.randn(7, 16, generator=gen)
        x = _clustered(1, 5, 60, 16, base, gen)[0]
        lengths = torch.randint(1, 61, (5,), generator=gen)
        book, index, mag, counts = build_codebooks(x, lengths, theta, torch.float32)
        merged = 0
        for p in range(5):
            m = int(lengths[p])
            b1, i1, m1 = build_codebook(x[p, :m], theta)
            merged += m - b1.shape[0]
            assert counts[p] == b1.shape[0] and torch.equal(book[p, : b1.shape[0]], b1), (trial, p)
            assert torch.equal(index[p, :m], i1) and torch.equal(mag[p, :m], m1), (trial, p)
            assert (book[p, b1.shape[0] :] == 0).all() and (index[p, m:] == 0).all()
        assert merged > 0


@pytest.mark.parametrize("rope_theta", [None, 10000.0])
def test_chunk_append_equals_token_by_token(rope_theta):
    """A codebook layer takes a chunk in one go exactly as if its tokens came one at a time (entries
    opened inside the chunk are joined by later tokens; padding tokens store nothing)."""
    gen = torch.Generator().manual_seed(1)
    b, hk, d = 2, 3, 16
    base = torch.randn(6, d, generator=gen)
    k0, v0 = _clustered(b, hk, 30, d, base, gen), _clustered(b, hk, 30, d, base, gen)
    pos0 = torch.arange(30).expand(b, 30).clone()
    pos0[1, :4] = -1
    chunked, single = SpindleLayer(), SpindleLayer()
    for layer in (chunked, single):
        layer.append(k0, v0, pos0)
        layer.to_codebook(0.95, 0.9, rope_theta)
    base2 = torch.cat([base, torch.randn(3, d, generator=gen)])  # new directions: entries open in-chunk
    k, v = _clustered(b, hk, 12, d, base2, gen), _clustered(b, hk, 12, d, base2, gen)
    pos = torch.arange(30, 42).expand(b, 12).clone()
    pos[0, 1] = -1
    chunked.append(k, v, pos)
    for t in range(12):
        single.append(k[:, :, t : t + 1], v[:, :, t : t + 1], pos[:, t : t + 1])
    opened = chunked.kbook_n - single.kbook_n.new_tensor(0)
    assert (opened > 0).all()
    for name in ("kbook_n", "vbook_n", "_n"):
        assert torch.equal(getattr(chunked, name), getattr(single, name)), name
    # decode appends (q == 1) grow the widths by one slot each without reading lengths back
    assert single.positions.shape[-1] == 42 and chunked.positions.shape[-1] == int(chunked._n.max()) == 41
    live_c = torch.arange(chunked.rk.shape[-1]) < chunked._n[..., None]
    live_s = torch.arange(single.rk.shape[-1]) < single._n[..., None]
    assert (single.positions[~live_s] == -1).all()
    for name in ("keys", "values", "positions", "rk", "rv", "mk", "mv"):
        assert torch.equal(getattr(chunked, name)[live_c], getattr(single, name)[live_s]), name


def test_copy_keeps_its_own_buffers():
    """A shallow copy that selects rows (the benchmark tiles caches so) leaves the original's buffer
    table alone: the original keeps its spare slots and holds no buffer of the copy."""
    import copy

    layer = SpindleLayer()
    layer.append(torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8), torch.arange(6).expand(2, 6))
    layer.evict_unfolded(torch.ones(2, 2, 6, dtype=torch.bool), 2)
    layer.reserve(4)
    before = {k: v.data_ptr() for k, v in layer._bufs.items()}
    tiled = copy.copy(layer)
    tiled.select_rows(torch.tensor([0, 1, 0, 1]))
    assert {k: v.data_ptr() for k, v in layer._bufs.items()} == before
    assert tiled.rk.shape[0] == 4 and tiled._bufs["rk"].data_ptr() == tiled.rk.data_ptr()
    tiled.append(torch.randn(4, 1, 1, 8), torch.randn(4, 1, 1, 8), torch.full((4, 1), 6))
    assert layer.positions.shape == (2, 2, 6) and tiled.positions.shape == (4, 2, 7)
