"""KIVI fused decode attention: the Triton kernel against the float32 reference, on random stores.

The kernel runs on CUDA, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
here when no GPU is present). The interpreter's bfloat16 matrix products are wrong in triton
3.6, so on CPU the kernel is checked in float32 and float16; on CUDA in bfloat16 too.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from policies.kivi_kernels import (
    KiviStore,
    decode_attention,
    decode_attention_reference,
    dequantized,
    kernel_supports,
)

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
needs_kernel = pytest.mark.skipif(
    not HAVE_TRITON or (INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the fused kernel needs triton, and CUDA or TRITON_INTERPRET=1",
)


def random_store(
    b, h, d, bits, group_size, max_n, dtype, device="cpu", seed=0, ring_k=None, ring_v=None
) -> KiviStore:
    """A store with ragged lengths: every row/head its own n, nk (a multiple of G) and nv."""
    g = torch.Generator().manual_seed(seed)
    gv = min(group_size, d)
    n = torch.randint(1, max_n + 1, (b, h), generator=g)
    n[0, 0] = max_n
    nk = (torch.rand((b, h), generator=g) * n / group_size).floor().long() * group_size
    nv = (torch.rand((b, h), generator=g) * (n + 1)).floor().long().clamp(max=n)
    nk[-1, -1] = 0  # one (row, head) all in the residual
    groups = -(-max_n // group_size) + 1  # spare capacity past the used part
    wk = ring_k or max_n + 3
    wv = ring_v or max_n + 5

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(dtype)

    store = KiviStore(
        n=n,
        nk=nk,
        nv=nv,
        kq=torch.randint(0, 256, (b, h, groups, d, group_size * bits // 8), generator=g, dtype=torch.uint8),
        kscale=rnd(b, h, groups, d, scale=0.3).abs(),
        kzero=rnd(b, h, groups, d),
        kres=rnd(b, h, wk, d),
        vq=torch.randint(0, 256, (b, h, max_n + 7, d * bits // 8), generator=g, dtype=torch.uint8),
        vscale=rnd(b, h, max_n + 7, d // gv, scale=0.3).abs(),
        vzero=rnd(b, h, max_n + 7, d // gv),
        vres=rnd(b, h, wv, d),
        bits=bits,
        group_size=group_size,
    )
    for name in ("n", "nk", "nv", "kq", "kscale", "kzero", "kres", "vq", "vscale", "vzero", "vres"):
        setattr(store, name, getattr(store, name).to(device))
    return store


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_reference_matches_direct_dequantisation():
    """The reference reads the layout as documented: check one token of each kind by hand."""
    store = random_store(2, 2, 64, 2, 32, 150, torch.float32, seed=3)
    keys, values = dequantized(store, 150)
    b, h = 0, 0
    n, nk, nv = (int(x[b, h]) for x in (store.n, store.nk, store.nv))
    assert n == 150
    if nk:
        j, c = nk - 1, 5
        grp, t = divmod(j, 32)
        byte = int(store.kq[b, h, grp, c, t // 4])
        qint = (byte >> (2 * (t % 4))) & 3
        want = qint * store.kscale[b, h, grp, c] + store.kzero[b, h, grp, c]
        assert keys[b, h, j, c] == pytest.approx(want.item())
    assert torch.equal(keys[b, h, nk:n], store.kres[b, h, torch.arange(nk, n) % store.kres.shape[2]])
    if nv:
        j, c = nv - 1, 37
        byte = int(store.vq[b, h, j, c // 4])
        qint = (byte >> (2 * (c % 4))) & 3
        want = qint * store.vscale[b, h, j, c // 32] + store.vzero[b, h, j, c // 32]
        assert values[b, h, j, c] == pytest.approx(want.item())
    assert torch.equal(values[b, h, nv:n], store.vres[b, h, torch.arange(nv, n) % store.vres.shape[2]])


def test_reference_is_softmax_attention_over_dequantised_tokens():
    store = random_store(2, 2, 64, 4, 32, 100, torch.float32, seed=4)
    q = torch.randn(2, 8, 1, 64)
    out = decode_attention_reference(q, store, 0.125)
    keys, values = dequantized(store, 100)
    for b in range(2):
        for head in range(8):
            kv = head // 4
            n = int(store.n[b, kv])
            p = (q[b, head, 0] @ keys[b, kv, :n].T * 0.125).softmax(-1)
            assert torch.allclose(out[b, head, 0], p @ values[b, kv, :n], atol=1e-5)


CASES = [
    # bits, group (query heads per kv head), head_dim
    (2, 1, 64),
    (2, 4, 128),
    (4, 1, 128),
    (4, 4, 64),
]


@needs_kernel
@pytest.mark.parametrize("bits,group,d", CASES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if not INTERPRETED else [])
)
def test_kernel_matches_reference(bits, group, d, dtype):
    b, h = 2, 2
    max_n = 200 if INTERPRETED else 3000
    store = random_store(b, h, d, bits, 32, max_n, dtype, DEVICE, seed=bits * 100 + group * 10 + d)
    q = torch.randn(b, group * h, 1, d, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    ref = decode_attention_reference(q, store, d**-0.5)
    for splits, block_n in ((None, None), (1, None), (3, None), (2, 256)):
        out = decode_attention(q, store, d**-0.5, max_tokens=max_n, num_splits=splits, block_n=block_n)
        assert out.dtype == dtype and out.shape == (b, group * h, 1, d)
        assert torch.isfinite(out).all()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel_err(out, ref) < tol, (splits, block_n, rel_err(out, ref))


@needs_kernel
@pytest.mark.parametrize("bits,group,d", [(2, 3, 64), (4, 4, 128)])
def test_tail_of_ring_tokens_only(bits, group, d):
    """Decoding's steady state: every quantised count a whole tile (nk = nv), the rest in rings that
    wrap (ring smaller than the slots written): the tail's tiles then hold ring tokens only
    (`_ring_tile`), one of them partly past n, and one (row, head) with nothing quantised at all."""
    b, h, tile = 2, 3, 64
    max_n = 4 * tile + 37
    store = random_store(b, h, d, bits, 32, max_n, torch.float32 if INTERPRETED else torch.bfloat16,
                         DEVICE, seed=11, ring_k=96, ring_v=100)  # fmt: skip
    quantised = torch.tensor([[4 * tile, 2 * tile, 0], [3 * tile, 4 * tile, tile]], device=DEVICE)
    ring = torch.tensor([[37, 64, 90], [1, 37, 70]], device=DEVICE)
    store.nk, store.nv, store.n = quantised, quantised.clone(), quantised + ring
    q = torch.randn(b, group * h, 1, d, generator=torch.Generator().manual_seed(9)).to(store.kres.dtype)
    q = q.to(DEVICE)
    ref = decode_attention_reference(q, store, d**-0.5)
    for splits in (None, 1, 3):
        out = decode_attention(q, store, d**-0.5, max_tokens=max_n, num_splits=splits, block_n=tile)
        tol = 1e-5 if q.dtype == torch.float32 else 2e-2
        assert rel_err(out, ref) < tol, (splits, rel_err(out, ref))


@needs_kernel
@pytest.mark.parametrize("deq", [1] + ([3, 4] if not INTERPRETED else []))
@pytest.mark.parametrize("bits,group,d", [(2, 4, 128), (4, 1, 64)])
def test_every_dequantisation_matches_the_reference(deq, bits, group, d):
    """The fast tiles' de-quantisations (`deq`) on a ragged store whose lengths put the fast/tail
    boundary inside splits; bfloat16 on CUDA (DEQ 3 and 4 need it), float32 under the interpreter
    (DEQ 3 and 4 fall back to 1 there)."""
    dtype = torch.float32 if INTERPRETED else torch.bfloat16
    b, h = 3, 2
    max_n = 300 if INTERPRETED else 2000
    store = random_store(b, h, d, bits, 32, max_n, dtype, DEVICE, seed=deq + 50)
    store.nk = torch.minimum(store.n // 32 * 32, store.nk + 160 - store.nk % 32)  # whole groups
    q = torch.randn(b, group * h, 1, d, generator=torch.Generator().manual_seed(8)).to(dtype).to(DEVICE)
    ref = decode_attention_reference(q, store, d**-0.5)
    for splits, block_n, stages in ((None, None, None), (3, 128, 1), (2, 256, 2)):
        out = torch.full_like(q, float("nan"))
        kw = dict(num_splits=splits, block_n=block_n, num_stages=stages, deq=deq, out=out)
        decode_attention(q, store, d**-0.5, max_tokens=max_n, **kw)
        assert torch.isfinite(out).all()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel_err(out, ref) < tol, (splits, block_n, rel_err(out, ref))


@needs_kernel
def test_kernel_supports_the_shapes_it_tiles():
    """The kernel needs d / (8 // bits) >= 16 (its value sub-tiles' matrix products) and G <= its block."""
    q = torch.zeros(1, 4, 1, 32)
    assert not kernel_supports(random_store(1, 1, 32, 2, 32, 10, torch.float32), q)  # 8 bytes a token
    assert kernel_supports(random_store(1, 1, 32, 4, 32, 10, torch.float32), q)
    q = torch.zeros(1, 4, 1, 64)
    assert kernel_supports(random_store(1, 1, 64, 2, 32, 10, torch.float32), q)


@needs_kernel
def test_kernel_small_rings_and_strided_views():
    """Residual rings shorter than the sequence and stores that are views of larger buffers."""
    d, bits = 64, 2
    store = random_store(3, 2, d, bits, 32, 130, torch.float32, DEVICE, seed=11, ring_k=40, ring_v=33)
    big = store.vq.new_zeros((3, 2, store.vq.shape[2] + 50, store.vq.shape[3]))
    big[:, :, : store.vq.shape[2]] = store.vq
    store.vq = big[:, :, : store.vq.shape[2]]
    q = torch.randn(3, 4, 1, d, device=DEVICE)
    ref = decode_attention_reference(q, store, 0.1)
    out = decode_attention(q, store, 0.1, max_tokens=130, num_splits=2)
    assert rel_err(out, ref) < 1e-5


@needs_kernel
@pytest.mark.parametrize("bits,residual", [(2, 32), (4, 0)])
def test_layer_decode_attend_uses_the_kernel_and_matches_the_reference_path(bits, residual, monkeypatch):
    """A ragged batch (left padding at prefill), then decode steps that cross key-block and
    value-window boundaries: the layer's fused decode equals its de-quantising reference path,
    and the host's counts stay equal to the device's without a read-back."""
    from pipeline.kv_cache import EMPTY, KVLayer, StepContext
    from policies import kivi, kivi_kernels
    from policies.kivi import QuantizedKVLayer

    monkeypatch.setattr(kivi, "CPU_INTERPRET", True)  # the pipeline interprets nothing on its own
    calls = []
    kernel = kivi_kernels.decode_attention
    monkeypatch.setattr(kivi_kernels, "decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch.manual_seed(0)
    b, h, group, d = 2, 2, 4, 64
    layer = QuantizedKVLayer(bits, 32, residual)
    width = 70
    pos = torch.stack([torch.cat([torch.full((25,), EMPTY), torch.arange(45)]), torch.arange(width)])
    keys, values = torch.randn(b, h, width, d), torch.randn(b, h, width, d)
    layer.append(keys.to(DEVICE), values.to(DEVICE), pos.to(DEVICE))
    layer.note_padding(True)
    layer.flush()
    next_pos = torch.tensor([45, width])
    for _ in range(40):
        k, v = torch.randn(b, h, 1, d, device=DEVICE), torch.randn(b, h, 1, d, device=DEVICE)
        step = StepContext(cache=None, positions=next_pos[:, None].to(DEVICE), padded=False)
        layer.append(k, v, step.positions)
        layer.note_padding(False)
        assert layer._pending is None  # no padding: the host advanced its counts by itself
        q = torch.randn(b, group * h, 1, d, device=DEVICE)
        fused = layer.attend(q, step, d**-0.5)
        reference = KVLayer.attend(layer, q, step, d**-0.5)
        assert rel_err(fused, reference) < 1e-5
        next_pos = next_pos + 1
    assert layer._hn.tolist() == layer._n.cpu().tolist()
    assert layer._hnk.tolist() == layer._nk.cpu().tolist() and layer._hnv.tolist() == layer._nv.cpu().tolist()
    assert layer._n.tolist() == [[85, 85], [110, 110]]
    assert len(calls) == 40
