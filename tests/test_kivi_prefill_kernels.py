"""KIVI prefill: the Triton de-quantisation into a dense tensor equals the torch path, exactly.

`QuantizedKVLayer._dense` (prefill chunks after the first attend over the de-quantised earlier
tokens plus the residual) runs a Triton kernel on CUDA and, when a test opts in, on CPU tensors
under Triton's interpreter; elsewhere a torch path. Both compute x * scale + zero in float32 and
round once to the model dtype, so they must agree bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from policies import kivi
from policies.kivi import QuantizedKVLayer

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    not HAVE_TRITON or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the kernels need triton, and CUDA or TRITON_INTERPRET=1",
)


def _layer(bits, residual, d, chunks, dtype):
    torch.manual_seed(bits * 10 + d)
    b, h = 2, 3
    layer = QuantizedKVLayer(bits, 32, residual)
    lo = 0
    for q in chunks:
        k = torch.randn(b, h, q, d, dtype=dtype, device=DEVICE)
        v = torch.randn(b, h, q, d, dtype=dtype, device=DEVICE) * 3
        pos = torch.arange(lo, lo + q, device=DEVICE)[None].expand(b, q)
        layer.append(k, v, pos)
        layer.note_padding(False)
        layer.flush()
        lo += q
    return layer


@needs_kernel
@pytest.mark.parametrize("bits,residual,d", [(2, 128, 64), (4, 32, 128), (2, 0, 128), (4, 0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dequantisation_equals_the_torch_path(bits, residual, d, dtype, monkeypatch):
    layer = _layer(bits, residual, d, [100, 190, 45], dtype)
    n, nk, nv = layer._uniform()
    assert nk > 0 and nv > 0 and nk < n
    monkeypatch.setattr(kivi, "CPU_INTERPRET", True)
    calls = []
    real = kivi.kivi_kernels.dequantize_into
    monkeypatch.setattr(kivi.kivi_kernels, "dequantize_into", lambda *a: calls.append(1) or real(*a))
    fast_k, fast_v = layer._dense(n, nk, nv)
    assert len(calls) == 1  # keys and values in one launch
    monkeypatch.setattr(kivi, "CPU_INTERPRET", False)
    monkeypatch.setattr(kivi.kivi_kernels, "triton", None)  # the torch path
    slow_k, slow_v = layer._dense(n, nk, nv)
    assert fast_k.dtype == dtype and fast_k.shape == (2, 3, n, d)
    assert torch.equal(fast_k, slow_k) and torch.equal(fast_v, slow_v)
    # and both are the layer's de-quantised view (the reference path)
    assert torch.allclose(fast_k.float(), layer.keys.float(), atol=1e-3, rtol=1e-3)
    assert torch.allclose(fast_v.float(), layer.values.float(), atol=1e-3, rtol=1e-3)


@needs_kernel
@pytest.mark.parametrize("bits,residual,d", [(2, 128, 64), (4, 32, 128), (2, 0, 128), (4, 0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_quantisation_equals_the_torch_path(bits, residual, d, dtype, monkeypatch):
    """Chunks (one wrapping the key ring) then decode tokens: the flushes' Triton kernels store
    what `quantize_groups` stores, byte for byte."""
    chunks = [100, 190, 45] + [1] * 40

    def run(kernels: bool):
        monkeypatch.setattr(kivi, "CPU_INTERPRET", kernels)
        calls = []
        real = kivi.kivi_kernels.quantize_from_rings
        monkeypatch.setattr(kivi.kivi_kernels, "quantize_from_rings", lambda *a: calls.append(1) or real(*a))
        layer = _layer(bits, residual, d, chunks, dtype)
        monkeypatch.undo()
        return layer, len(calls)

    fast, calls = run(True)
    slow, none = run(False)
    assert calls > 2 and none == 0
    assert fast._uniform() == slow._uniform() and fast._uniform()[2] > 0
    for name in ("_kq", "_kscale", "_kzero", "_vq", "_vscale", "_vzero"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.shape == b.shape and a.numel() > 0
        assert torch.equal(a, b), name


@needs_kernel
@pytest.mark.parametrize("bits,residual,d", [(2, 128, 64), (4, 32, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wide_ring_chunks_with_kernels_equal_the_torch_path(bits, residual, d, dtype, monkeypatch):
    """Chunks stored through `append_step` in compressing forwards (the rings hold every token at
    its own index; attention de-quantises the earlier tokens into them): with the Triton kernels and
    with the torch path, the same attention and the same store, chunk after chunk."""
    from pipeline.kv_cache import StepContext

    calls = []

    def run(kernels: bool):
        monkeypatch.setattr(kivi, "CPU_INTERPRET", kernels)
        if not kernels:  # the torch path on CUDA too
            monkeypatch.setattr(kivi.kivi_kernels, "triton", None)
        for name in ("dequantize_into", "quantize_from_rings"):
            real = getattr(kivi.kivi_kernels, name)
            counted = lambda *a, real=real, n=name: calls.append(n) or real(*a)  # noqa: E731
            monkeypatch.setattr(kivi.kivi_kernels, name, counted)
        torch.manual_seed(bits + d)
        b, h = 2, 3
        layer = QuantizedKVLayer(bits, 32, residual)
        seen, lo = [], 0
        for q in [100, 190, 45]:
            k = torch.randn(b, h, q, d, dtype=dtype, device=DEVICE)
            v = torch.randn(b, h, q, d, dtype=dtype, device=DEVICE) * 3
            pos = torch.arange(lo, lo + q, device=DEVICE)[None].expand(b, q)
            step = StepContext(cache=None, positions=pos, padded=False, compress=True)
            query = torch.randn(b, 2 * h, q, d, dtype=dtype, device=DEVICE)
            layer.append_step(k, v, step)
            seen.append(layer.attend(query, step, d**-0.5))
            layer.flush()
            seen += [getattr(layer, x).clone() for x in ("_kq", "_kscale", "_kzero", "_vq", "_vscale")]
            seen += [layer._vzero.clone(), layer.keys, layer.values]
            lo += q
        monkeypatch.undo()
        return seen

    fast = run(True)
    assert {"dequantize_into", "quantize_from_rings"} == set(calls)
    ran = len(calls)
    slow = run(False)
    assert len(calls) == ran and len(fast) == len(slow)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a.shape == b.shape and torch.equal(a, b), i
