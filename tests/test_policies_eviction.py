"""Eviction policies on built tensors, where the right kept set is known by hand."""

from __future__ import annotations

import pytest
import torch

from pipeline.attention import grouped_attention
from pipeline.kv_cache import EMPTY, KVLayer, StepContext
from policies import make_policy
from policies.adakv import head_capacities
from policies.pyramidkv import pyramid_capacities
from policies.ragged_heads import RaggedKVLayer
from policies.signals import attention_probs, pool_in_position_order

D = 16


def built_layer(keys: torch.Tensor, lengths: list[int] | None = None, cls=KVLayer) -> KVLayer:
    """A layer holding `keys` ([b, h, s, d]; values = keys + 1), rows left-padded to `lengths`."""
    b, h, s, _ = keys.shape
    lengths = lengths or [s] * b
    pos = torch.full((b, s), EMPTY, dtype=torch.long)
    for i, n in enumerate(lengths):
        pos[i, s - n :] = torch.arange(n)
    layer = cls()
    layer.append(keys, keys + 1.0, pos)
    return layer, pos


def step_for(positions: torch.Tensor, budgets) -> StepContext:
    return StepContext(cache=None, positions=positions, compress=True, row_budgets=torch.tensor(budgets))


def kept(layer: KVLayer) -> list[list[set[int]]]:
    pos = layer.kept_positions() if isinstance(layer, RaggedKVLayer) else layer.positions
    return [[set(p for p in head.tolist() if p != EMPTY) for head in row] for row in pos]


def small_keys(b, h, s, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, D, generator=g) * scale


# -- streaming_llm -------------------------------------------------------------------------------
def counted_layer(positions: list[list[int]], h: int = 2) -> KVLayer:
    """A layer whose rows hold `positions` (equal lengths, no padding), its row counts on the host."""
    pos = torch.tensor(positions)
    b, s = pos.shape
    layer = KVLayer()
    keys = small_keys(b, h, s, scale=1.0)
    layer.append(keys, keys + 1.0, pos)
    layer.note_padding(False)
    return layer


@pytest.mark.parametrize(
    "positions",
    [
        [list(range(20)), list(range(20))],  # one-shot prompt
        [list(range(2, 22))],  # its first two sinks gone: the prefix holds fewer than sink_tokens
        [[0, 1, 2, 3, *range(10, 16), *range(16, 26)]],  # a chunk after an earlier compression
        [list(range(0, 40, 2))],  # holes in the positions (sinks 0 and 2 only)
    ],
)
def test_streaming_llm_positional_keep_is_the_ranked_keep(positions):
    """The keep by slot (no ranking: `score` is never called) keeps what the ranking keeps."""
    from policies.base import ScorePolicy

    policy = make_policy("streaming_llm", sink_tokens=4)
    budget = 8
    ranked, positional = counted_layer(positions), counted_layer(positions)
    step = StepContext(
        cache=None,
        positions=ranked.positions[:, 0],
        compress=True,
        row_budgets=torch.tensor([budget] * len(positions)),
        padded=False,
        budgets_host=[budget] * len(positions),
    )
    ScorePolicy.compress_layer(policy, ranked, None, step, 0, 1, 1.0)
    policy.score = None  # the positional keep must not rank
    policy.compress_layer(positional, None, step, 0, 1, 1.0)
    assert torch.equal(positional.positions, ranked.positions)
    assert torch.equal(positional.keys, ranked.keys) and torch.equal(positional.values, ranked.values)
    assert positional.row_counts_host() == [budget] * len(positions)
    assert not positional.has_empty and not positional.heads_differ
    sinks = {p for p in positions[0] if p < 4}
    assert set(positional.positions[0, 0].tolist()) == sinks | set(positions[0][-(budget - len(sinks)) :])


def test_streaming_llm_ranks_where_the_host_does_not_know_the_layer():
    """Left padding (empty slots) takes the ranked keep: sinks and the newest of each row."""
    keys = small_keys(2, 2, 12, scale=1.0)
    layer, pos = built_layer(keys, lengths=[12, 9])
    policy = make_policy("streaming_llm", sink_tokens=2)
    policy.compress_layer(layer, None, step_for(pos, [5, 5]), 0, 1, 1.0)
    assert kept(layer) == [[{0, 1, 9, 10, 11}] * 2, [{0, 1, 6, 7, 8}] * 2]


# -- knorm ---------------------------------------------------------------------------------------
def test_knorm_keeps_the_smallest_norm_keys_per_head():
    keys = small_keys(1, 2, 12, scale=1.0)
    norms = torch.tensor(
        [[5.0, 1, 7, 2, 9, 3, 8, 4, 6, 10, 11, 12], [1.0, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2]]
    )
    keys = keys / keys.norm(dim=-1, keepdim=True) * norms[None, :, :, None]
    layer, pos = built_layer(keys)
    make_policy("knorm").compress_layer(layer, torch.zeros(1, 4, 12, D), step_for(pos, [3]), 0, 1, 1.0)
    assert kept(layer) == [[{1, 3, 5}, {0, 10, 11}]]
    assert layer.keys.shape[2] == 3  # really smaller


# -- snapkv --------------------------------------------------------------------------------------
def aligned_case(target: int, s: int = 64, h: int = 2, group: int = 2):
    """Keys small except `target`, which every query head points at."""
    keys = small_keys(1, h, s)
    direction = torch.ones(D) / D**0.5
    keys[:, :, target] = direction * 8.0
    queries = direction.expand(1, h * group, s, D).clone() * 8.0
    return keys, queries


def test_snapkv_keeps_the_key_its_window_attends_to_plus_the_window():
    keys, queries = aligned_case(target=10)
    layer, pos = built_layer(keys)
    policy = make_policy("snapkv", window=4, kernel=1)
    policy.compress_layer(layer, queries, step_for(pos, [5]), 0, 1, D**-0.5)
    assert kept(layer) == [[{10, 60, 61, 62, 63}] * 2]


def test_snapkv_pooling_keeps_the_neighbourhood():
    keys, queries = aligned_case(target=20)
    layer, pos = built_layer(keys)
    policy = make_policy("snapkv", window=4, kernel=7)  # avg pooling spreads the spike over 17..23
    policy.compress_layer(layer, queries, step_for(pos, [4 + 7]), 0, 1, D**-0.5)
    assert kept(layer) == [[set(range(17, 24)) | {60, 61, 62, 63}] * 2]


def test_snapkv_window_is_capped_by_the_prompt_and_budget():
    keys, queries = aligned_case(target=2, s=10)
    layer, pos = built_layer(keys)
    make_policy("snapkv").compress_layer(layer, queries, step_for(pos, [3]), 0, 1, D**-0.5)
    assert kept(layer) == [[{7, 8, 9}] * 2]  # window 32 > prompt: the newest tokens win


def test_snapkv_aggregates_each_gqa_group_by_its_mean():
    s = 64
    keys = small_keys(1, 1, s)
    d1, d2 = torch.zeros(D), torch.zeros(D)
    d1[0], d2[1] = 1.0, 1.0
    keys[0, 0, 10] = d1 * 8
    keys[0, 0, 30] = d2 * 8
    queries = torch.zeros(1, 2, s, D)
    queries[0, 0] = d1 * 8  # head 0 of the group looks at 10
    queries[0, 1] = d2 * 6  # head 1 looks at 30, less sharply
    layer, pos = built_layer(keys)
    make_policy("snapkv", window=4, kernel=1).compress_layer(
        layer, queries, step_for(pos, [6]), 0, 1, D**-0.5
    )
    assert kept(layer) == [[{10, 30, 60, 61, 62, 63}]]


def test_attention_probs_are_causal_inside_the_window_and_skip_padding():
    keys = small_keys(2, 1, 8, scale=1.0)
    layer, pos = built_layer(keys, lengths=[8, 5])
    probs = attention_probs(layer, torch.randn(2, 2, 3, D), pos[:, -3:], 0.25)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 3))
    assert (probs[0, :, 0, 6:] == 0).all() and (probs[0, :, 1, 7:] == 0).all()  # causal
    assert (probs[1, :, :, :3] == 0).all()  # row 1's left padding is never attended


def test_pooling_ignores_left_padding_and_holes():
    scores = torch.tensor([[[0.0, 0.0, 1.0, 2.0, 3.0]]])
    padded = pool_in_position_order(scores, torch.tensor([[[EMPTY, EMPTY, 0, 1, 2]]]), 3, "avg")
    alone = pool_in_position_order(scores[..., 2:], torch.tensor([[[0, 1, 2]]]), 3, "avg")
    assert torch.allclose(padded[..., 2:], alone)
    holes = pool_in_position_order(
        torch.tensor([[[1.0, 0.0, 2.0, 3.0]]]), torch.tensor([[[0, EMPTY, 1, 2]]]), 3, "avg"
    )
    assert torch.allclose(holes[0, 0, [0, 2, 3]], alone[0, 0])


# -- pyramidkv -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "capacity,available,layers", [(100, 10_000, 30), (481, 1900, 30), (37, 60, 4), (5, 5, 7)]
)
def test_pyramid_capacities_shrink_with_depth_and_sum_to_the_uniform_total(capacity, available, layers):
    caps = pyramid_capacities(capacity, available, layers, beta=20)
    assert sum(caps) == capacity * layers
    assert all(a >= b for a, b in zip(caps, caps[1:]))
    assert max(caps) <= available
    if capacity < available:
        assert caps[0] > caps[-1]


def test_pyramid_follows_the_paper_sequence():
    caps = pyramid_capacities(200, 10_000, 5, beta=20)
    # min = c / beta = 10, max = 2c - min = 390, arithmetic in between
    assert caps == [390, 295, 200, 105, 10]


def test_pyramidkv_layer_budgets_sum_to_the_uniform_budget_per_row():
    layers = 6
    keys = small_keys(2, 2, 200)
    totals = torch.zeros(2, dtype=torch.long)
    per_layer = []
    for layer_idx in range(layers):
        layer, pos = built_layer(keys, lengths=[200, 150])
        queries = torch.randn(2, 4, 200, D)
        make_policy("pyramidkv", window=8).compress_layer(
            layer, queries, step_for(pos, [50, 38]), layer_idx, layers, 0.25
        )
        n = (layer.positions != EMPTY).sum(-1)  # [b, h]
        assert (n == n[:, :1]).all()
        per_layer.append(n[:, 0])
        totals += n[:, 0]
    assert totals.tolist() == [50 * layers, 38 * layers]
    assert per_layer[0][0] > per_layer[-1][0]


# -- h2o -----------------------------------------------------------------------------------------
def heavy_case(s=32, heavy=(3, 7)):
    keys = small_keys(1, 1, s)
    direction = torch.ones(D) / D**0.5
    for p in heavy:
        keys[:, :, p] = direction * 6.0
    queries = direction.expand(1, 2, s, D).clone() * 6.0
    return keys, queries


def test_h2o_keeps_accumulated_heavy_hitters_and_recent_tokens():
    keys, queries = heavy_case()
    layer, pos = built_layer(keys)
    policy = make_policy("h2o")
    policy.compress_layer(layer, queries, step_for(pos, [4]), 0, 1, D**-0.5)
    assert kept(layer) == [[{3, 7, 30, 31}]]
    assert layer.slot_stats["h2o"].shape == (1, 1, 4)
    # the accumulated attention of the heavy hitters is what every query gave them
    assert layer.slot_stats["h2o"][0, 0, :2].sum() > 20


def test_h2o_accumulates_during_decoding_and_stays_capped():
    keys, queries = heavy_case()
    layer, pos = built_layer(keys)
    policy = make_policy("h2o")
    policy.compress_layer(layer, queries, step_for(pos, [4]), 0, 1, D**-0.5)
    before = layer.slot_stats["h2o"].clone()
    direction = torch.ones(D) / D**0.5
    for t in range(32, 40):
        new_pos = torch.tensor([[t]])
        layer.append(small_keys(1, 1, 1, seed=t), small_keys(1, 1, 1, seed=t), new_pos)
        policy.compress_layer(
            layer, (direction * 6.0).expand(1, 2, 1, D), step_for(new_pos, [4]), 0, 1, D**-0.5
        )
        assert layer.keys.shape[2] == 4
    assert kept(layer) == [[{3, 7, 38, 39}]]
    assert (layer.slot_stats["h2o"][0, 0, :2] > before[0, 0, :2]).all()


# -- tova ----------------------------------------------------------------------------------------
def test_tova_averages_the_last_query_over_all_heads_and_keeps_the_newest():
    s = 20
    keys = small_keys(1, 2, s)
    d1 = torch.zeros(D)
    d1[0] = 1.0
    keys[0, 0, 5] = d1 * 8  # only kv head 0 has a key the last query points at
    queries = torch.zeros(1, 4, s, D)
    queries[:, :, -1] = d1 * 8
    layer, pos = built_layer(keys)
    make_policy("tova").compress_layer(layer, queries, step_for(pos, [2]), 0, 1, D**-0.5)
    assert kept(layer) == [[{5, 19}, {5, 19}]]  # one kept set for the layer


# -- adakv ---------------------------------------------------------------------------------------
def test_adakv_capacities_favour_dispersed_heads_and_respect_the_floor():
    s = 100
    concentrated = torch.zeros(s)
    concentrated[:3] = torch.tensor([0.5, 0.3, 0.2])
    dispersed = torch.full((s,), 0.01)
    scores = torch.stack([concentrated, dispersed])[None]  # [1, 2, s]
    caps = head_capacities(scores, torch.tensor([20]), alpha=0.2)
    assert caps.sum() == 40
    assert caps[0, 1] > caps[0, 0]
    assert caps[0, 0] >= int(0.2 * 20)
    # counts: the concentrated head wins 3 of the 40 global picks, the dispersed 37
    assert caps.tolist() == [[round(0.8 * 3 + 4), 40 - round(0.8 * 3 + 4)]]


def test_adakv_stores_heads_ragged_and_keeps_the_exact_layer_total():
    s = 80
    keys = small_keys(2, 2, s)
    direction = torch.ones(D) / D**0.5
    keys[:, 0, 50] = direction * 8.0  # kv head 0's group attends to one key: concentrated
    queries = torch.zeros(2, 4, s, D)
    queries[:, :2] = direction * 8.0  # kv head 1's group has flat attention (zero queries)
    policy = make_policy("adakv", window=4)
    layer = policy.make_layer()
    assert isinstance(layer, RaggedKVLayer)
    _, pos = built_layer(keys, lengths=[80, 60])
    layer.append(keys, keys + 1, pos)
    policy.compress_layer(layer, queries, step_for(pos, [20, 15]), 0, 1, D**-0.5)
    counts = layer.seg_lens
    assert counts.sum(-1).tolist() == [40, 30]  # kv_heads x row budget
    assert (counts[:, 1] > counts[:, 0]).all()  # the dispersed head gets more
    # head 0 wins the 7 max-pooled slots around its key, head 1 the rest of the 2 x 16 picks
    assert counts[0].tolist() == [4 + round(0.8 * 7 + 0.2 * 16), 40 - 4 - round(0.8 * 7 + 0.2 * 16)]
    assert {50} <= kept(layer)[0][0]
    assert (counts >= 4 + int(0.2 * 16)).all()  # window + floor
    # real storage: flat tensors hold exactly the kept tokens, no padding to the longest head
    assert layer.flat_keys.shape[0] == 70 and layer.keys.shape[2] == 0
    assert layer.filled_slots_per_row().tolist() == [40, 30]
    padded_bytes = 2 * 2 * int(counts.max()) * (2 * D * 4 + 4)
    assert layer.stored_bytes() < padded_bytes


def test_ragged_layer_attends_like_the_same_tokens_stored_dense():
    s = 30
    keys = small_keys(2, 2, s, scale=1.0)
    _, pos = built_layer(keys, lengths=[30, 22])
    ragged = RaggedKVLayer()
    ragged.append(keys, keys + 1, pos)
    g = torch.Generator().manual_seed(1)
    starts = [0, 0, 8, 8]  # row 1's first 8 slots are left padding
    index = torch.stack([(torch.randperm(22, generator=g)[:12] + o).sort().values for o in starts])
    index = index.reshape(2, 2, 12)
    filled = torch.ones(2, 2, 12, dtype=torch.bool)
    filled[1, 0, 9:] = False  # one head keeps fewer
    dense = KVLayer()
    dense.append(keys, keys + 1, pos)
    dense.keep(index, filled)
    ragged.keep(index, filled)
    assert ragged.seg_lens.tolist() == [[12, 12], [9, 12]]
    # decode one token into both and attend
    new_k, new_pos = torch.randn(2, 2, 1, D), torch.tensor([[30], [22]])
    dk, dv = dense.append(new_k, new_k + 1, new_pos)
    ragged.append(new_k, new_k + 1, new_pos)
    ragged.note_padding(False)
    q = torch.randn(2, 4, 1, D)
    out_dense = grouped_attention(q, dk, dv, dense.attention_mask(new_pos), 0.25)
    step = StepContext(cache=None, positions=new_pos, padded=False)
    assert torch.allclose(out_dense, ragged.attend(q, step, 0.25), atol=1e-6)
    assert torch.allclose(out_dense, ragged.attend_masked(q, step, 0.25), atol=1e-6)
    assert ragged.filled_slots_per_row().tolist() == dense.filled_slots_per_row().tolist()
    ragged.select_rows(torch.tensor([1]))
    dense.select_rows(torch.tensor([1]))
    assert kept(ragged) == kept(dense)


# -- per-row budgets -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o", "tova", "knorm", "adakv"])
def test_every_policy_respects_per_row_budgets(name):
    s = 120
    keys = small_keys(3, 2, s, scale=1.0)
    queries = torch.randn(3, 4, s, D)
    policy = make_policy(name)
    layer = policy.make_layer()
    _, pos = built_layer(keys, lengths=[120, 90, 40])
    layer.append(keys, keys + 1, pos)
    budgets = [30, 45, 40]  # the last row keeps everything
    policy.compress_layer(layer, queries, step_for(pos, budgets), 0, 1, D**-0.5)
    # (a single layer: the pyramid is flat; adakv's per-head counts sum to heads x budget)
    assert layer.filled_slots_per_row().tolist() == [2 * b for b in budgets]
    for row in kept(layer):
        for head in row:
            assert head <= set(range(s))
    assert kept(layer)[2] == [set(range(40))] * 2
