"""KIVI's static-shape decode step (`pipeline.decode_graph`) against its dynamic step, on CPU.

The static step writes a decode token at each (row, head)'s device-held count, attends with the
fused kernel over the whole buffers (counts read on the device, grid sized by capacity), and
leaves the flushes to `prepare_static`, which runs eagerly before every step and advances the
counts in place. Run eagerly ("static" mode, the fused kernels under Triton's interpreter) it
must give the logits of the dynamic step ("eager" mode) at every step, store the same bytes, keep
every tensor a captured graph holds (so one capture serves every step, flushes included), and
hand over to the dynamic step when it cannot serve.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from pipeline.decode_graph import _Captured, _key  # noqa: E402
from pipeline.generate import GenerationConfig, Generator  # noqa: E402
from pipeline.kv_cache import EMPTY, StepContext  # noqa: E402
from pipeline.triton_gate import interpreting  # noqa: E402
from policies import Budget, kivi, kivi_kernels, make_policy  # noqa: E402
from policies.kivi import QuantizedKVLayer  # noqa: E402
from tests.conftest import prefilled  # noqa: E402

interpreted = pytest.mark.skipif(
    kivi_kernels.triton is None or not interpreting(),
    reason="the fused kernels run on CPU under TRITON_INTERPRET=1 only",
)
on_cuda = pytest.mark.skipif(
    kivi_kernels.triton is None or not torch.cuda.is_available() or interpreting(),
    reason="CUDA graphs: a CUDA device, kernels compiled (not interpreted)",
)

CPU = torch.device("cpu")
UNIFORM = [list(range(300, 360)), list(range(400, 460)), list(range(500, 560))]
PADDED = [list(range(300, 360)), list(range(400, 413)), list(range(500, 529))]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setattr(kivi, "CPU_INTERPRET", True)  # the pipeline never interprets on its own
    kivi_kernels._workspace(CPU, 1)  # exists before the first step: the keys below stay put


@pytest.fixture(scope="module")
def wide_llama(tiny_llama):
    """A tiny Llama with head_dim 64, the fused kernel's smallest at 2 bits (tiny-llama's 16 is below
    what it tiles: its kivi layers take the dynamic step, `test_decode_mode_switch`); one kv head of
    two query heads, as the interpreted kernel's time goes with rows x kv heads (the layer tests
    above take two)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipeline.models import TINY_LLAMA_SHAPES

    _, tok = tiny_llama
    shapes = dict(TINY_LLAMA_SHAPES, head_dim=64, num_hidden_layers=2, num_attention_heads=2)
    shapes["num_key_value_heads"] = 1
    config = LlamaConfig(
        vocab_size=len(tok), **shapes, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, tok


def _stored(layer: QuantizedKVLayer) -> dict:
    """What a layer stores, live parts only (dead ring slots and spare capacity are not data)."""
    store = layer._store_for_kernel()
    n, nk, nv = layer._n, layer._nk, layer._nv
    top = layer._pos_buf.shape[2] - 1
    keys, values = kivi_kernels.dequantized(store, top)  # token order: packed, then the rings
    groups = torch.arange(layer._kq_buf.shape[2]) < (nk // layer.group_size)[..., None]
    tokens = torch.arange(layer._vq_buf.shape[2]) < nv[..., None]
    live = torch.arange(top) < n[..., None]

    def masked(x, keep):
        return torch.where(keep.reshape(*keep.shape, *[1] * (x.dim() - 3)), x, torch.zeros_like(x))

    out = {"n": n, "nk": nk, "nv": nv, "keys": keys, "values": values}
    out["pos"] = torch.where(live, layer._pos_buf[:, :, :top], EMPTY)
    for name in ("_kq_buf", "_ks_buf", "_kz_buf"):
        out[name] = masked(getattr(layer, name), groups)
    for name in ("_vq_buf", "_vs_buf", "_vz_buf"):
        out[name] = masked(getattr(layer, name), tokens)
    out["shapes"] = torch.tensor([getattr(layer, x).shape[2] for x in ("_kring", "_vring", "_pos_buf")])
    return out


def _assert_same_store(a: QuantizedKVLayer, b: QuantizedKVLayer) -> None:
    for (name, x), y in zip(_stored(a).items(), _stored(b).values()):
        assert torch.equal(x, y), name


def _host_exact(layer: QuantizedKVLayer) -> bool:
    """The host's counts equal the device's (read here; the layer never read them back)."""
    dev = torch.stack([layer._n, layer._nk, layer._nv]).tolist()
    return dev == [layer._hn.tolist(), layer._hnk.tolist(), layer._hnv.tolist()]


# -- the layer alone: the static writes and flushes against `append` ---------------------------


def _layer_pair(bits, g, residual, lengths, room, d=64, h=2, seed=0, evict=False, step=False):
    """Two layers holding the same prefill (left-padded rows of `lengths`), flushed, `room` reserved;
    `evict`: each (row, head) then keeps every other slot (`keep`, as `snapkv+kivi` does); `step`:
    stored as the cache stores a compressing forward (`append_step`: equal lengths take the slices
    and the wide rings, and leave the device counts to catch up when next read)."""
    gen = torch.Generator().manual_seed(seed)
    b, width = len(lengths), max(lengths)
    k, v = torch.randn(2, b, h, width, d, generator=gen)
    pos = torch.stack([torch.cat([torch.full((width - n,), EMPTY), torch.arange(n)]) for n in lengths])
    index = torch.arange(0, width, 2).expand(b, h, -1)
    layers = []
    for _ in range(2):
        layer = QuantizedKVLayer(bits, g, residual)
        if step:
            padded = len(set(lengths)) > 1
            layer.append_step(k, v, StepContext(cache=None, positions=pos, padded=padded, compress=True))
        else:
            layer.append(k, v, pos)
            layer.note_padding(len(set(lengths)) > 1)
        if evict:  # the kept tokens go back to the rings (`_load_dense`)
            layer.keep(index, torch.gather(layer.positions, 2, index) != EMPTY)
        layer.flush()
        layer.reserve(room)
        layer._fits = True  # as `attend` finds for d = 64 (no attention here)
        layers.append(layer)
    return layers, torch.tensor(lengths)


@interpreted
@pytest.mark.parametrize(
    "bits,g,residual,lengths,evict,step",
    [
        (2, 8, 16, (40, 40), False, False),
        (2, 8, 16, (40, 40), False, True),
        (4, 4, 8, (40, 13, 29), False, False),
        (2, 4, 0, (21, 7), False, False),
        (2, 32, 128, (150, 150), False, False),
        (2, 32, 128, (150, 150), False, True),
        (2, 4, 8, (40, 40), True, False),
        (4, 8, 8, (40, 13, 29), True, False),
    ],
)
def test_static_writes_and_flushes_store_what_append_stores(bits, g, residual, lengths, evict, step):
    """Every step: `prepare_static` + `append_static` + `commit_static` store what `append` stores,
    byte for byte, across many key-block and value-group flushes; the host counts stay exact with no
    read-back; the step itself changes no host state and replaces no tensor (flushes included)."""
    steps = min(2 * (residual + g) + 5, 120)  # 120: a key block (128) and value groups at R 128
    (sta, dyn), next_pos = _layer_pair(bits, g, residual, lengths, steps, evict=evict, step=step)
    # (step: the device counts are behind until read, the first `prepare_static` included; its
    # flush then advances the host counts only, and `static_buffers` catches the device ones up)
    assert sta._counts_behind == step
    first = (sta._hnk.clone(), sta._hnv.clone())
    top = sta.slots_used
    b, h = sta._kring.shape[:2]
    gen = torch.Generator().manual_seed(1)
    held = None
    for _ in range(steps):
        k, v = torch.randn(2, b, h, 1, 64, generator=gen)
        pos = next_pos[:, None]
        dyn.append(k, v, pos)
        dyn.note_padding(False)
        sta.prepare_static()
        assert sta.static_decode_ready()
        held = held or [id(x) for x in sta.static_buffers()]
        host = (sta._hn, sta._hnk, sta._hnv, sta._uni, sta._lags())
        n = sta._n
        before = n.clone()
        sta.append_static(k, v, pos.to(torch.int32), torch.tensor([sta.slots_used]))
        assert (sta._hn, sta._hnk, sta._hnv, sta._uni, sta._lags()) == host  # no host state change
        assert sta._n is n and torch.equal(n, before + 1)  # advanced in place
        sta.commit_static()
        assert [id(x) for x in sta.static_buffers()] == held  # what a captured graph holds
        _assert_same_store(sta, dyn)
        next_pos = next_pos + 1
    assert (sta._nk > first[0] + g).all() and (sta._nv > first[1] + g).all()  # flushes happened
    assert _host_exact(sta) and sta._pending is None
    assert sta.slots_used == top + steps == dyn._n.max()
    assert (sta._uniform() is None) == (len(set(lengths)) > 1)


@interpreted
def test_no_room_no_kernel_or_slot_stats_means_the_dynamic_step():
    (layer, _), next_pos = _layer_pair(2, 8, 16, (30, 30), room=2)
    for _ in range(2):
        layer.prepare_static()
        assert layer.static_decode_ready()
        k = torch.randn(2, 2, 1, 64)
        layer.append_static(k, k, next_pos[:, None], None)
        layer.commit_static()
        next_pos = next_pos + 1
    layer.prepare_static()
    assert not layer.static_decode_ready()  # the position buffer is full
    layer.append(k, k, next_pos[:, None])  # the dynamic step grows it (with spare)
    layer.note_padding(False)
    assert layer.static_decode_ready()
    layer._fits = False  # shapes the kernel does not tile
    assert not layer.static_decode_ready()
    layer._fits = True
    layer.slot_stats["acc"] = torch.zeros(2, 2, layer.slots_used)
    assert not layer.static_decode_ready()
    layer.slot_stats.clear()
    kivi.CPU_INTERPRET = False  # no kernel on CPU without the opt-in (the fixture restores it)
    assert not layer.static_decode_ready()


@interpreted
def test_a_due_flush_is_not_skipped():
    """Without `prepare_static` a step with a flush due is refused (its token would overwrite a ring
    slot still live), whatever room the rings have."""
    (layer, _), next_pos = _layer_pair(2, 8, 16, (31, 31), room=8)
    k = torch.randn(2, 2, 1, 64)
    layer.prepare_static()
    layer.append_static(k, k, next_pos[:, None], None)  # token 31: its key block is complete
    layer.commit_static()
    assert layer._flush_due() and not layer.static_decode_ready()
    layer._resize_ring("k", 64)  # room, but still due
    assert not layer.static_decode_ready()
    nk = layer._nk
    layer.prepare_static()
    assert layer._nk is nk and layer._nk.tolist() == [[32, 32]] * 2 and layer.static_decode_ready()


# -- the model: logits, stored bytes, the capture key, hand-overs ------------------------------


@torch.inference_mode()  # as `Generator.generate` runs (Triton's interpreter writes its arguments back)
def _decode(model, tok, mode, name, params, prompts, steps, room=None, leave_at=None, monkeypatch=None):
    """Greedy decode steps after a one-shot prefill; row 1 leaves before step `leave_at`."""
    gen = Generator(model, tok, make_policy(name, **params), Budget(ratio=0.5), decode_mode=mode)
    cache, logits, budgets, next_pos = prefilled(gen, prompts, steps if room is None else room)
    next_pos = next_pos.to(gen.device)
    after_prefill = [(layer._nk.clone(), layer._nv.clone()) for layer in cache.layers]
    calls = []
    if monkeypatch is not None:  # the fused kernel's host arguments, per call
        kernel = kivi_kernels.decode_attention

        def spy(query, store, scaling, max_tokens, **kw):
            ptrs = tuple(t.data_ptr() for t in (store.n, store.kq, store.kres, store.vq, store.vres))
            calls.append((max_tokens, ptrs))
            return kernel(query, store, scaling, max_tokens, **kw)

        monkeypatch.setattr(kivi_kernels, "decode_attention", spy)
    seen, keys = [], []
    for step in range(steps):
        if step == leave_at:
            keep = torch.tensor([0, 2], device=gen.device)
            cache.select_rows(keep)
            logits, budgets, next_pos = logits[keep], budgets[keep], next_pos[keep]
        logits = gen.decode_step(cache, logits.argmax(-1), next_pos, budgets).clone()
        next_pos = next_pos + 1
        seen.append(logits)
        keys.append(gen.decode._key)
    return seen, cache, dict(gen.decode.counts), keys, after_prefill, calls


CASES = [
    ("kivi", {"bits": 2, "group_size": 4, "residual": 4}, UNIFORM),  # equal counts: host slices
    ("kivi", {"bits": 4, "group_size": 4, "residual": 8}, PADDED),  # ragged counts: index tensors
]


@interpreted
@pytest.mark.parametrize("name,params,prompts", CASES)
def test_static_step_equals_dynamic_step(wide_llama, monkeypatch, name, params, prompts):
    """Every step's logits and tokens, every stored byte, flushes inside the decode, a row leaving
    mid-decode; every step static; the runner's capture key changes only where a row leaves."""
    model, tok = wide_llama
    steps, leave_at = 9, 6
    run = dict(name=name, params=params, prompts=prompts, steps=steps, leave_at=leave_at)
    dyn, dyn_cache, dyn_counts, *_ = _decode(model, tok, "eager", **run)
    sta, sta_cache, counts, keys, after_prefill, calls = _decode(
        model, tok, "static", **run, monkeypatch=monkeypatch
    )
    assert dyn_counts["eager"] == 0 and counts["eager"] == steps  # each took its own path
    for a, b in zip(sta, dyn):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    uniform = prompts is UNIFORM and name == "kivi"
    for a, b, (nk, nv) in zip(sta_cache.layers, dyn_cache.layers, after_prefill):
        assert (a._uniform() is not None) == uniform
        _assert_same_store(a, b)
        assert _host_exact(a)
        kept = torch.tensor([0, 2])
        assert (a._nk > nk[kept]).all() and (a._nv > nv[kept]).all()  # flushed while decoding
    # one capture key before the row leaves, one after: flushes replaced no tensor a graph holds
    assert len(set(keys[:leave_at])) == 1 and len(set(keys[leave_at:])) == 1 and keys[0] != keys[-1]
    # and the kernel's host arguments (grid bound, buffers) were the same at every step of a key
    layers = len(sta_cache.layers)
    for lo, hi in ((0, leave_at), (leave_at, steps)):
        for i in range(layers):
            assert len({calls[s * layers + i] for s in range(lo, hi)}) == 1
    assert calls[0][0] == sta_cache.layers[0]._pos_buf.shape[2] - 1  # the capacity, not the count


@interpreted
def test_buffers_without_room_hand_over(wide_llama):
    """Room for 2 decode tokens, 5 steps: static steps while it lasts, a dynamic step grows the
    buffers, static steps again (a new capture key); the same logits and bytes as the dynamic step."""
    model, tok = wide_llama
    params = {"bits": 2, "group_size": 4, "residual": 4}
    steps = 5
    dyn, dyn_cache, *_ = _decode(model, tok, "eager", "kivi", params, PADDED, steps, room=2)
    sta, sta_cache, counts, keys, _, _ = _decode(model, tok, "static", "kivi", params, PADDED, steps, room=2)
    assert counts["eager"] == steps - 1  # one dynamic step (step 3: no room), static before and after
    assert keys[0] == keys[1] == keys[2] != keys[3] == keys[4]  # (eager steps keep the runner's key)
    for a, b in zip(sta, dyn):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(sta_cache.layers, dyn_cache.layers):
        _assert_same_store(a, b)


@interpreted
def test_generate_takes_the_static_step_for_every_decode_token(wide_llama):
    """`generate()` reserves what decoding appends: every step after the first token is static."""
    model, tok = wide_llama
    policy = make_policy("kivi", bits=2, group_size=4, residual=4)
    out = {}
    for mode in ("eager", "static"):
        gen = Generator(model, tok, policy, Budget(ratio=0.5), decode_mode=mode)
        out[mode], _ = gen.generate(PADDED, GenerationConfig(max_new_tokens=4))
        out[mode + "_counts"] = gen.decode.counts
    assert [r.output_ids for r in out["static"]] == [r.output_ids for r in out["eager"]]
    assert out["static_counts"]["eager"] == 3 and out["eager_counts"]["eager"] == 0


@interpreted
def test_capture_is_stale_when_the_workspace_is_replaced(wide_llama):
    """The kernel's scratch buffer is one of the tensors a capture is keyed on: a larger one, which
    replaces (and frees) the captured one, makes the capture stale."""
    model, tok = wide_llama
    gen = Generator(model, tok, make_policy("kivi", bits=2, group_size=4, residual=4), Budget(ratio=0.5))
    with torch.inference_mode():
        cache, *_ = prefilled(gen, PADDED, 4)
    layers = cache.layers
    captured = _Captured(cache, 3, layers)
    key = _key(cache, 3, layers)
    ws = kivi_kernels.workspace(CPU)
    assert all(layer.static_buffers()[-1] is ws for layer in layers)
    assert captured.matches(cache, 3, layers)
    cache.prepare_static()  # no flush due right after prefill's: nothing to do
    assert captured.matches(cache, 3, layers)
    kivi_kernels._workspace(CPU, ws.numel() + 1)  # another call needed more
    assert not captured.matches(cache, 3, layers) and _key(cache, 3, layers) != key
    kivi_kernels._WORKSPACE[(str(CPU),)] = ws  # the former buffer back (the other tests' size)


@interpreted
def test_static_attention_equals_the_reference_path():
    """`attend_static` (grid by capacity) against the de-quantising masked reference path, on a
    store with ragged counts, quantised tokens and full rings."""
    from pipeline.kv_cache import KVLayer

    (layer, _), next_pos = _layer_pair(2, 8, 16, (100, 37, 70), room=40)
    layer.prepare_static()
    q = torch.randn(3, 4, 1, 64, generator=torch.Generator().manual_seed(2))
    step = StepContext(cache=None, positions=next_pos[:, None], padded=False)
    reference = KVLayer.attend(layer, q, step, 0.125)
    out = layer.attend_static(q, 0.125)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@on_cuda
@pytest.mark.parametrize("prompts", [UNIFORM, PADDED])
def test_graph_replays_equal_static_steps_on_cuda(wide_llama, prompts):
    """On a GPU: captured and replayed steps give the logits of the same static steps run eagerly
    (the same kernels) and of the dynamic step, across flushes (every 4 tokens) and a row leaving;
    one capture before the row leaves and one after (the flushes recapture nothing)."""
    model, tok = wide_llama
    model.to("cuda")
    params = {"bits": 2, "group_size": 4, "residual": 4}
    steps, leave_at = 24, 12
    runs = {}
    try:
        for mode in ("eager", "static", "graphs"):
            seen, _, counts, *_ = _decode(model, tok, mode, "kivi", params, prompts, steps, leave_at=leave_at)
            runs[mode] = (torch.stack(seen[:leave_at]), torch.stack(seen[leave_at:]), counts)
    finally:
        model.to("cpu")
    assert runs["graphs"][2]["captured"] == 2 and runs["graphs"][2]["replayed"] >= steps - 8
    assert runs["static"][2]["eager"] == steps and runs["eager"][2]["eager"] == 0
    for i in (0, 1):
        torch.testing.assert_close(runs["graphs"][i], runs["static"][i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(runs["graphs"][i], runs["eager"][i], rtol=1e-4, atol=1e-4)
        assert torch.equal(runs["graphs"][i].argmax(-1), runs["eager"][i].argmax(-1))
