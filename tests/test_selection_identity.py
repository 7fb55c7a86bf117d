"""The sort-free selection keeps exactly what the sort-based one kept.

`ranking_key` / `top_slots` / `compact_slots` (keep_topk), the cumulative-count pooling of
`pool_in_position_order(ordered=True)` and the threshold counts of `head_capacities` replaced
argsorts. The references below are the previous implementations, kept here verbatim; every
case compares kept positions (and orders) exactly, on inputs full of exact ties, left padding,
holes and per-head budgets.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from pipeline.kv_cache import EMPTY, KVLayer, StepContext
from policies import make_policy
from policies.adakv import head_capacities
from policies.base import best_first, keep_topk
from policies.ragged_heads import RaggedKVLayer
from policies.signals import pool_in_position_order, snapkv_scores

D = 8


# -- the previous implementations ----------------------------------------------------------------
def ref_best_first(scores, positions):
    by_position = positions.to(torch.int64).argsort(dim=-1, descending=True, stable=True)
    by_score = torch.gather(scores, 2, by_position).argsort(dim=-1, descending=True, stable=True)
    return torch.gather(by_position, 2, by_score)


def ref_keep_topk(layer, scores, budgets):
    filled = layer.positions != EMPTY
    scores = scores.float().masked_fill(~filled, float("-inf"))
    if budgets.dim() == 1:
        budgets = budgets[:, None].expand(filled.shape[:2])
    kept_len = int(budgets.max().clamp(max=scores.shape[-1]))
    top = ref_best_first(scores, layer.positions)[..., :kept_len]
    rank = torch.arange(kept_len, device=scores.device)
    within_budget = rank[None, None, :] < budgets[..., None]
    chosen_filled = torch.gather(filled, 2, top) & within_budget
    pos = torch.gather(layer.positions, 2, top).to(torch.int64)
    order_key = torch.where(chosen_filled, pos, torch.full_like(pos, torch.iinfo(torch.int64).max))
    order = order_key.argsort(dim=-1)
    layer.keep(torch.gather(top, 2, order), torch.gather(chosen_filled, 2, order))


def ref_head_capacities(prefix_scores, capacity, alpha, positions=None):
    b, h, s = prefix_scores.shape
    total = capacity * h
    counts = torch.zeros((b, h), dtype=torch.float64, device=prefix_scores.device)
    if b and int(total.max()) > 0:
        if positions is None:
            positions = torch.arange(s, device=prefix_scores.device).expand(b, h, s)
        head = torch.arange(h, device=prefix_scores.device)[None, :, None]
        tie_key = (head * 2**32 - positions.to(torch.int64)).reshape(b, h * s)
        by_tie = tie_key.argsort(dim=-1, stable=True)
        flat = torch.gather(prefix_scores.reshape(b, h * s).float(), 1, by_tie)
        order = torch.gather(by_tie, 1, flat.argsort(dim=-1, descending=True, stable=True))
        chosen = torch.arange(h * s, device=order.device)[None, :] < total[:, None]
        counts.scatter_add_(1, order // s, chosen.to(torch.float64))
    real = (1.0 - alpha) * counts + alpha * capacity[:, None].to(torch.float64)
    base = real.floor()
    remainder = (total - base.sum(-1).to(torch.int64)).clamp(min=0)
    order = (base - real).argsort(dim=-1, stable=True)
    rank = order.argsort(dim=-1)
    return (base + (rank < remainder[:, None]).to(torch.float64)).to(torch.int64)


@contextlib.contextmanager
def sorted_pooling():
    """snapkv_scores with the previous, sorted pooling."""
    import policies.signals as signals

    original = signals.pool_in_position_order

    def pool(scores, positions, kernel, kind, **_):
        return original(scores, positions, kernel, kind)

    signals.pool_in_position_order = pool
    try:
        yield
    finally:
        signals.pool_in_position_order = original


# -- inputs ----------------------------------------------------------------------------------------
def tied_scores(shape, seed, levels=5):
    """Scores with many exact ties (a few levels), some zeros and a KEEP_BASE-like tail."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float() / levels


def holey_layer(b, h, s, seed, lengths=None, hole_fraction=0.3):
    """A KVLayer of `s` slots, rows left-padded to `lengths`, then holes punched by a keep()
    (per-head different, as a compression leaves them), filled positions increasing."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [s] * b
    pos = torch.full((b, s), EMPTY, dtype=torch.long)
    for i, n in enumerate(lengths):
        pos[i, s - n :] = torch.arange(n)
    layer = KVLayer()
    keys = torch.randn(b, h, s, D, generator=g)
    layer.append(keys, keys + 1, pos)
    index = torch.arange(s).expand(b, h, s).clone()
    filled = torch.rand(b, h, s, generator=g) > hole_fraction
    layer.keep(index, filled)  # holes: EMPTY slots between filled ones, different per head
    return layer


def kept_order(layer):
    return layer.positions.tolist()


def increasing(layer):
    pos = layer.positions
    for row in pos.tolist():
        for head in row:
            real = [p for p in head if p != EMPTY]
            if real != sorted(real) or len(set(real)) != len(real):
                return False
    return True


# -- cases -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_best_first_is_the_two_sort_order(seed):
    layer = holey_layer(3, 4, 50, seed, lengths=[50, 31, 7])
    scores = tied_scores((3, 4, 50), seed).masked_fill(layer.positions == EMPTY, float("-inf"))
    scores[0, 0, :5] = -0.0  # signed zeros tie with zeros
    assert torch.equal(best_first(scores, layer.positions), ref_best_first(scores, layer.positions))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("per_head", [False, True])
def test_keep_topk_keeps_the_same_slots_in_the_same_order(seed, per_head):
    b, h, s = 3, 4, 60
    layer = holey_layer(b, h, s, seed, lengths=[60, 45, 12])
    assert increasing(layer)
    scores = tied_scores((b, h, s), seed + 100)
    g = torch.Generator().manual_seed(seed)
    if per_head:
        budgets = torch.randint(0, 50, (b, h), generator=g)
    else:
        budgets = torch.tensor([20, 33, 40])
    ref = copy.copy(layer)
    ref_keep_topk(ref, scores, budgets)
    keep_topk(layer, scores, budgets)
    assert kept_order(layer) == kept_order(ref)
    assert increasing(layer)


@pytest.mark.parametrize("uniform_budget", [1, 17, 60, 200])
def test_keep_topk_with_host_budgets_and_uniform_rows(uniform_budget):
    layer = holey_layer(2, 3, 60, seed=3, lengths=[60, 40])
    scores = tied_scores((2, 3, 60), seed=4)
    budgets = torch.tensor([uniform_budget] * 2)
    ref = copy.copy(layer)
    ref_keep_topk(ref, scores, budgets)
    keep_topk(layer, scores, budgets, max_budget=uniform_budget, uniform=True)
    assert kept_order(layer) == kept_order(ref)


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("seed", range(4))
def test_ordered_pooling_equals_the_sorted_pooling(kind, seed):
    layer = holey_layer(3, 2, 40, seed, lengths=[40, 25, 3])
    scores = torch.rand(3, 2, 40, generator=torch.Generator().manual_seed(seed))
    a = pool_in_position_order(scores, layer.positions, 7, kind, ordered=True)
    b = pool_in_position_order(scores, layer.positions, 7, kind)
    assert torch.equal(a, b)


@pytest.mark.parametrize("seed", range(10))
def test_head_capacities_equal_the_sorted_counts(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, s = 3, 4, 30
    scores = tied_scores((b, h, s), seed, levels=3)
    scores = scores.masked_fill(torch.rand(b, h, s, generator=g) < 0.2, float("-inf"))
    capacity = torch.tensor([0, 7, 22])  # 22 * 4 > the finite scores: ties at -inf count too
    for alpha in (0.0, 0.2, 1.0):
        assert torch.equal(
            head_capacities(scores, capacity, alpha), ref_head_capacities(scores, capacity, alpha)
        )


def ref_adakv_compress(policy, layer, queries, step, scaling):
    """The previous AdaKV.compress_layer: sorted pooling, sorted capacities, two-sort keep_topk."""
    view = layer.as_dense()
    p = policy.params
    with sorted_pooling():
        scores = snapkv_scores(view, queries, step.positions, scaling, p.window, p.kernel, p.pooling).float()
    import policies.adakv as adakv

    saved = adakv.head_capacities
    adakv.head_capacities = ref_head_capacities
    try:
        budgets = policy.head_budgets(view, scores, step)
    finally:
        adakv.head_capacities = saved
    ref_keep_topk(view, scores, budgets)
    layer.store_dense(view.keys, view.values, view.positions)


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("seed", range(3))
def test_adakv_chunked_keeps_what_the_sorted_code_kept(pooling, seed):
    """Chunks of a padded batch through AdaKV (ragged store): every compression keeps the same
    (row, head) segments as the previous, sort-based code on the same layer."""
    g = torch.Generator().manual_seed(seed)
    b, h, group, width, chunk = 2, 2, 2, 48, 16
    lengths = [48, 37]
    policy = make_policy("adakv", window=4, pooling=pooling)
    new, ref = RaggedKVLayer(), RaggedKVLayer()
    pos = torch.full((b, width), EMPTY, dtype=torch.long)
    for i, n in enumerate(lengths):
        pos[i, width - n :] = torch.arange(n)
    keys = torch.randn(b, h, width, D, generator=g)
    queries = torch.randn(b, h * group, width, D, generator=g)
    budgets = torch.tensor([12, 9])
    for lo in range(0, width, chunk):
        sl = slice(lo, lo + chunk)
        for layer in (new, ref):
            layer.append(keys[:, :, sl], keys[:, :, sl] + 1, pos[:, sl])
            layer.note_padding(True)
        step = StepContext(cache=None, positions=pos[:, sl], compress=True, row_budgets=budgets)
        policy.compress_layer(new, queries[:, :, sl], step, 0, 1, D**-0.5)
        view = ref.as_dense()
        over = not bool(((view.positions != EMPTY).sum(-1) <= budgets[:, None]).all())
        if over:
            ref_adakv_compress(policy, ref, queries[:, :, sl], step, D**-0.5)
        assert new.kept_positions().tolist() == ref.kept_positions().tolist()
        assert torch.equal(new.flat_keys, ref.flat_keys)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o", "tova", "knorm"])
def test_chunked_policies_keep_increasing_positions(name):
    """The invariant the sort-free paths rely on: every (row, head)'s filled slots hold
    increasing positions, after each chunk's compression of a padded batch."""
    g = torch.Generator().manual_seed(0)
    b, h, width, chunk = 2, 2, 64, 16
    pos = torch.full((b, width), EMPTY, dtype=torch.long)
    for i, n in enumerate([64, 50]):
        pos[i, width - n :] = torch.arange(n)
    keys = torch.randn(b, h, width, D, generator=g)
    queries = torch.randn(b, 2 * h, width, D, generator=g)
    policy = make_policy(name)
    layer = policy.make_layer()
    for lo in range(0, width, chunk):
        sl = slice(lo, lo + chunk)
        layer.append(keys[:, :, sl], keys[:, :, sl] + 1, pos[:, sl])
        step = StepContext(
            cache=None, positions=pos[:, sl], compress=True, row_budgets=torch.tensor([20, 11])
        )
        policy.compress_layer(layer, queries[:, :, sl], step, 1, 4, D**-0.5)
        assert increasing(layer)


def test_pooling_scores_are_unchanged_for_snapkv_layers():
    """snapkv_scores (ordered pooling) on a holey, padded layer = the sorted pooling's scores."""
    layer = holey_layer(2, 2, 40, seed=5, lengths=[40, 28])
    queries = torch.randn(2, 4, 6, D, generator=torch.Generator().manual_seed(5))
    qpos = torch.tensor([[34 + i for i in range(6)], [22 + i for i in range(6)]])
    new = snapkv_scores(layer, queries, qpos, 0.3, 4, 7, "avg")
    with sorted_pooling():
        ref = snapkv_scores(layer, queries, qpos, 0.3, 4, 7, "avg")
    assert torch.equal(new, ref)


@pytest.mark.parametrize("lengths", [[40, 40], [40, 26]])
def test_pooling_in_place_when_no_slot_is_empty(lengths):
    """A layer without holes (`has_empty` False) is pooled where it lies: the same scores as the
    sorted pooling. A layer filled here without `note_padding` breaks that promise with left
    padding: its filled slots still score the same (leading zeros act as the pooling's zero
    padding); only its empty slots, which no selection reads, may differ."""
    layer = KVLayer()
    keys = torch.randn(2, 2, 40, D, generator=torch.Generator().manual_seed(6))
    pos = torch.full((2, 40), EMPTY, dtype=torch.long)
    for i, n in enumerate(lengths):
        pos[i, 40 - n :] = torch.arange(n)
    layer.append(keys, keys + 1, pos)
    assert not layer.has_empty
    queries = torch.randn(2, 4, 6, D, generator=torch.Generator().manual_seed(7))
    for pooling in ("avg", "max"):
        new = snapkv_scores(layer, queries, pos[:, -6:], 0.3, 4, 7, pooling)
        with sorted_pooling():
            ref = snapkv_scores(layer, queries, pos[:, -6:], 0.3, 4, 7, pooling)
        filled = layer.positions != EMPTY
        assert torch.equal(new[filled], ref[filled])
        if lengths[0] == lengths[1]:
            assert torch.equal(new, ref)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_newest_queries_mask_equals_the_position_mask(pooling):
    """`newest` (this forward's unpadded tokens are the layer's last slots, no empty slot) builds
    the causal mask and the window from shapes: the same scores as from positions, for a fresh
    layer and for one compressed by an earlier chunk."""
    g = torch.Generator().manual_seed(8)
    layer = KVLayer()
    pos = torch.arange(48)[None].expand(2, 48)
    keys = torch.randn(2, 2, 48, D, generator=g)
    queries = torch.randn(2, 4, 48, D, generator=g)
    layer.append(keys[:, :, :24], keys[:, :, :24] + 1, pos[:, :24])
    layer.note_padding(False)
    assert not layer.has_empty
    a = snapkv_scores(layer, queries[:, :, :24], pos[:, :24], 0.3, 4, 7, pooling, newest=True)
    b = snapkv_scores(layer, queries[:, :, :24], pos[:, :24], 0.3, 4, 7, pooling)
    assert torch.equal(a, b)
    keep_topk(layer, a, torch.tensor([10, 10]))  # heads keep different tokens, no empty slot
    assert not layer.has_empty and layer.heads_differ
    layer.append(keys[:, :, 24:], keys[:, :, 24:] + 1, pos[:, 24:])
    layer.note_padding(False)
    a = snapkv_scores(layer, queries[:, :, 24:], pos[:, 24:], 0.3, 4, 7, pooling, newest=True)
    b = snapkv_scores(layer, queries[:, :, 24:], pos[:, 24:], 0.3, 4, 7, pooling)
    assert torch.equal(a, b)


def ref_attention_probs(layer, queries, query_positions, scaling):
    """The previous attention_probs: a broadcast matmul over the GQA group, a 0 / -inf bias."""
    keys = layer.keys
    b, num_heads, q_len, d = queries.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = num_heads // kv_heads
    q = queries.float().reshape(b, kv_heads, group, q_len, d)
    logits = torch.matmul(q, keys.float()[:, :, None].transpose(-1, -2)).mul_(scaling)
    valid = query_positions != EMPTY
    mask = layer.attention_mask(query_positions) | ~valid[:, None, :, None]
    bias = torch.zeros(mask.shape, dtype=logits.dtype).masked_fill_(~mask, float("-inf"))
    probs = logits.add_(bias[:, :, None]).softmax(dim=-1)
    probs.mul_(valid[:, None, None, :, None].to(probs.dtype))
    return probs.reshape(b, num_heads, q_len, slots)


@pytest.mark.parametrize("newest", [False, True])
def test_attention_probs_equal_the_broadcast_matmul(newest):
    from policies.signals import attention_probs

    g = torch.Generator().manual_seed(9)
    if newest:
        layer = KVLayer()
        keys = torch.randn(2, 2, 40, D, generator=g)
        layer.append(keys, keys + 1, torch.arange(40)[None].expand(2, 40))
        qpos = torch.arange(34, 40)[None].expand(2, 6)
    else:
        layer = holey_layer(2, 2, 40, seed=9, lengths=[40, 30])
        qpos = torch.tensor([[34 + i for i in range(6)], [EMPTY, EMPTY, 26, 27, 28, 29]])
    queries = torch.randn(2, 6, 6, D, generator=g)
    got = attention_probs(layer, queries, qpos, 0.3, newest=newest)
    assert torch.equal(got, ref_attention_probs(layer, queries, qpos, 0.3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a half-precision GEMM to float32 runs on the GPU")
def test_half_logits_on_the_gpu_equal_the_float32_gemm():
    """`float_logits` of bfloat16 inputs (tensor cores, float32 result) against the float32 GEMM of
    the widened inputs: the products are exact in float32, so only the summation order differs."""
    from policies.signals import float_logits

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 3, 40, 64, generator=g, device="cuda").to(torch.bfloat16)
    keys = torch.randn(2, 3, 5000, 64, generator=g, device="cuda").to(torch.bfloat16)[:, :, :4000]
    got = float_logits(q, keys)
    want = torch.matmul(q.float(), keys.float().transpose(-1, -2))
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
