"""The fused window-attention sums (policies/window_kernels.py) against float64 torch and the policies' path.

The Triton kernels run here on CPU tensors under Triton's interpreter (tests/conftest.py turns it on
before triton is first imported, on a machine without a GPU). On the GPU the policies call them
through `signals.received_attention`.
"""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.kv_cache import EMPTY, KVLayer, StepContext
from policies import make_policy, signals
from policies import window_kernels as wk
from policies.signals import attention_probs, received_attention

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(
    not (INTERPRETED and wk.triton_available()),
    reason="needs triton, and TRITON_INTERPRET=1 from before triton's first import (tests/conftest.py)",
)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(wk, "CPU_INTERPRET", True)  # the pipeline interprets nothing on its own
    monkeypatch.setattr(signals, "FUSED_MIN_BYTES", 0)  # these tests' sizes are small


def inputs(b, kv_heads, group, s, w, d=16, seed=0, padded=False, holes=False):
    """Random keys/queries; the queries are each row's last w tokens. `padded`: row 1 is left-padded
    (empty slots, and its first window query is padding); `holes`: heads hold different positions,
    with empty slots among them (a compressed layer's)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, kv_heads, s, d, generator=g)
    queries = torch.randn(b, kv_heads * group, w, d, generator=g)
    pos = torch.arange(s).repeat(b, 1)
    if padded:
        pad = w // 2 + 1
        pos[1, :pad] = EMPTY
        pos[1, pad:] = torch.arange(s - pad)
    qpos = pos[:, -w:].clone()
    slots = pos[:, None, :].expand(b, kv_heads, s).to(torch.int32).clone()
    if holes:
        drop = torch.rand(b, kv_heads, s, generator=g) < 0.3
        drop[..., -w:] = False  # the queries' own tokens stay
        slots[drop] = EMPTY
    return keys, queries, qpos, slots


CASES = [
    # (b, kv heads, group, slots, window): one block and many, GQA groups of 1, 3 (not a power
    # of two) and 4, a window of 1 (tova's), a window that is not a power of two
    (1, 1, 1, 10, 1),
    (2, 2, 3, 50, 7),
    (1, 2, 4, 70, 32),
    (2, 1, 2, 33, 16),
]


@kernel_test
@pytest.mark.parametrize(
    ("case", "kind"),
    [(c, k) for c in CASES for k in ("plain", "padded", "holes") if k != "padded" or c[0] > 1],
)
def test_kernel_sums_equal_float64_softmax_sums(case, kind, interpret):
    b, h, group, s, w = case
    keys, queries, qpos, slots = inputs(b, h, group, s, w, padded=kind == "padded", holes=kind == "holes")
    assert wk.usable(keys, queries)
    out = wk.window_sums(keys, queries, qpos, slots, 0.3)
    ref = wk.window_sums_reference(keys, queries, qpos, slots, 0.3)
    assert out.shape == (b, h * group, s) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5), (out.double() - ref).abs().max()
    # every real query hands out exactly one unit of attention; a padding query none
    real = (qpos != EMPTY).sum(-1).double()  # [b]
    assert torch.allclose(out.double().sum(-1), real[:, None].expand(b, h * group), atol=1e-4)


@kernel_test
@pytest.mark.parametrize("kind", ["plain", "padded", "holes"])
def test_kernel_received_attention_is_the_policies_torch_path(kind, interpret):
    """Through a layer, as the policies call it: the torch path's sums (kernel off) again."""
    keys, queries, qpos, slots = inputs(2, 2, 3, 40, 8, padded=kind == "padded", holes=kind == "holes")
    layer = KVLayer()
    layer.append(keys, keys + 1.0, slots[:, 0])
    layer.positions = slots
    layer.has_empty = kind != "plain"
    layer.heads_differ = kind == "holes"
    fused = received_attention(layer, queries, qpos, 0.3)
    torch_path = attention_probs(layer, queries, qpos, 0.3).sum(dim=2)
    assert torch.allclose(fused, torch_path, atol=1e-5, rtol=1e-5)


@kernel_test
@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "spindlekv"])
def test_kernel_policies_keep_the_same_tokens_with_the_fused_sums(name, interpret, monkeypatch):
    """One-shot compression of a 3-row layer with the fused sums and with the torch path: the budget
    (48) exceeds the window (32), so the sums choose what else is kept."""

    calls = []
    sums = wk.window_sums
    monkeypatch.setattr(wk, "window_sums", lambda *a: calls.append(1) or sums(*a))

    def compress(fused: bool):
        monkeypatch.setattr(wk, "CPU_INTERPRET", fused)
        policy = make_policy(name)
        layer = policy.make_layer()
        keys, queries, qpos, _ = inputs(3, 2, 2, 96, 96, d=16, seed=4)
        layer.append(keys, keys * 0.5, qpos)
        layer.note_padding(False)
        step = StepContext(
            cache=None, positions=qpos, compress=True, row_budgets=torch.tensor([48, 48, 48]), padded=False
        )
        step.extras["spindlekv_spent"] = (4, torch.zeros(3, dtype=torch.int64))
        policy.compress_layer(layer, queries, step, 4, 8, 0.25)
        return layer

    fused = compress(True)
    assert calls, "the fused sums were not used"
    plain = compress(False)
    assert len(calls) == 1
    got = fused.kept_positions() if hasattr(fused, "kept_positions") else fused.positions
    want = plain.kept_positions() if hasattr(plain, "kept_positions") else plain.positions
    assert torch.equal(got, want)


@kernel_test
def test_kernel_small_calls_take_the_torch_path(monkeypatch):
    """Below `FUSED_MIN_BYTES` of probabilities the launches' host time would outweigh the saving."""
    monkeypatch.setattr(wk, "CPU_INTERPRET", True)
    calls = []
    monkeypatch.setattr(wk, "window_sums", lambda *a: calls.append(1))
    keys, queries, qpos, slots = inputs(1, 2, 2, 64, 8)
    layer = KVLayer()
    layer.append(keys, keys, torch.arange(64)[None])
    layer.note_padding(False)
    received_attention(layer, queries, qpos, 0.3)
    assert not calls
    monkeypatch.setattr(signals, "FUSED_MIN_BYTES", 1 * 4 * 8 * 64 * 4)  # exactly this call's bytes
    received_attention(layer, queries, qpos, 0.3)
    assert calls
