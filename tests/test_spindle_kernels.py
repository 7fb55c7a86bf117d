"""SpindleKV decode kernel vs its float32 reference; the reference vs dense attention over `_view()`.

The Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors here (set before triton is
imported: the interpreter is chosen when the kernels are defined), on the GPU in
`python -m pipeline.bench.check_spindle`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.attention_math import grouped_attention  # noqa: E402
from policies import spindle_kernels as sk  # noqa: E402
from policies.spindlekv import SpindleLayer  # noqa: E402

needs_kernel = pytest.mark.skipif(
    not (sk.HAVE_TRITON and sk.interpreter_works()),
    reason="needs triton with TRITON_INTERPRET=1 in force before triton's first import in this process "
    "(run `TRITON_INTERPRET=1 pytest tests/test_spindle_kernels.py`; another module imported triton first)",
)


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    monkeypatch.setattr(sk, "CPU_INTERPRET", True)


def random_storage(b, kv_heads, group, d, s, mode, rope_theta, dtype=torch.float32, gen=None):
    """Random books/indices/magnitudes/positions with ragged lengths (every (row, head) >= 1 token)."""
    g = gen or torch.Generator().manual_seed(0)
    heads = kv_heads * group
    e = kv_heads if mode == "codebook" else heads
    ck, cv = max(1, s // 3), max(1, s // 2)
    if mode == "evicted":
        cv = ck
    kbook = torch.randn(b, kv_heads, ck, d, generator=g)
    vbook = torch.randn(b, kv_heads, cv, d, generator=g)
    if mode == "codebook":
        kbook = kbook / kbook.norm(dim=-1, keepdim=True)
        vbook = vbook / vbook.norm(dim=-1, keepdim=True)
    n = torch.randint(1, s + 1, (b, e), generator=g)
    n[0, 0] = s
    live = torch.arange(s) < n[..., None]
    rk = torch.randint(0, ck, (b, e, s), generator=g)
    rv = torch.randint(0, cv, (b, e, s), generator=g) if mode == "codebook" else None
    dead = torch.randint(-5, 30000, (b, e, s), generator=g)  # past a head's length: anything
    rk = torch.where(live, rk, dead.clamp(min=0, max=ck - 1))
    mk = mv = None
    if mode == "codebook":
        mk = (torch.rand(b, e, s, generator=g) * 3 + 0.5).to(dtype)
        mv = (torch.rand(b, e, s, generator=g) * 3 + 0.5).to(dtype)
        rv = torch.where(live, rv, torch.zeros_like(rv)).to(torch.int16)
    pos = torch.randint(0, 3000, (b, e, s), generator=g).to(torch.int32)
    pos = torch.where(live, pos, torch.full_like(pos, -1))
    q = torch.randn(b, heads, d, generator=g).to(dtype)
    return dict(
        query=q,
        kbook=kbook.to(dtype),
        vbook=vbook.to(dtype),
        rk=rk.to(torch.int16),
        rv=rv,
        mk=mk,
        mv=mv,
        pos=pos,
        n=n,
        scaling=d**-0.5,
        rope_theta=rope_theta if mode == "codebook" else None,
    )


def layer_from(st, mode):
    """A compressed SpindleLayer holding storage `st` (as its own conversions would leave it)."""
    layer = SpindleLayer()
    layer.kbook, layer.vbook, layer.rk, layer.rv = st["kbook"], st["vbook"], st["rk"], st["rv"]
    layer.mk, layer.mv, layer._pos, layer._n = st["mk"], st["mv"], st["pos"], st["n"]
    layer.rope_theta = st["rope_theta"]
    layer.kbook_n = torch.full(st["kbook"].shape[:2], st["kbook"].shape[2])
    layer.vbook_n = torch.full(st["vbook"].shape[:2], st["vbook"].shape[2])
    layer.mode = mode
    layer.has_empty = layer.heads_differ = True
    return layer


@pytest.mark.parametrize("mode", ["codebook", "evicted"])
@pytest.mark.parametrize("rope_theta", [None, 10000.0])
def test_reference_equals_dense_attention_over_view(mode, rope_theta):
    """The reference computes what today's path computes: masked SDPA over `_view()` (float32)."""
    st = random_storage(2, 2, 3, 32, 40, mode, rope_theta, gen=torch.Generator().manual_seed(1))
    layer = layer_from(st, mode)
    q = st["query"][:, :, None]
    keys, values = layer.keys, layer.values
    live = torch.arange(keys.shape[2]) < st["n"][..., None]
    out = grouped_attention(q, keys, values, live[:, :, None], st["scaling"])[:, :, 0]
    ref = sk.reference_decode(**st)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def _rel(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@needs_kernel
@pytest.mark.parametrize(
    "group,d,rope_theta,mode",
    [
        (1, 64, None, "codebook"),
        (3, 64, 10000.0, "codebook"),
        (4, 128, 500000.0, "codebook"),
        (4, 64, None, "codebook"),
        (1, 128, 10000.0, "codebook"),
        (1, 64, None, "evicted"),
        (3, 128, None, "evicted"),
        (4, 64, None, "evicted"),
    ],
)
def test_kernel_matches_reference(group, d, rope_theta, mode):
    st = random_storage(2, 2, group, d, 150, mode, rope_theta, gen=torch.Generator().manual_seed(group * d))
    ref = sk.reference_decode(**st)
    out = sk.spindle_decode(**st, block_n=32)  # 150 tokens: several blocks and splits, a ragged tail
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-5


@needs_kernel
def test_kernel_split_counts_and_strided_views():
    """Any split count gives the same result; books and indices may be views of larger buffers."""
    st = random_storage(2, 2, 4, 64, 70, "codebook", 10000.0, gen=torch.Generator().manual_seed(7))
    ref = sk.reference_decode(**st)
    for splits in (1, 2, 5):
        assert _rel(sk.spindle_decode(**st, splits=splits, block_n=16), ref) < 1e-5
    wide = dict(st)
    for name in ("kbook", "vbook", "rk", "rv", "mk", "mv", "pos"):
        t = st[name]
        buf = torch.zeros((*t.shape[:2], t.shape[2] + 9, *t.shape[3:]), dtype=t.dtype)
        buf[:, :, : t.shape[2]] = t
        wide[name] = buf[:, :, : t.shape[2]]
    assert _rel(sk.spindle_decode(**wide, block_n=16), ref) < 1e-5


@needs_kernel
@pytest.mark.parametrize("mode", ["codebook", "evicted"])
def test_layer_attend_uses_kernel_on_decode(mode, monkeypatch):
    """`SpindleLayer.attend` on a decode step: the kernel (interpreted here) agrees with the exact path."""
    from pipeline.kv_cache import KVLayer, StepContext

    st = random_storage(2, 2, 4, 64, 50, mode, 10000.0, gen=torch.Generator().manual_seed(3))
    layer = layer_from(st, mode)
    q = st["query"][:, :, None]
    step = StepContext(cache=None, positions=torch.full((2, 1), 3000), padded=False)
    calls = []
    real = sk.spindle_decode
    monkeypatch.setattr(sk, "spindle_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = layer.attend(q, step, st["scaling"])
    exact = KVLayer.attend(layer, q, step, st["scaling"])
    assert calls and out.shape == exact.shape == (2, 8, 1, 64)
    assert _rel(out, exact.float()) < 1e-5


# -- evicted layers' union kernel: each kept row read once for its query heads -----------------
def union_storage(b, kv_heads, group, d, rows, dtype=torch.float32, seed=0):
    """A GQA evicted layer's storage both ways: the union book with member bits (`union_decode`) and
    each query head's indices into it (`spindle_decode`'s evicted form), ragged lengths. Row 0's first
    query head keeps nothing; its second keeps only late rows (blocks where it sees none come first)."""
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    kbook = torch.randn(b, kv_heads, rows, d, generator=g).to(dtype)
    vbook = torch.randn(b, kv_heads, rows, d, generator=g).to(dtype)
    n = torch.randint(rows // 2, rows + 1, (b, kv_heads), generator=g)
    n[0, 0] = rows
    bits = torch.randint(1, 1 << group, (b, kv_heads, rows), generator=g)  # every row: >= 1 head
    bits[0, 0] &= ~1  # query head 0 keeps nothing
    late = torch.arange(rows) >= rows - 5
    bits[0, 0] = torch.where(late, bits[0, 0] | 2, bits[0, 0] & ~2)  # query head 1: the last 5 rows
    bits[0, 0] |= (bits[0, 0] == 0) * 4
    live = torch.arange(rows) < n[..., None]
    index = torch.zeros(b, heads, rows, dtype=torch.int64)
    count = torch.zeros(b, heads, dtype=torch.int64)
    for bi in range(b):
        for h in range(heads):
            kept = torch.nonzero(live[bi, h // group] & (bits[bi, h // group] >> (h % group) & 1).bool())[
                :, 0
            ]
            index[bi, h, : kept.numel()] = kept
            count[bi, h] = kept.numel()
    member = sk.member_bits(index, count, rows, group)
    query = torch.randn(b, heads, d, generator=g).to(dtype)
    per_head = dict(query=query, kbook=kbook, vbook=vbook, rk=index.to(torch.int16), rv=None, mk=None,
                    mv=None, pos=None, n=count, scaling=d**-0.5, rope_theta=None)  # fmt: skip
    union = dict(query=query, kbook=kbook, vbook=vbook, member=member, n=n, scaling=d**-0.5)
    return per_head, union, torch.where(live, bits, 0)


def test_member_bits_name_the_heads_that_index_each_row():
    _, union, bits = union_storage(2, 2, 3, 16, 40)
    assert union["member"].dtype == torch.uint8 and torch.equal(union["member"].long(), bits)
    assert sk.member_dtype(8) == torch.uint8 and sk.member_dtype(9) == torch.int16
    assert sk.member_dtype(32) is None


@needs_kernel
@pytest.mark.parametrize("group,d,block_n,splits", [(4, 64, 32, None), (3, 128, 16, 1), (8, 64, 16, 3)])
def test_union_kernel_equals_per_head_attention(group, d, block_n, splits):
    """Reading each union row once with member bits gives each query head the attention over its own
    indexed rows (the float32 reference); a head that keeps nothing gets zeros, a head whose rows
    start late is not poisoned by the blocks before (no NaN)."""
    per_head, union, _ = union_storage(2, 2, group, d, 150, seed=group)
    ref = sk.reference_decode(**per_head)
    out = sk.union_decode(**union, block_n=block_n, splits=splits)
    assert torch.isfinite(out).all() and torch.equal(out[0, 0], torch.zeros(d))
    assert _rel(out, ref) < 1e-5


@needs_kernel
def test_union_kernel_tensor_core_path(half):
    per_head, union, _ = union_storage(2, 2, 4, 64, 150, dtype=half, seed=5)
    ref = sk.reference_decode(**per_head)
    out = sk.union_decode(**union, block_n=32)
    assert out.dtype == half and torch.isfinite(out).all()
    assert _rel(out, ref) < HALF_TOL[half]
    assert torch.equal(out, sk.union_decode(**union, block_n=32, mma=True))  # the default took it
    with pytest.raises(ValueError, match="union"):
        sk.union_decode(union["query"], union["kbook"], union["vbook"], per_head["rk"], per_head["n"], 0.1)


@needs_kernel
def test_evicted_layer_decodes_through_the_union_kernel(monkeypatch):
    """A GQA layer evicted by `evict_unfolded` decodes with `union_decode`, eager and static, as the
    exact path over its views does; its member bits follow decode appends."""
    from pipeline.kv_cache import KVLayer, StepContext

    torch.manual_seed(0)
    b, hk, group, s, d = 2, 2, 4, 60, 32
    layer = SpindleLayer()
    layer.append(torch.randn(b, hk, s, d), torch.randn(b, hk, s, d), torch.arange(s).expand(b, s))
    layer.evict_unfolded(torch.rand(b, hk * group, s) < 0.3, hk * group)
    layer.reserve(4)
    calls = []
    real = sk.union_decode
    monkeypatch.setattr(sk, "union_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    for t in range(2):
        layer.append(torch.randn(b, hk, 1, d), torch.randn(b, hk, 1, d), torch.full((b, 1), s + t))
        q = torch.randn(b, hk * group, 1, d)
        step = StepContext(cache=None, positions=torch.full((b, 1), s + t), padded=False)
        exact = KVLayer.attend(layer, q, step, d**-0.5)
        assert _rel(layer.attend(q, step, d**-0.5), exact) < 1e-5
        assert _rel(layer.attend_static(q, d**-0.5), exact) < 1e-5
    last_two = layer.kbook_n[..., None] - torch.tensor([2, 1])  # the decoded tokens' rows
    assert len(calls) == 4 and layer.mb.gather(2, last_two).eq((1 << group) - 1).all()


# -- prefill / append kernels: similarity counts and best matches ------------------------------
def _clustered(P, n, d, dirs=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dirs, d, generator=g)
    which = torch.randint(0, dirs, (P, n), generator=g)
    noise = torch.randn(P, n, d, generator=g) * (torch.rand(P, n, 1, generator=g) < 0.5) * 0.1
    return ((base[which] + noise) * (torch.rand(P, n, 1, generator=g) * 2 + 0.3)).to(dtype)


@needs_kernel
@pytest.mark.parametrize("causal,skip_diag,with_ok", [(False, True, False), (True, False, True)])
def test_pair_counts_match_torch(causal, skip_diag, with_ok):
    P, n, d = 3, 40, 16
    x = _clustered(P, n, d, seed=1)
    y = _clustered(P, n, d, seed=1)
    rx, ry = 1 / x.norm(dim=-1), 1 / y.norm(dim=-1)
    nx, ny = torch.tensor([40, 17, 1]), torch.tensor([40, 33, 5])
    ok = torch.rand(P, n, generator=torch.Generator().manual_seed(3)) < 0.6
    got = sk.pair_counts(
        x, y, rx, ry, nx, ny, 0.9, causal=causal, skip_diag=skip_diag, y_ok=ok if with_ok else None
    )
    cos = (x * rx[..., None]) @ (y * ry[..., None]).transpose(1, 2)
    hit = (cos > 0.9) & (torch.arange(n) < ny[:, None])[:, None, :]
    if with_ok:
        hit &= ok[:, None, :]
    if skip_diag:
        hit &= ~torch.eye(n, dtype=torch.bool)
    if causal:
        hit &= torch.ones(n, n, dtype=torch.bool).tril(-1)
    want = hit.sum(-1).masked_fill(torch.arange(n) >= nx[:, None], 0)
    assert (got > 0).any() and torch.equal(got.long(), want)


@needs_kernel
@pytest.mark.parametrize("n", [40, 70, 16])
def test_self_pair_counts_count_each_pair_once_as_pair_counts_does(n):
    """The symmetric count (each tile pair multiplied once, column sums by atomic adds) against the
    one-sided count: odd and even numbers of tiles, ragged lengths, an empty sequence."""
    P, d = 4, 16
    x = _clustered(P, n, d, seed=2)
    r = 1 / x.norm(dim=-1)
    lengths = torch.tensor([n, n - 7, 1, 0])
    want = sk.pair_counts(x, x, r, r, lengths, lengths, 0.9, skip_diag=True)
    got = sk.self_pair_counts(x, r, lengths, 0.9)
    assert want[0].sum() > n and torch.equal(got, want)


@needs_kernel
def test_best_match_matches_torch_and_breaks_ties_first():
    from policies.spindlekv import _best_match_torch

    P, q, C, d = 3, 20, 70, 16
    book = torch.randn(P, C, d, generator=torch.Generator().manual_seed(4))
    book = book / book.norm(dim=-1, keepdim=True)
    book[:, 50] = book[:, 10]  # a tie: the first index wins
    x = _clustered(P, q, d, seed=4)
    x[:, 3] = book[:, 10] * 2
    count = torch.tensor([70, 33, 0])
    r = 1 / x.norm(dim=-1)
    best, arg = sk.best_match(x, r, book, torch.full((P,), q), count)
    best_t, arg_t = _best_match_torch(x * r[..., None], book, count)
    assert torch.allclose(best, best_t, atol=1e-5) and torch.equal(arg, arg_t)
    assert arg[0, 3] == 10 and (best[2] == -2).all() and (arg[2] == 0).all()


@needs_kernel
@pytest.mark.parametrize("rope_theta", [None, 10000.0])
def test_layer_build_and_chunk_append_with_kernels_equal_torch_path(rope_theta, monkeypatch):
    """The kernel path of `to_codebook` and of a chunk append (degrees, best matches, in-chunk links)
    stores what the exact torch path stores (clustered data, far from the thresholds' edges)."""
    import policies.spindlekv as sp

    g = torch.Generator().manual_seed(11)
    b, hk, d = 2, 2, 16
    base = torch.randn(5, d, generator=g)

    def data(n, dirs):
        which = torch.randint(0, dirs.shape[0], (b, hk, n), generator=g)
        return dirs[which] * (torch.rand(b, hk, n, 1, generator=g) + 0.5)

    k0, v0 = data(40, base), data(40, base)
    base2 = torch.cat([base, torch.randn(3, d, generator=g)])
    k, v = data(20, base2), data(20, base2)
    pos = torch.arange(40, 60).expand(b, 20).clone()
    pos[1, 2] = -1
    if rope_theta is not None:  # keys arrive rotated; their directions cluster before RoPE
        k0 = sp.rope(k0, torch.arange(40).expand(b, hk, 40), rope_theta)
        k = sp.rope(k, pos.clamp(min=0)[:, None].expand(b, hk, 20), rope_theta)
    layers = []
    for kernels in (False, True):
        monkeypatch.setattr(sp, "_kernels", (lambda dev: sk) if kernels else (lambda dev: None))
        layer = SpindleLayer()
        layer.append(k0, v0, torch.arange(40).expand(b, 40))
        layer.to_codebook(0.98, 0.95, rope_theta)
        layer.append(k, v, pos)
        layer.append(k[:, :, 3:4] * 2, v[:, :, 5:6], torch.tensor([[43], [43]]))
        layers.append(layer)
    exact, fast = layers
    assert (fast.kbook_n > 5).all() and (fast.kbook_n < 20).all()  # merged, and opened entries in-chunk
    for name in ("kbook_n", "vbook_n", "_n"):
        assert torch.equal(getattr(exact, name), getattr(fast, name)), name
    assert torch.allclose(exact.keys, fast.keys, atol=1e-5) and torch.allclose(
        exact.values, fast.values, atol=1e-5
    )
    live = torch.arange(exact.rk.shape[-1]) < exact._n[..., None]
    assert torch.equal(exact.rk[live], fast.rk[live]) and torch.equal(exact.rv[live], fast.rv[live])


@needs_kernel
@pytest.mark.parametrize("rope_mode", ["table", "libdevice"])
@pytest.mark.parametrize("mode", ["codebook", "evicted"])
def test_rope_modes_match_reference_at_large_positions(rope_mode, mode):
    """Keys rotated from the angle-addition tables (or float32 angles) agree with the float64-angle
    reference at positions far past 64 (the tables' hi rows) and past float32's exact angles."""
    st = random_storage(2, 2, 4, 64, 90, mode, 500000.0, gen=torch.Generator().manual_seed(21))
    st["pos"] = torch.where(st["pos"] >= 0, st["pos"] * 37 + 100000, st["pos"])
    if mode == "evicted":
        st["rope_theta"] = 500000.0  # the kernel takes RoPE for either form
    ref = sk.reference_decode(**st)
    out = sk.spindle_decode(**st, block_n=32, rope_mode=rope_mode)
    assert _rel(out, ref) < (1e-5 if rope_mode == "table" else 1e-3)
    assert sk.rope_tables(64, 500000.0, "cpu").shape == (128 + 2 * (sk.ROPE_TABLE_POSITIONS // 64), 32)


@needs_kernel
@pytest.mark.parametrize("rope_theta", [None, 10000.0])
def test_fused_match_finds_the_best_entry_the_tokens_read(rope_theta):
    """`spindle_decode_match`: the attention partials of `spindle_decode` (free slot empty) and, per
    (row, kv head), the largest cosine of the new key / value with a book entry some live token reads,
    at its lowest entry (ties made on purpose)."""
    g = torch.Generator().manual_seed(11)
    st = random_storage(2, 2, 4, 64, 90, "codebook", rope_theta, gen=g)
    b, hk, d = 2, 2, 64
    xk, xv = torch.randn(b, hk, d, generator=g), torch.randn(b, hk, d, generator=g)
    xk[0, 0] = st["kbook"][0, 0, int(st["rk"][0, 0, 5])] * 3  # an exact match
    st["kbook"][0, 0, int(st["rk"][0, 0, 7])] = st["kbook"][0, 0, int(st["rk"][0, 0, 5])]  # a tie
    xv[1, 1] = st["vbook"][1, 1, int(st["rv"][1, 1, 0])] * 0.5
    rx = torch.stack([1 / xk.norm(dim=-1), 1 / xv.norm(dim=-1)], dim=-1)
    part, best, arg = sk.spindle_decode_match(**st, xk=xk, xv=xv, rx=rx)
    part.pm[..., -1], part.pl[..., -1], part.pacc[..., -1, :] = float("-inf"), 0.0, 0.0
    assert _rel(sk.reduce_partials(part, st["query"].dtype), sk.reference_decode(**st)) < 1e-5
    live = torch.arange(90) < st["n"][..., None]
    for j, (book, idx, x) in enumerate(((st["kbook"], st["rk"], xk), (st["vbook"], st["rv"], xv))):
        read = torch.zeros(b, hk, book.shape[2] + 1, dtype=torch.bool)
        read.scatter_(2, torch.where(live, idx.long(), book.shape[2]), True)
        cos = torch.einsum("bhcd,bhd->bhc", book.float(), x) * rx[..., j, None]
        bm, am = cos.masked_fill(~read[..., :-1], -2.0).max(dim=-1)
        torch.testing.assert_close(best[..., j], bm, rtol=0, atol=1e-6)
        assert torch.equal(arg[..., j], am), j
    assert best[0, 0, 0] > 0.9999 and arg[0, 0, 0] == min(int(st["rk"][0, 0, 5]), int(st["rk"][0, 0, 7]))


# -- the shared kernel's tensor-core path (half-precision storage, no RoPE) ---------------------
# Relative error against the float32 reference over the same data: the output's rounding and the
# probabilities' for P @ V. The interpreter's float32 -> bf16 casts truncate (the GPU rounds to
# nearest: about half the error): bf16 here is ~6e-3, fp16 ~2.5e-4 (128-dim heads, 300 tokens).
HALF_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def half(request):
    """A half dtype; for bfloat16 the interpreter's dot takes the operands' values (conftest)."""
    if request.param == torch.bfloat16:
        request.getfixturevalue("bf16_interpreter_dot")
    return request.param


@needs_kernel
@pytest.mark.parametrize("group,d,block_n", [(4, 64, 32), (3, 128, 16), (16, 64, 64)])
def test_mma_path_matches_reference(half, group, d, block_n):
    """Codebook storage in fp16/bf16 without RoPE: the tensor-core path (the default there) agrees
    with the float32 reference over the same data within the half dtype's rounding; ragged lengths,
    several blocks and splits."""
    st = random_storage(
        2, 2, group, d, 150, "codebook", None, dtype=half, gen=torch.Generator().manual_seed(d)
    )
    ref = sk.reference_decode(**st)
    out = sk.spindle_decode(**st, block_n=block_n)
    assert out.dtype == half and torch.isfinite(out).all()
    assert _rel(out, ref) < HALF_TOL[half]
    assert torch.equal(out, sk.spindle_decode(**st, block_n=block_n, mma=True))  # the default took it
    old = sk.spindle_decode(**st, block_n=block_n, mma=False)
    assert _rel(old, ref) < HALF_TOL[half] and not torch.equal(out, old)  # another computation
    for splits in (1, 3):
        assert _rel(sk.spindle_decode(**st, block_n=16, splits=splits), ref) < HALF_TOL[half]


@needs_kernel
def test_mma_path_only_where_it_applies():
    st = random_storage(1, 2, 4, 64, 40, "codebook", 10000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match="tensor-core"):
        sk.spindle_decode(**st, mma=True)  # RoPE re-rotation: the float32 path
    st = random_storage(1, 2, 4, 64, 40, "codebook", None)
    with pytest.raises(ValueError, match="tensor-core"):
        sk.spindle_decode(**st, mma=True)  # float32 storage
    assert sk.mma_path(torch.bfloat16, None) and not sk.mma_path(torch.bfloat16, 10000.0)
    assert not sk.mma_path(torch.float32, None)


def _book_cosines(book, idx, n, x, r):
    """[b, hk, C] float32 cosines of x with each entry some live token reads (-2 for the others)."""
    live = torch.arange(idx.shape[-1]) < n[..., None]
    read = torch.zeros(*book.shape[:3], dtype=torch.bool)
    read.scatter_(2, torch.where(live, idx.long(), 0), live)
    cos = torch.einsum("bhcd,bhd->bhc", book.float(), x.float()) * r[..., None]
    return cos.masked_fill(~read, -2.0)


@needs_kernel
@pytest.mark.parametrize("group", [4, 16])
def test_mma_fused_match_finds_the_best_entry_the_tokens_read(half, group):
    """The fused match on the tensor-core path: per (row, kv head) the largest cosine of the new key
    (a row of the query tile) / value (its own small product) with an entry the live tokens read,
    as float32 torch computes it (half x half products are exact in float32), at the same entry
    where it leads the runner-up by > 1e-3, the lowest on an exact tie; and the attention partials
    of `spindle_decode` on the same path (ragged lengths, several splits)."""
    g = torch.Generator().manual_seed(group)
    b, hk, d, s = 3, 2, 64, 120
    st = random_storage(b, hk, group, d, s, "codebook", None, dtype=half, gen=g)
    xk, xv = torch.randn(b, hk, d, generator=g).to(half), torch.randn(b, hk, d, generator=g).to(half)
    e5, e7 = int(st["rk"][0, 0, 5]), int(st["rk"][0, 0, 7])
    if e5 != e7:
        st["kbook"][0, 0, e7] = st["kbook"][0, 0, e5]  # an exact tie: the lower entry wins
    xk[0, 0] = st["kbook"][0, 0, e5] * 3
    xv[1, 1] = st["vbook"][1, 1, int(st["rv"][1, 1, 0])] * 0.5
    rx = torch.stack([1 / xk.float().norm(dim=-1), 1 / xv.float().norm(dim=-1)], dim=-1)
    launch = dict(block_n=16, splits=3, mma=True)
    part, best, arg = sk.spindle_decode_match(**st, xk=xk, xv=xv, rx=rx, **launch)
    assert part.best.shape[-1] == 3  # the splits' matches are combined
    part.pm[..., -1], part.pl[..., -1], part.pacc[..., -1, :] = float("-inf"), 0.0, 0.0
    attn = sk.reduce_partials(part, half)
    # the same scores: one output rounding apart at most (group 16 takes a 32-row tile with the key)
    eps = torch.finfo(half).eps
    torch.testing.assert_close(attn, sk.spindle_decode(**st, **launch), rtol=eps, atol=1e-5)
    assert _rel(attn, sk.reference_decode(**st)) < HALF_TOL[half]
    clear_rows = 0
    for j, (book, idx, x) in enumerate(((st["kbook"], st["rk"], xk), (st["vbook"], st["rv"], xv))):
        cos = _book_cosines(book, idx, st["n"], x, rx[..., j])
        top2 = cos.topk(2, dim=-1).values
        torch.testing.assert_close(best[..., j], top2[..., 0], rtol=0, atol=1e-5)
        clear = (top2[..., 0] - top2[..., 1]) > 1e-3
        clear_rows += int(clear.sum())
        assert torch.equal(arg[..., j][clear], cos.argmax(dim=-1)[clear]), j
    assert clear_rows >= b * hk  # rows with a clear winner: the entry check is not vacuous
    assert best[0, 0, 0] > 0.99 and arg[0, 0, 0] == min(e5, e7)
    assert best[1, 1, 1] > 0.99 and arg[1, 1, 1] == int(st["rv"][1, 1, 0])


@needs_kernel
def test_mma_fused_match_equals_best_match_when_every_entry_is_read(half):
    """Storage whose every book entry is read by a live token (as a layer's is): the fused match is
    `best_match` over the whole book, the decode append's separate match."""
    g = torch.Generator().manual_seed(5)
    b, hk, d, s = 2, 2, 64, 100
    st = random_storage(b, hk, 4, d, s, "codebook", None, dtype=half, gen=g)
    st["n"] = torch.full((b, hk), s)
    for name, book in (("rk", "kbook"), ("rv", "vbook")):
        c = st[book].shape[2]
        st[name][..., :c] = torch.rand(b, hk, c, generator=g).argsort(dim=-1).to(torch.int16)
    x = {"k": torch.randn(b, hk, d, generator=g).to(half), "v": torch.randn(b, hk, d, generator=g).to(half)}
    x["k"][1, 0] = st["kbook"][1, 0, 3] * 2
    r = {w: 1 / x[w].float().norm(dim=-1) for w in x}
    _, best, arg = sk.spindle_decode_match(
        **st, xk=x["k"], xv=x["v"], rx=torch.stack([r["k"], r["v"]], -1), block_n=16, splits=2, mma=True
    )
    for j, w in enumerate("kv"):
        book = st[w + "book"]
        P, c = b * hk, book.shape[2]
        ones = torch.ones(P, dtype=torch.long)
        bm, am = sk.best_match(
            x[w].reshape(P, 1, d), r[w].reshape(P, 1), book.reshape(P, c, d), ones, ones * c
        )
        torch.testing.assert_close(best[..., j].reshape(P), bm[:, 0], rtol=0, atol=1e-5)
        cos = _book_cosines(book, st["r" + w], st["n"], x[w], r[w]).reshape(P, c)
        top2 = cos.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert clear.sum() >= P - 1 and torch.equal(arg[..., j].reshape(P)[clear], am[clear, 0])
    assert arg[1, 0, 0] == 3


@needs_kernel
def test_check_spindle_decode_agreement_on_cpu(bf16_interpreter_dot):
    """The GPU check's agreement part (`check_spindle_decode.check_kernel`, timing off) at its shapes
    on a small case: both paths, attention and fused match, pass its own checks."""
    from pipeline.bench import check_spindle_decode as check

    row = check.check_kernel(1, 160, None, copy_bps=1.0, dev=torch.device("cpu"), timing=False)
    assert row["mma_path"] and row["ok"], row
    assert row["mma_vs_reference_rel"] < 1e-2 and row["fused_mma_arg_equal_k"]
    assert row["fused_mma_best_maxdiff_v"] < 1e-5 and row["fused_f32_arg_equal_v"]


@needs_kernel
def test_check_spindle_decode_at_smollm2_shapes_on_cpu(bf16_interpreter_dot, monkeypatch):
    """`--shapes smollm2` (3 kv heads of 3 query heads, head_dim 64): the same checks pass there."""
    from pipeline.bench import check_spindle_decode as check

    monkeypatch.setattr(check, "HK", 3)
    monkeypatch.setattr(check, "GROUP", 3)
    monkeypatch.setattr(check, "D", 64)
    assert (check.HK, check.GROUP, check.D) == check.SHAPES["smollm2"]
    row = check.check_kernel(1, 160, None, copy_bps=1.0, dev=torch.device("cpu"), timing=False)
    assert row["mma_path"] and row["ok"], row
    union = check.check_union(1, 48, 0.5, copy_bps=1.0, dev=torch.device("cpu"), timing=False)
    assert union["ok"], union


@needs_kernel
def test_check_spindle_decode_with_entries_read_in_order_on_cpu(bf16_interpreter_dot, monkeypatch):
    """`--order sequential` (tokens read their entries in order, as the model's codebooks of random
    weights are): the storage still reads every entry, and the same checks pass."""
    from pipeline.bench import check_spindle_decode as check

    monkeypatch.setattr(check, "ORDER", "sequential")
    st = check._storage(1, 2, 4, 64, 160, None, torch.Generator().manual_seed(0), torch.device("cpu"))
    for idx, book in ((st["rk"], st["kbook"]), (st["rv"], st["vbook"])):
        c = book.shape[2]
        assert torch.equal(idx[..., :c].long(), torch.arange(c).expand(1, 2, c))  # each entry once, in order
    row = check.check_kernel(1, 160, None, copy_bps=1.0, dev=torch.device("cpu"), timing=False)
    assert row["mma_path"] and row["ok"], row


@needs_kernel
def test_check_spindle_decode_union_agreement_on_cpu(bf16_interpreter_dot):
    """The GPU check's union part (`check_spindle_decode.check_union`, timing off) on a small case:
    both kernels over the same deep-layer storage agree, and the rows' sharing is what was asked."""
    from pipeline.bench import check_spindle_decode as check

    row = check.check_union(1, 48, 0.5, copy_bps=1.0, dev=torch.device("cpu"), timing=False)
    assert row["ok"] and row["rel_union_vs_per_head"] < 1e-2, row
    assert 1.5 < row["head_rows_per_union_row"] < 3.5  # each of 4 heads keeps about half (at least one)
