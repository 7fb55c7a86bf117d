"""Compressions decide on the host what the host knows: no device sync per layer, same tokens kept.

The engine hands each forward its per-row host facts (budgets, non-padding tokens, tokens seen);
a `KVLayer` counts each row's filled slots on the host through append / note_padding / keep, so
that over-budget tests and the facts attention's fast paths need (`has_empty`, `heads_differ`)
are known without reading the device. These tests count the syncs (`HostWork`), check the host
facts against the device after every compression, and compare every kept token and the logits
with the device-read path (the layers' host counts switched off).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from pipeline.bench.host_work import HostWork
from pipeline.generate import GenerationConfig, Generator, chunk_facts
from pipeline.kv_cache import EMPTY, CompressedCache, KVLayer, StepContext
from policies import make_policy
from policies.base import Budget, row_budgets

DENSE = ["streaming_llm", "snapkv", "pyramidkv", "h2o", "tova", "knorm"]
PROMPTS = {
    "even": [[5 + (7 * i + j) % 300 for i in range(40)] for j in range(3)],
    "padded": [[5 + (7 * i + j) % 300 for i in range(n)] for j, n in enumerate([40, 27, 33])],
}


def _generator(tiny_llama, name: str, budget: Budget) -> Generator:
    model, tokenizer = tiny_llama
    return Generator(model, tokenizer, make_policy(name), budget, decode_mode="eager")


@contextlib.contextmanager
def watched(policy, after=None):
    """Count each `compress_layer` call's syncs; `after(layer)` runs after each call."""
    works = []
    original = policy.compress_layer

    def compress_layer(layer, *args):
        work = HostWork()
        with work:
            original(layer, *args)
        works.append(work)
        if after is not None:
            after(layer)

    policy.compress_layer = compress_layer
    try:
        yield works
    finally:
        del policy.compress_layer


def _prefill(gen: Generator, prompts, chunk, lengths_known=True):
    cache = CompressedCache(gen.num_layers, gen.policy)
    ids, filled = gen._left_pad(prompts)
    positions = torch.where(filled, filled.long().cumsum(-1) - 1, torch.full_like(ids, EMPTY))
    lengths = [len(p) for p in prompts]
    budgets = row_budgets(gen.budget, lengths, gen.device)
    logits = gen.prefill(
        cache,
        ids,
        positions,
        budgets,
        chunk,
        4,
        ids.shape[1] - min(lengths),
        lengths=lengths if lengths_known else None,
    )
    return cache, logits


def check_facts(layer: KVLayer) -> None:
    """The layer's host facts against its positions: row counts and `has_empty` exact when the
    counts are known (they must be, for a plain layer filled by the engine), `heads_differ` False
    only if every head holds the same positions."""
    pos = layer.positions
    filled = pos != EMPTY
    rows = layer.row_counts_host()
    assert rows is not None
    per_head = filled.sum(-1)
    assert per_head.tolist() == [[n] * pos.shape[1] for n in rows]
    assert layer.has_empty == bool((~filled).any())
    if not layer.heads_differ:
        assert torch.equal(pos, pos[:, :1].expand_as(pos))


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("prompts", ["even", "padded"])
@pytest.mark.parametrize("chunk", [None, 8, 13])
def test_compressions_read_nothing_from_the_device(tiny_llama, name, prompts, chunk):
    gen = _generator(tiny_llama, name, Budget(tokens=12))
    with torch.inference_mode(), watched(gen.policy, after=check_facts) as works:
        _prefill(gen, PROMPTS[prompts], chunk)
    assert works and all(w.sync_count == 0 for w in works), [dict(w.syncs) for w in works if w.syncs]
    assert sum(w.kernels > 0 for w in works) > 0  # something was compressed


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("prompts", ["even", "padded"])
@pytest.mark.parametrize("chunk", [None, 8, 13])
def test_host_facts_keep_what_the_device_reads_kept(tiny_llama, name, prompts, chunk, monkeypatch):
    """The same tokens and the same logits (bit for bit) with the host's counts as with every
    fact read from the device (counts off, no lengths: the code before the host facts)."""
    budget = Budget(ratio=0.3) if prompts == "padded" else Budget(tokens=12)
    gen = _generator(tiny_llama, name, budget)
    with torch.inference_mode():
        host_cache, host_logits = _prefill(gen, PROMPTS[prompts], chunk)
        monkeypatch.setattr(KVLayer, "counts_rows", False)
        dev_cache, dev_logits = _prefill(gen, PROMPTS[prompts], chunk, lengths_known=False)
    for host, dev in zip(host_cache.layers, dev_cache.layers):
        assert torch.equal(host.positions, dev.positions)
        assert torch.equal(host.keys, dev.keys)
        assert host.has_empty == dev.has_empty
        assert host.heads_differ >= dev.heads_differ
    assert torch.equal(host_logits, dev_logits)


@pytest.mark.parametrize("name", ["snapkv", "tova"])
def test_generate_passes_the_host_facts(tiny_llama, name):
    """`generate` hands prefill the prompts' lengths: a padded, chunked batch compresses with no
    sync, and decodes the same tokens as without the host facts."""
    gen = _generator(tiny_llama, name, Budget(tokens=12))
    cfg = GenerationConfig(max_new_tokens=3, prefill_chunk_tokens=8)
    with watched(gen.policy) as works:
        results, _ = gen.generate(PROMPTS["padded"], cfg)
    decode_calls = 2 * gen.num_layers if name == "tova" else 0  # tova compresses decode steps too
    prefill_works = works[: len(works) - decode_calls]
    assert prefill_works and all(w.sync_count == 0 for w in prefill_works)
    original = gen.prefill

    def prefill_without_lengths(*args, **kwargs):
        kwargs.pop("lengths", None)
        return original(*args[:7], **kwargs)

    gen.prefill = prefill_without_lengths
    again, _ = gen.generate(PROMPTS["padded"], cfg)
    assert [r.output_ids for r in results] == [r.output_ids for r in again]


def test_chunk_facts_follow_left_padding():
    facts = chunk_facts([5, 2, 0], width=5, lo=2, hi=4)
    # first real columns 0, 3, 5: row 0 has columns 2-3, row 1 column 3, row 2 none
    assert facts == {"valid_host": [2, 1, 0], "seen_host": [4, 1, 0]}


def test_unconfirmed_append_makes_the_counts_unknown():
    """An append whose padding nobody confirmed (`note_padding`) leaves the counts unknown, so the
    next compression reads the device instead of trusting a guess."""
    layer = KVLayer()
    keys = torch.randn(2, 2, 6, 4)
    layer.append(keys, keys, torch.tensor([[EMPTY, EMPTY, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]))
    assert layer.row_counts_host() is None
    layer.note_padding(True, [4, 6])
    assert layer.row_counts_host() == [4, 6] and layer.has_empty
    layer.append(keys[:, :, :1], keys[:, :, :1], torch.tensor([[4], [6]]))
    layer.append(keys[:, :, :1], keys[:, :, :1], torch.tensor([[5], [7]]))
    layer.note_padding(False)
    assert layer.row_counts_host() is None


def test_keep_with_host_rows_sets_the_facts_without_reading():
    layer = KVLayer()
    keys = torch.randn(1, 2, 5, 4)
    layer.append(keys, keys, torch.arange(5)[None])
    layer.note_padding(False)
    index = torch.tensor([[[0, 2, 4], [1, 2, 3]]])
    filled = torch.ones(1, 2, 3, dtype=torch.bool)
    with HostWork() as work:
        layer.keep(index, filled, rows=[3], heads_differ=True)
    assert work.sync_count == 0
    assert layer.row_counts_host() == [3] and not layer.has_empty and layer.heads_differ
    step = StepContext(cache=None, positions=torch.tensor([[5]]), row_budgets=torch.tensor([3]), padded=False)
    assert step.valid_counts() == [1]


@pytest.mark.parametrize("seed", range(8))
def test_visible_slots_equal_the_device_read(seed):
    """H2O's query blocks see the same slots by the host's arithmetic as by the device's read, on
    left-padded rows at different positions with holes in their older slots."""
    from policies.signals import _last_seen_slot, visible_slots

    g = torch.Generator().manual_seed(seed)
    b, h, q, old, block = 3, 2, 11, 7, 4
    valid = torch.randint(0, q + 1, (b,), generator=g).tolist()
    seen = [v + int(torch.randint(0, 15, (1,), generator=g)) for v in valid]
    pos = torch.full((b, h, old + q), EMPTY)
    for r in range(b):
        earlier = seen[r] - valid[r]  # tokens before this forward: some of them kept in each head
        for head in range(h):
            kept = torch.randperm(earlier, generator=g)[: min(old, earlier)].sort().values
            holes = torch.rand(len(kept), generator=g) < 0.3
            pos[r, head, : len(kept)] = torch.where(holes, EMPTY, kept)
        pos[r, :, old + q - valid[r] :] = torch.arange(seen[r] - valid[r], seen[r])
    qpos = pos[:, 0, old:]
    want = [_last_seen_slot(pos, qpos[:, lo : lo + block]) + 1 for lo in range(0, q, block)]
    assert visible_slots(valid, seen, q, old + q, block) == want


# -- adakv: the ragged store sized by a host bound, its segment lengths read one forward later -----
def _adakv(tiny_llama, budget: Budget) -> Generator:
    model, tokenizer = tiny_llama
    policy = make_policy("adakv", window=4)  # budgets above the window: per-head capacities differ
    return Generator(model, tokenizer, policy, budget, decode_mode="eager")


def check_ragged_counts(layer) -> None:
    """The host's per-(row, head) counts (the deferred read taken) against the device."""
    counts = layer.filled_counts_host()
    assert counts is not None
    assert (layer.dense_positions() != EMPTY).sum(-1).tolist() == counts


@pytest.mark.parametrize("prompts", ["even", "padded"])
@pytest.mark.parametrize("chunk", [None, 8, 13])
def test_adakv_compressions_read_nothing_from_the_device(tiny_llama, prompts, chunk):
    gen = _adakv(tiny_llama, Budget(tokens=12))
    with torch.inference_mode(), watched(gen.policy, after=check_ragged_counts) as works:
        _prefill(gen, PROMPTS[prompts], chunk)
    assert works and all(w.sync_count == 0 for w in works), [dict(w.syncs) for w in works if w.syncs]
    assert sum(w.kernels > 0 for w in works) > 0


@pytest.mark.parametrize("prompts", ["even", "padded"])
@pytest.mark.parametrize("chunk", [None, 8, 13])
@pytest.mark.parametrize("lengths_known", [True, False])
def test_adakv_deferred_store_keeps_what_the_read_store_kept(
    tiny_llama, prompts, chunk, lengths_known, monkeypatch
):
    """Stores sized by the host's bound (the row counts known, or, without the engine's facts in
    a padded batch, the budgets alone) keep what stores that read their lengths kept."""
    import policies.adakv as adakv

    budget = Budget(ratio=0.4) if prompts == "padded" else Budget(tokens=12)
    gen = _adakv(tiny_llama, budget)
    with torch.inference_mode():
        host_cache, host_logits = _prefill(gen, PROMPTS[prompts], chunk, lengths_known)
        monkeypatch.setattr(adakv, "kept_bound", lambda *args: None)  # every store reads its lengths
        dev_cache, dev_logits = _prefill(gen, PROMPTS[prompts], chunk, lengths_known=False)
    for host, dev in zip(host_cache.layers, dev_cache.layers):
        assert torch.equal(host.kept_positions(), dev.kept_positions())
        assert torch.equal(host.flat_keys, dev.flat_keys)
        assert host.max_seg == dev.max_seg and host.seg_lens_host == dev.seg_lens_host
        assert host.stored_bytes() == dev.stored_bytes()
    assert torch.equal(host_logits, dev_logits)


def _dense_form(seed: int):
    g = torch.Generator().manual_seed(seed)
    b, h, s = 2, 3, 9
    keys, values = torch.randn(b, h, s, 4, generator=g), torch.randn(b, h, s, 4, generator=g)
    positions = torch.arange(s).expand(b, h, s).clone()
    positions[torch.rand(b, h, s, generator=g) < 0.4] = EMPTY
    return keys, values, positions, int((positions != EMPTY).sum())


@pytest.mark.parametrize("slack", [0, 5])
def test_deferred_store_settles_to_the_read_store(slack):
    from policies.ragged_heads import RaggedKVLayer

    keys, values, positions, n = _dense_form(0)
    read, deferred = RaggedKVLayer(), RaggedKVLayer()
    for layer in (read, deferred):
        layer.append(keys, values, positions[:, 0])
        layer.note_padding(True)
    read.store_dense(keys, values, positions)
    with HostWork() as work:
        deferred.store_dense(keys, values, positions, bound=n + slack)
    assert work.sync_count == 0 and deferred._pending is not None
    assert deferred.max_seg == read.max_seg and deferred._pending is None  # (read: settled)
    assert deferred.seg_lens_host == read.seg_lens_host
    for name in ("flat_keys", "flat_values", "flat_positions"):
        assert torch.equal(getattr(deferred, name), getattr(read, name))
    assert deferred.stored_bytes() == read.stored_bytes()


def test_a_bound_below_the_kept_tokens_fails_loudly():
    from policies.ragged_heads import RaggedKVLayer

    keys, values, positions, n = _dense_form(1)
    layer = RaggedKVLayer()
    layer.append(keys, values, positions[:, 0])
    layer.note_padding(True)
    layer.store_dense(keys, values, positions, bound=n - 1)
    with pytest.raises(RuntimeError, match="exceed the bound"):
        _ = layer.max_seg


# -- spindlekv: one read per eviction, none per evicted chunk append -----------------------------
def check_spindle_lengths(layer) -> None:
    """A compressed SpindleLayer's host facts against the device: each row's longest and shortest
    length and (evicted) most book entries."""
    if layer.mode == "dense":
        return
    n, host = layer._n, layer._lengths
    assert host is not None
    assert host[:2] == [n.amax(-1).tolist(), n.amin(-1).tolist()]
    if layer.mode == "evicted":
        assert host[2] == layer.kbook_n.amax(-1).tolist()


@pytest.mark.parametrize("prompts", ["even", "padded"])
@pytest.mark.parametrize("chunk", [None, 8, 13])
@pytest.mark.parametrize("lengths_known", [True, False])
def test_spindlekv_evicted_layers_read_once_per_compression(
    tiny_llama, prompts, chunk, lengths_known, monkeypatch
):
    """A deep layer's eviction reads its widths once, and its chunk appends read nothing: the host
    facts plus the step's non-padding counts size them (without the engine's counts, an append of
    a padded chunk reads them back instead, and the facts stay right)."""
    from policies.spindlekv import SpindleLayer

    appends = []
    append = SpindleLayer.append

    def counted_append(layer, *args, **kwargs):
        with HostWork() as work:
            append(layer, *args, **kwargs)
        appends.append((layer.mode, work.sync_count))
        check_spindle_lengths(layer)

    monkeypatch.setattr(SpindleLayer, "append", counted_append)
    gen = _generator(tiny_llama, "spindlekv", Budget(tokens=12))
    layers = []
    with torch.inference_mode(), watched(gen.policy, after=lambda layer: layers.append(layer.mode)) as works:
        _prefill(gen, PROMPTS[prompts], chunk, lengths_known)
    evicted = [w.sync_count for w, mode in zip(works, layers) if mode == "evicted"]
    assert evicted and all(n == 1 for n in evicted), evicted
    evicted_appends = [n for mode, n in appends if mode == "evicted"]
    assert bool(evicted_appends) == (chunk is not None)
    most = 0 if lengths_known or prompts == "even" else 1  # (a padded chunk's counts unknown: read)
    assert all(n <= most for n in evicted_appends), evicted_appends


# -- fewer kernels: the same selection ----------------------------------------------------------
def _twin_layers(b: int, h: int, s: int, padded: bool, g: torch.Generator) -> tuple[KVLayer, KVLayer]:
    """Two layers holding the same random keys of 3 rows (left padding when `padded`), with the
    host's row counts: one for the path under test, one for the reference."""
    lengths = [30, 22, 15] if padded else [s] * b
    pos = torch.full((b, s), EMPTY)
    for r, n in enumerate(lengths):
        pos[r, s - n :] = torch.arange(n)
    keys = torch.randn(b, h, s, 4, generator=g)
    layers = KVLayer(), KVLayer()
    for layer in layers:
        layer.append(keys, keys + 1, pos)
        layer.note_padding(padded, lengths)
    return layers


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("padded", [False, True])
def test_top_k_keep_equals_the_threshold_keep(seed, padded):
    """Every (row, head) keeping exactly one budget (`_keep_top_k`: top-k indices, sorted) keeps
    what the threshold, mask and compaction kept, on scores full of ties, with empty slots."""
    from policies.base import keep_topk

    g = torch.Generator().manual_seed(seed)
    b, h, s, k = 3, 2, 30, 9
    fast, ref = _twin_layers(b, h, s, padded, g)
    scores = torch.randint(0, 4, (b, h, s), generator=g).float()
    scores[0, 0, :3] = -0.0
    with HostWork() as work:
        keep_topk(fast, scores, torch.tensor([k] * b), host_budgets=[k] * b)
    keep_topk(ref, scores, torch.tensor([k] * b), max_budget=k, uniform=True)
    assert work.sync_count == 0 and work.ops["topk.default"] == 1 and "scatter_.src" not in work.ops
    assert torch.equal(fast.positions, ref.positions) and torch.equal(fast.keys, ref.keys)
    assert fast.row_counts_host() == [k] * b and fast.has_empty == ref.has_empty is False


@pytest.mark.parametrize("padded", [False, True])
def test_top_k_keep_ranks_one_head_when_heads_score_alike(padded):
    """`same_heads` on a layer whose heads hold the same positions: one head is ranked and every
    head keeps its slots. Head 1's scores here differ, so a keep that ranked it would differ."""
    from policies.base import keep_topk

    g = torch.Generator().manual_seed(7)
    b, h, s, k = 3, 3, 30, 9
    fast, ref = _twin_layers(b, h, s, padded, g)
    assert not fast.heads_differ
    scores = torch.randint(0, 4, (b, 1, s), generator=g).float().expand(b, h, s).clone()
    alike = scores.clone()
    scores[:, 1] = torch.rand(b, s, generator=g)
    keep_topk(fast, scores, torch.tensor([k] * b), host_budgets=[k] * b, same_heads=True)
    keep_topk(ref, alike, torch.tensor([k] * b), max_budget=k, uniform=True)
    assert torch.equal(fast.positions, ref.positions) and torch.equal(fast.keys, ref.keys)
    assert not fast.heads_differ and fast.row_counts_host() == [k] * b


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("q_len, upto", [(1, None), (6, None), (4, 30), (1, 27)])
def test_newest_probs_equal_the_masked_probs(q_len, upto, holes):
    """The newest-token path (no position mask) for a block whose queries are the last of the
    first `upto` slots (h2o's blocks) and for one query (tova's last): the masked path's numbers,
    on a compressed layer whose heads differ, with empty slots before the forward's tokens."""
    from policies.signals import attention_probs

    g = torch.Generator().manual_seed(3)
    layer, pos = _compressed_layer(g, holes)
    b, h, s = pos.shape
    end = upto or s
    qpos = pos[:, 0, end - q_len : end]
    queries = torch.randn(b, 2 * h, q_len, 8, generator=g)
    fast = attention_probs(layer, queries, qpos, 0.3, upto=upto, newest=True)
    masked = attention_probs(layer, queries, qpos, 0.3, upto=upto)
    assert torch.equal(fast, masked)


def _compressed_layer(g, holes: bool, b: int = 2, h: int = 2, s: int = 36, new: int = 12):
    """A layer as a compression leaves it (heads keep different positions, some slots empty when
    `holes`) plus `new` unpadded tokens, the same in every head, appended after them."""
    keys = torch.randn(b, h, s, 8, generator=g)
    pos = torch.stack([torch.randperm(60, generator=g)[:s].sort().values for _ in range(b * h)])
    pos = pos.reshape(b, h, s)
    if holes:
        pos[..., : s - new][torch.rand(b, h, s - new, generator=g) < 0.3] = EMPTY
    pos[..., -new:] = torch.arange(60, 60 + new)
    layer = KVLayer()
    layer.append(keys, keys, torch.zeros(b, s, dtype=torch.long))
    layer.note_padding(False)
    layer._p.set(pos.to(torch.int32))
    layer.heads_differ, layer.has_empty = True, holes
    return layer, pos


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("holes", [False, True])
def test_newest_snapkv_scores_equal_the_positions_path(pooling, holes):
    """SnapKV's scores and window mask with the window written in place (`newest`) equal those
    built from positions, on a layer with empty slots before the forward's tokens."""
    from policies.signals import snapkv_scores_and_window

    g = torch.Generator().manual_seed(4)
    layer, pos = _compressed_layer(g, holes)
    b, h, _ = pos.shape
    queries = torch.randn(b, 2 * h, 12, 8, generator=g)
    qpos = pos[:, 0, -12:]
    fast = snapkv_scores_and_window(layer, queries, qpos, 0.3, 5, 7, pooling, newest=True)
    slow = snapkv_scores_and_window(layer, queries, qpos, 0.3, 5, 7, pooling)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


# -- the counter itself --------------------------------------------------------------------------
def test_host_work_counts_syncs_kernels_and_deferred_reads():
    from policies.ragged_heads import DeferredRead

    x = torch.arange(6.0)
    with torch.no_grad(), HostWork() as work:
        y = x * 2  # a kernel
        y.view(2, 3).t()  # views
        bool(y.sum() > 0)  # two kernels, a sync
        y.tolist()  # a sync
        y[y > 3]  # a kernel, a sync (boolean indexing)
        torch.tensor([1, 2], device=x.device)  # a sync on a GPU (a blocking copy)
        DeferredRead(y).get()  # a deferred read (its copy: a kernel)
    assert work.sync_count == 4, work.syncs
    assert sum(work.deferred.values()) == 1
    assert work.kernels == 5, work.ops
    assert all("test_compress_host.py" not in where for where in work.syncs)  # repository frames only


def test_host_work_tool_runs(capsys):
    from pipeline.bench import host_work

    host_work.main(["--shapes", "tiny", "--context", "64", "--chunk", "16", "--layers", "2"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if " calls, " in line]
    assert len(lines) == 12  # six policies, one-shot and chunked
    assert all("0.00 syncs per call" in line for line in lines), out


def test_host_work_counts_kivi_layer_path(capsys):
    """The tool counts kivi's whole per-layer path (append, attention, compression) per forward: no
    sync in it (not even a read of the host's count mirror), and the same store when run twice."""
    from pipeline.bench import host_work

    args = ["--shapes", "tiny", "--context", "320", "--chunk", "64", "--layers", "2"]
    host_work.main([*args, "--policies", "kivi", "--modes", "chunked"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "layer path" in line]
    assert len(lines) == 2 and all(" 0.00 syncs, " in line for line in lines), out
    assert "1 syncs outside" in out  # (row_budgets, before the first forward)


def test_ranking_key_has_the_bits_of_shift_and_or():
    """`ranking_key`'s one add equals (monotone << 32) | (position + 1), the former formula."""
    from policies.base import ranking_key

    g = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 3, 50, generator=g) * 1e3
    scores.view(-1)[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -1e-40])
    positions = torch.randint(-1, 2**31 - 2, (2, 3, 50), generator=g, dtype=torch.int32)
    bits = (scores + 0.0).view(torch.int32)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    former = (monotone.to(torch.int64) << 32) | (positions.to(torch.int64) + 1)
    assert torch.equal(ranking_key(scores, positions), former)
