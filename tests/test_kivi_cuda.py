"""The KIVI CUDA decode kernel (`policies.kivi_cuda`).

On any machine: its source compiles with NVRTC for Ampere and Hopper, for every shape the
pipeline sends it (libnvrtc from the `nvidia-cuda-nvrtc` wheel, which the test extra installs; the
test skips where no libnvrtc is found), and `decode_attention` only routes stores the kernel
supports to it. On a CUDA GPU: the kernel against the float64 reference on ragged stores (padded
rows, partial blocks, heads whose residual rings differ, empty splits), poisoned outputs first.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import pytest
import torch

from pipeline import cuda_rtc
from policies import kivi_cuda
from policies.kivi_kernels import KiviStore, decode_attention, decode_attention_reference

SHAPES = [(128, 4, 32), (128, 1, 32), (128, 8, 32), (64, 3, 32), (64, 1, 16), (128, 4, 16)]


def _nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel, else None."""
    roots = [p for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))]
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "nvidia", "**", "libnvrtc.so*"), recursive=True)):
            if "builtins" not in path:
                try:
                    return ctypes.CDLL(path)
                except OSError:
                    continue
    return None


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim,group,value_group", SHAPES)
def test_source_compiles(arch, head_dim, group, value_group):
    lib = _nvrtc()
    if lib is None:
        pytest.skip("no libnvrtc here (the nvidia-cuda-nvrtc wheel is not installed)")
    defines = dict(HEAD_DIM=head_dim, GROUP=group, GV=value_group, MIN_WARPS=kivi_cuda.MIN_WARPS)
    cubin = cuda_rtc.compile_cubin(kivi_cuda.SOURCE, kivi_cuda.KERNEL, arch, defines, nvrtc=lib)
    assert cubin[:4] == b"\x7fELF" and kivi_cuda.KERNEL.encode() in cubin


def test_broken_source_reports_the_compiler_log():
    lib = _nvrtc()
    if lib is None:
        pytest.skip("no libnvrtc here")
    source = 'extern "C" __global__ void k() { undefined_thing(); }'
    with pytest.raises(cuda_rtc.CudaRtcError, match="undefined"):
        cuda_rtc.compile_cubin(source, "k", "sm_90", {}, nvrtc=lib)


def test_stage_bytes_fit_twelve_warps_per_sm():
    """The shared memory a warp stages a block in leaves room for MIN_WARPS one-warp programs per SM
    (an H100/H200 SM has 227 KiB, 1 KiB of it reserved per program)."""
    for d in (64, 128):
        per_program = kivi_cuda.stage_bytes(d, 32) + 1024
        assert kivi_cuda.MIN_WARPS * per_program <= 227 * 1024, (d, per_program)


def test_cpu_queries_never_take_the_cuda_kernel():
    q = torch.zeros((1, 4, 1, 128), dtype=torch.bfloat16)
    assert not kivi_cuda.supported(q, 128, 4, 2, 32, 32)


# -- on a CUDA GPU --------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_rtc.available(torch.device("cuda"))),
    reason="needs a CUDA GPU (sm_80+) with NVRTC",
)


def _store(b, h, d, gv, lengths, gen) -> KiviStore:
    """A store whose (row, head)s hold `lengths` tokens: keys quantised in whole 32-token groups up
    to a per-head point, values up to another, the rest in the rings."""
    dev = "cuda"
    n = torch.tensor(lengths, dtype=torch.int64).reshape(b, h)
    nk = (n - torch.randint(0, 128, (b, h), generator=gen)).clamp(min=0) // 32 * 32
    nv = (n - torch.randint(128, 160, (b, h), generator=gen)).clamp(min=0) // 32 * 32
    top = int(n.max()) + 160
    groups = top // 32 + 2

    def bf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=gen) * scale + shift).to(torch.bfloat16).to(dev)

    def u8(*shape):
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(dev)

    return KiviStore(
        n.to(dev), nk.to(dev), nv.to(dev),
        u8(b, h, groups, d, 8), bf(b, h, groups, d, scale=0.3).abs(), bf(b, h, groups, d, shift=-1.0),
        bf(b, h, 128, d), u8(b, h, top, d // 4),
        bf(b, h, top, d // gv, scale=0.3).abs(), bf(b, h, top, d // gv, shift=-0.5), bf(b, h, 160, d),
        2, 32,
    )  # fmt: skip


@needs_cuda
@pytest.mark.parametrize("head_dim,group,value_group", SHAPES)
def test_kernel_matches_the_float64_reference(head_dim, group, value_group):
    gen = torch.Generator().manual_seed(head_dim * 10 + group)
    b, h = 3, 2
    lengths = [5000, 128, 4097, 300, 129, 2222][: b * h]
    store = _store(b, h, head_dim, value_group, lengths, gen)
    assert kivi_cuda.aligned(store)
    q = torch.randn((b, h * group, 1, head_dim), generator=gen).to(torch.bfloat16).cuda()
    scaling = head_dim**-0.5
    ref = decode_attention_reference(q.double(), store, scaling, torch.float64)
    for splits in (None, 1, 7):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, store, scaling, max_tokens=max(lengths), num_splits=splits, out=out, impl="cuda")
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (splits, err)
        triton_out = decode_attention(q, store, scaling, max_tokens=max(lengths), impl="triton")
        assert ((out.double() - triton_out.double()).norm() / ref.norm()).item() < 1e-2


@needs_cuda
def test_capacity_bound_grid_skips_empty_splits():
    """A grid sized for far more tokens than any head holds (as a captured decode step's is): the
    splits past every length write empty parts and the result is unchanged."""
    gen = torch.Generator().manual_seed(7)
    store = _store(2, 2, 128, 32, [1000, 333, 640, 129], gen)
    q = torch.randn((2, 8, 1, 128), generator=gen).to(torch.bfloat16).cuda()
    tight = decode_attention(q, store, 0.1, max_tokens=1000, impl="cuda")
    store.kq = torch.cat([store.kq, torch.zeros_like(store.kq)], dim=2)  # room for 2x the tokens
    store.kscale = torch.cat([store.kscale, store.kscale], dim=2)
    store.kzero = torch.cat([store.kzero, store.kzero], dim=2)
    loose = decode_attention(q, store, 0.1, max_tokens=store.kq.shape[2] * 32, impl="cuda")
    assert torch.isfinite(loose).all()
    torch.testing.assert_close(loose.float(), tight.float(), rtol=1e-2, atol=1e-3)  # other split bounds
