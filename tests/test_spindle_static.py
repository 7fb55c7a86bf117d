"""SpindleKV's static-shape decode step (`pipeline.decode_graph`) against its dynamic step, on CPU.

The static step writes a decode token at the device-held counts and attends over the whole
buffers with lengths read on the device; run eagerly ("static" mode) it must give the logits of
the dynamic step ("eager" mode) at every step, store the same bytes, and hand over to the dynamic
step when the buffers are full or rows leave the batch.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.generate import GenerationConfig, Generator  # noqa: E402
from pipeline.kv_cache import EMPTY  # noqa: E402
from policies import Budget, make_policy  # noqa: E402
from policies import spindle_kernels as sk  # noqa: E402
from policies.spindlekv import SpindleLayer, rope, rope_one  # noqa: E402
from tests.conftest import prefilled  # noqa: E402

PROMPTS = [list(range(300, 360)), list(range(400, 420)), list(range(500, 545))]  # left padding
# low thresholds so that decode tokens both join entries and open new ones
PARAMS = [{}, {"rope_theta": 10000.0, "theta_k": 0.3, "theta_v": 0.3}]


def _generator(model, tok, mode, params):
    return Generator(model, tok, make_policy("spindlekv", **params), Budget(ratio=0.4), decode_mode=mode)


@torch.inference_mode()  # as `Generator.generate` runs (Triton's interpreter writes its arguments back)
def _decode(model, tok, mode, params, steps):
    gen = _generator(model, tok, mode, params)
    cache, logits, budgets, next_pos = prefilled(gen, PROMPTS, steps)
    assert {layer.mode for layer in cache.layers} == {"codebook", "evicted"}
    seen = []
    for _ in range(steps):
        tokens = logits.argmax(-1)
        logits = gen.decode_step(cache, tokens, next_pos, budgets).clone()
        next_pos = next_pos + 1
        seen.append(logits)
    return torch.stack(seen), cache, gen.decode.counts


@torch.inference_mode()
def _stored(layer: SpindleLayer) -> dict:
    """What a layer's views hold, per live slot (dead slots past a head's length are not data)."""
    n = layer._n
    live = torch.arange(layer._pos.shape[2]) < n[..., None]
    out = {"_n": n, "kbook_n": layer.kbook_n, "vbook_n": layer.vbook_n, "_pos": layer._pos}
    for name in ("rk", "rv", "mk", "mv"):
        t = getattr(layer, name)
        if t is not None:
            out[name] = torch.where(live, t, torch.zeros_like(t))
    for name, count in (("kbook", layer.kbook_n), ("vbook", layer.vbook_n)):
        book = getattr(layer, name)
        used = torch.arange(book.shape[2]) < count[..., None]
        out[name] = torch.where(used[..., None], book, torch.zeros_like(book))
    return out


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("interpret_kernel", [False, True])
def test_static_step_equals_dynamic_step(tiny_llama, monkeypatch, params, interpret_kernel):
    """Logits of every step, the tokens and every stored tensor, with padded rows and both modes."""
    if interpret_kernel:
        if not (sk.HAVE_TRITON and sk.interpreter_works()):
            pytest.skip("the Triton kernels run on CPU under TRITON_INTERPRET=1 only")
        monkeypatch.setattr(sk, "CPU_INTERPRET", True)
    model, tok = tiny_llama
    steps = 5
    dyn, dyn_cache, dyn_counts = _decode(model, tok, "eager", params, steps)
    sta, sta_cache, sta_counts = _decode(model, tok, "static", params, steps)
    assert dyn_counts["eager"] == 0 and sta_counts["eager"] == steps  # each took its own path
    torch.testing.assert_close(sta, dyn, rtol=1e-4, atol=1e-4)
    assert torch.equal(sta.argmax(-1), dyn.argmax(-1))
    for a, b in zip(sta_cache.layers, dyn_cache.layers):
        assert a.mode == b.mode and a.slots_used == b.slots_used
        for (name, x), y in zip(_stored(a).items(), _stored(b).values()):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_decode_write_equals_the_general_append(tiny_llama):
    """The in-place decode writer stores what `append`'s general path (reallocating) stores."""
    model, tok = tiny_llama
    params = PARAMS[1]
    gen = _generator(model, tok, "eager", params)
    cache, *_ = prefilled(gen, PROMPTS, 4)
    g = torch.Generator().manual_seed(3)
    for layer in cache.layers:
        b, hk, d = layer.kbook.shape[0], layer.kbook.shape[1], layer.kbook.shape[-1]
        other = SpindleLayer.__copy__(layer)
        for name in ("_n", "kbook_n", "vbook_n"):  # counts advance in place: give the copy its own
            setattr(other, name, getattr(layer, name).clone())
        other._bufs = {name: buf.clone() for name, buf in layer._bufs.items()}
        for name in SpindleLayer._GROWN:
            if getattr(layer, name) is not None:
                setattr(other, name, other._bufs[name][:, :, : getattr(layer, name).shape[2]])
        for step in range(3):
            k, v = torch.randn(2, b, hk, 1, d, generator=g)
            k = torch.where(torch.rand(b, hk, 1, 1, generator=g) < 0.5, layer.kbook[:, :, :1] * 2, k)
            pos = torch.tensor([[60 + step], [EMPTY], [60 + step]])  # a padding row too
            assert layer._room_for_decode()
            layer.append(k, v, pos)  # the in-place writer
            other._bufs = {}  # no buffer: the general path, which reallocates
            other.append(k, v, pos)
            for (name, x), y in zip(_stored(layer).items(), _stored(other).values()):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_evicted_append_kernel_stores_what_the_torch_writer_stores(tiny_llama, monkeypatch):
    """An eviction layer's decode token through `spindle_append.evicted_append` (one launch; the
    interpreter here) writes every buffer byte and count the torch writer does, padding rows too."""
    if not (sk.HAVE_TRITON and sk.interpreter_works()):
        pytest.skip("the Triton kernels run on CPU under TRITON_INTERPRET=1 only")
    model, tok = tiny_llama
    gen = _generator(model, tok, "eager", PARAMS[0])
    cache, *_ = prefilled(gen, PROMPTS, 4)
    layers = [layer for layer in cache.layers if layer.mode == "evicted"]
    assert layers and any(layer.mb is not None for layer in layers)  # GQA: member bits written too
    g = torch.Generator().manual_seed(5)
    for layer in layers:
        b, hk, d = layer.kbook.shape[0], layer.kbook.shape[1], layer.kbook.shape[-1]
        other = SpindleLayer.__copy__(layer)
        for name in ("_n", "kbook_n", "vbook_n"):
            setattr(other, name, getattr(layer, name).clone())
        other._bufs = {name: buf.clone() for name, buf in layer._bufs.items()}
        for step in range(3):
            k, v = torch.randn(2, b, hk, 1, d, generator=g)
            pos = torch.tensor([[70 + step], [EMPTY], [70 + step]])
            monkeypatch.setattr(sk, "CPU_INTERPRET", True)
            with torch.inference_mode():
                layer._decode_write(k, v, pos)
            monkeypatch.setattr(sk, "CPU_INTERPRET", False)
            other._decode_write(k, v, pos)
            for name in ("_n", "kbook_n", "vbook_n"):
                assert torch.equal(getattr(layer, name), getattr(other, name)), name
            for name, buf in layer._bufs.items():
                assert torch.equal(buf, other._bufs[name]), name


def test_rows_leaving_and_full_buffers_hand_over(tiny_llama):
    """generate() with a row that stops mid-decode gives the eager tokens; when the reserved room is
    spent, the dynamic step takes over and still matches."""
    model, tok = tiny_llama
    eager, static = (_generator(model, tok, mode, PARAMS[1]) for mode in ("eager", "static"))
    cfg = GenerationConfig(max_new_tokens=8)
    first, _ = eager.generate(PROMPTS, cfg)
    stop = first[1].output_ids[2]  # row 1 stops after 2 tokens: the batch shrinks mid-decode
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,))
    a, _ = eager.generate(PROMPTS, cfg)
    b, _ = static.generate(PROMPTS, cfg)
    assert [r.output_ids for r in b] == [r.output_ids for r in a]
    assert "stop" in [r.finish_reason for r in a]
    assert static.decode.counts["eager"] == 7 and eager.decode.counts["eager"] == 0  # every step static

    # past the reserved room: static steps while it lasts, then the dynamic step
    steps = 4
    sta_gen, dyn_gen = (_generator(model, tok, mode, PARAMS[1]) for mode in ("static", "eager"))
    outs = []
    for gen in (sta_gen, dyn_gen):
        cache, logits, budgets, next_pos = prefilled(gen, PROMPTS, 2)  # room for 2 decode tokens
        seen = []
        with torch.inference_mode():
            for _ in range(steps):
                logits = gen.decode_step(cache, logits.argmax(-1), next_pos, budgets).clone()
                next_pos = next_pos + 1
                seen.append(logits)
        outs.append(torch.stack(seen))
    assert 0 < sta_gen.decode.counts["eager"] < steps
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_rope_one_is_rope():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 1, 16, generator=g)
    pos = torch.tensor([[0], [5], [40000]])
    for inverse in (False, True):
        want = rope(x, pos[:, None, :].expand(3, 2, 1), 10000.0, inverse=inverse)
        torch.testing.assert_close(rope_one(x, pos, 10000.0, inverse=inverse), want, rtol=0, atol=1e-6)


# The fused match runs where the codebook kernel takes its tensor-core path: half-precision storage
# without RoPE re-rotation. Low thresholds: decode tokens both join entries and open new ones.
FUSED_PARAMS = {"theta_k": 0.3, "theta_v": 0.3}


@pytest.fixture(params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def half_llama(request, monkeypatch):
    """The tiny Llama (same weights) in a half dtype, kernels interpreted on CPU; for bf16 the
    interpreter's dot takes the operands' values (conftest)."""
    from pipeline.models import load_model

    if not (sk.HAVE_TRITON and sk.interpreter_works()):
        pytest.skip("the Triton kernels run on CPU under TRITON_INTERPRET=1 only")
    if request.param == torch.bfloat16:
        request.getfixturevalue("bf16_interpreter_dot")
    monkeypatch.setattr(sk, "CPU_INTERPRET", True)
    return load_model("tiny-llama", dtype=request.param)


def _count_fused(monkeypatch) -> list:
    calls = []
    real = sk.match_partials
    monkeypatch.setattr(sk, "match_partials", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _half_tol(dtype) -> dict:
    """Two units of the dtype's precision (eps 2**-7 bf16, 2**-10 fp16): the two runs' hidden states
    may differ in the last bits (their attention sums in another order; measured: logits 0.6 eps)."""
    eps = torch.finfo(dtype).eps
    return {"rtol": 2 * eps, "atol": 2 * eps}


def _assert_same_storage(a_cache, b_cache, dtype) -> None:
    """Counts and indices equal; books and magnitudes within the storage dtype's rounding."""
    tol = _half_tol(dtype)
    for x_layer, y_layer in zip(a_cache.layers, b_cache.layers):
        assert x_layer.mode == y_layer.mode
        for (name, x), y in zip(_stored(x_layer).items(), _stored(y_layer).values()):
            exact = not x.is_floating_point() or name == "_pos"
            torch.testing.assert_close(x, y, **({"rtol": 0, "atol": 0} if exact else tol), msg=name)


def test_fused_match_stores_and_attends_as_the_separate_match(half_llama, monkeypatch):
    """Codebook layers with the match folded into the attention kernel's tensor-core path decode as
    with the separate match (`best_match`, then attention over the stored token): the same tokens,
    entries and counts; logits and stored vectors within half-precision rounding."""
    from policies import spindlekv

    model, tok = half_llama
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # GQA: the fused kernel
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(spindlekv, "FUSED_MATCH", fused)
        calls = _count_fused(monkeypatch)
        runs.append(_decode(model, tok, "static", FUSED_PARAMS, 4))
        assert bool(calls) == fused
    (a, a_cache, _), (b, b_cache, _) = runs
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    torch.testing.assert_close(a.float(), b.float(), **_half_tol(model.dtype))
    _assert_same_storage(a_cache, b_cache, model.dtype)


def test_static_step_equals_dynamic_step_with_the_fused_match(half_llama, monkeypatch):
    from policies import spindlekv

    monkeypatch.setattr(spindlekv, "FUSED_MATCH", True)
    calls = _count_fused(monkeypatch)
    model, tok = half_llama
    dyn, dyn_cache, _ = _decode(model, tok, "eager", FUSED_PARAMS, 4)
    sta, sta_cache, counts = _decode(model, tok, "static", FUSED_PARAMS, 4)
    assert counts["eager"] == 4 and calls
    assert torch.equal(sta.argmax(-1), dyn.argmax(-1))
    torch.testing.assert_close(sta.float(), dyn.float(), **_half_tol(model.dtype))
    _assert_same_storage(sta_cache, dyn_cache, model.dtype)


@pytest.mark.parametrize("dtype,params", [(torch.float32, FUSED_PARAMS), (torch.float16, PARAMS[1])])
def test_fused_match_only_on_the_tensor_core_path(monkeypatch, dtype, params):
    """float32 storage, or keys re-rotated by RoPE: the codebook kernel's float32 path, and the decode
    append matches apart even with FUSED_MATCH on."""
    from pipeline.models import load_model
    from policies import spindlekv

    if not (sk.HAVE_TRITON and sk.interpreter_works()):
        pytest.skip("the Triton kernels run on CPU under TRITON_INTERPRET=1 only")
    monkeypatch.setattr(sk, "CPU_INTERPRET", True)
    monkeypatch.setattr(spindlekv, "FUSED_MATCH", True)
    calls = _count_fused(monkeypatch)
    model, tok = load_model("tiny-llama", dtype=dtype)
    _decode(model, tok, "static", params, 2)
    assert not calls
