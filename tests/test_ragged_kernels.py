"""The ragged decode kernel (policies/ragged_kernels.py) against its float32 reference.

The reference is checked against masked attention over the padded dense view. The Triton
kernel runs here on CPU tensors under Triton's interpreter when triton is installed
(`pip install 'triton>=3.6'`); the interpreter must be switched on before triton is first
imported, so `test_kernel_tests_under_the_interpreter` runs this file's kernel tests in a
child pytest with TRITON_INTERPRET=1. On the GPU, `python -m pipeline.bench.check_ragged`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.attention_math import grouped_attention, position_mask
from pipeline.kv_cache import EMPTY, StepContext
from policies import ragged_kernels as rk
from policies.ragged_heads import RaggedKVLayer

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(
    not (INTERPRETED and rk.triton_available()),
    reason="kernel tests run in a child pytest under TRITON_INTERPRET=1 "
    "(test_kernel_tests_under_the_interpreter), or on the GPU via pipeline.bench.check_ragged",
)


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
@pytest.mark.skipif(
    not rk.triton_available(), reason="triton is not installed (pip install 'triton>=3.6' to run the kernel)"
)
def test_kernel_tests_under_the_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))]
    cmd += ["-k", "kernel_ and not under_the_interpreter"]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary


def ragged_inputs(b, h, group, d, tail, max_len=150, seed=0, dtype=torch.float32, empty_tail=False):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, max_len + 1, (b, h), generator=g)
    lens[0, 0] = 0  # an empty segment
    lens[-1, -1] = max_len  # and a longest one
    n = int(lens.sum())
    flat_k = torch.randn(n, d, generator=g).to(dtype)
    flat_v = torch.randn(n, d, generator=g).to(dtype)
    # the tail as a strided view of a buffer with spare capacity, like SlotBuffer's
    cap = tail + 3
    tk = torch.randn(b, h, cap, d, generator=g).to(dtype)[:, :, :tail]
    tv = torch.randn(b, h, cap, d, generator=g).to(dtype)[:, :, :tail]
    tpos = None
    if empty_tail:
        tpos = torch.arange(tail, dtype=torch.int32).expand(b, h, tail).clone()
        tpos[0, :, : tail // 2] = EMPTY  # row 0 left-padded
    q = torch.randn(b, h * group, d, generator=g).to(dtype)
    return q, flat_k, flat_v, lens, tk, tv, tpos


def padded_attention(q, flat_k, flat_v, lens, tk, tv, tpos, scaling):
    """Independent check of the reference: masked SDPA over the padded dense view."""
    b, h = lens.shape
    width = int(lens.max())
    mask = torch.arange(width) < lens[..., None]
    k = flat_k.new_zeros((b, h, width, flat_k.shape[1]))
    v = flat_v.new_zeros((b, h, width, flat_v.shape[1]))
    k[mask], v[mask] = flat_k, flat_v
    pos = torch.full((b, h, width), 0, dtype=torch.int32).masked_fill(~mask, EMPTY)
    t = tk.shape[2]
    tail_pos = tpos if tpos is not None else torch.zeros((b, h, t), dtype=torch.int32)
    keys, values = torch.cat([k, tk], 2).float(), torch.cat([v, tv], 2).float()
    attend = position_mask(torch.cat([pos, tail_pos], -1), torch.full((b, 1), 10**6), heads_differ=True)
    out = grouped_attention(q[:, :, None].float(), keys, values, attend, scaling)[:, :, 0]
    empty = ~attend.any(-1).any(-1)  # (row, head) with no token: the reference gives zeros
    return out.masked_fill(empty.repeat_interleave(q.shape[1] // h, 1)[..., None], 0.0)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("tail", [0, 5])
def test_reference_matches_masked_attention_over_the_padded_view(group, tail):
    q, fk, fv, lens, tk, tv, tpos = ragged_inputs(3, 2, group, 32, tail, empty_tail=tail > 0)
    ref = rk.ragged_decode_reference(q, fk, fv, lens, tk, tv, tpos, 0.2)
    assert torch.allclose(ref, padded_attention(q, fk, fv, lens, tk, tv, tpos, 0.2), atol=1e-5)


def run_kernel(q, fk, fv, lens, tk, tv, tpos, scaling, chunk=None):
    flat = lens.reshape(-1)
    offsets = torch.cumsum(flat, 0) - flat
    return rk.ragged_decode_attention(
        q, fk, fv, offsets, flat.to(torch.int32), int(lens.max()), tk, tv, tpos, scaling, chunk=chunk
    )


def rel_err(out, ref):
    return float((out.float() - ref).norm() / ref.norm())


@kernel_test
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("tail", [0, 7])
@pytest.mark.parametrize("chunk", [None, 64])
def test_kernel_matches_reference(group, d, tail, chunk):
    q, fk, fv, lens, tk, tv, _ = ragged_inputs(2, 3, group, d, tail, seed=d + tail + group)
    ref = rk.ragged_decode_reference(q, fk, fv, lens, tk, tv, None, d**-0.5)
    out = run_kernel(q, fk, fv, lens, tk, tv, None, d**-0.5, chunk)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-5
    assert float(out[0, :group].abs().max()) == 0.0 or tail > 0  # empty segment, no tail: zeros


@kernel_test
@pytest.mark.parametrize("chunk", [None, 8])
def test_kernel_masks_empty_tail_slots(chunk):
    q, fk, fv, lens, tk, tv, tpos = ragged_inputs(2, 2, 4, 64, 20, max_len=40, seed=3, empty_tail=True)
    ref = rk.ragged_decode_reference(q, fk, fv, lens, tk, tv, tpos, 0.125)
    out = run_kernel(q, fk, fv, lens, tk, tv, tpos, 0.125, chunk)
    assert rel_err(out, ref) < 1e-5


@kernel_test
def test_kernel_half_precision_inputs():
    # float16: the interpreter's tl.dot gives garbage for bfloat16 operands (triton 3.9 on CPU);
    # bfloat16 is checked on the GPU by pipeline.bench.check_ragged
    q, fk, fv, lens, tk, tv, _ = ragged_inputs(2, 2, 4, 64, 3, seed=5, dtype=torch.float16)
    ref = rk.ragged_decode_reference(q, fk, fv, lens, tk, tv, None, 0.125)
    out = run_kernel(q, fk, fv, lens, tk, tv, None, 0.125, chunk=64)
    assert out.dtype == torch.float16 and rel_err(out, ref) < 1e-2


def compressed_layer(padded_prompt: bool, compress: bool):
    """A RaggedKVLayer after a (left-padded) prompt, optionally compressed to ragged heads."""
    b, h, s, d = 2, 2, 40, 64
    g = torch.Generator().manual_seed(11)
    keys, values = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)
    pos = torch.arange(s).expand(b, s).clone()
    if padded_prompt:
        pos[0, :10] = EMPTY
        pos[0, 10:] = torch.arange(s - 10)
    layer = RaggedKVLayer()
    layer.append(keys, values, pos)
    layer.note_padding(padded_prompt)
    if compress:
        index = torch.stack([torch.randperm(30, generator=g)[:20].sort().values + 10 for _ in range(b * h)])
        filled = torch.ones(b, h, 20, dtype=torch.bool)
        filled[0, 1, 5:] = False
        filled[1, 0, :] = False  # a head that keeps nothing
        layer.keep(index.reshape(b, h, 20), filled)
    return layer, pos[:, -1:] + 1


@kernel_test
@pytest.mark.parametrize(("padded_prompt", "compress"), [(False, True), (True, True), (True, False)])
def test_kernel_layer_decode_path_equals_masked_path(padded_prompt, compress, monkeypatch):
    monkeypatch.setattr(rk, "CPU_INTERPRET", True)  # the pipeline interprets nothing on its own
    layer, next_pos = compressed_layer(padded_prompt, compress)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # decode steps: the tail grows in place
        layer.append(torch.randn(2, 2, 1, 64, generator=g), torch.randn(2, 2, 1, 64, generator=g), next_pos)
        layer.note_padding(False)
        step = StepContext(cache=None, positions=next_pos, padded=False)
        q = torch.randn(2, 8, 1, 64, generator=g)
        assert rk.usable(q, 64)
        out = layer.attend(q, step, 0.125)
        assert rel_err(out, layer.attend_masked(q, step, 0.125)) < 1e-5
        next_pos = next_pos + 1


def test_layer_caches_segment_index_at_compression():
    layer, _ = compressed_layer(padded_prompt=True, compress=True)
    assert layer.max_seg == 20 and layer.has_empty is False
    lens = layer.seg_lens.reshape(-1)
    assert layer.seg_offsets.tolist() == (torch.cumsum(lens, 0) - lens).tolist()
    assert layer.seg_lens32.dtype == torch.int32 and layer.get_seq_length() == 20
    layer.select_rows(torch.tensor([1]))
    assert layer.max_seg == 20 and layer.seg_offsets.tolist() == [0, 0]
