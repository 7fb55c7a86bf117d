"""Head-aggregating policies under tensor parallelism: 2 gloo ranks on CPU, heads split in two.

TOVA averages the last query's attention over all heads of the layer and AdaKV runs one top-k
over all heads; each rank holds half the heads, so both must reduce across ranks. Each rank
compresses its slice of a built layer; the kept positions of every head must equal the ones
a single process keeps with all heads.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.kv_cache import EMPTY, StepContext
from policies import make_policy
from policies.ragged_heads import RaggedKVLayer

D, KV_HEADS, GROUP, S = 8, 4, 2, 48
LENGTHS = [48, 37]
BUDGETS = [12, 9]
CASES = [("tova", {}), ("adakv", {"window": 4}), ("adakv", {"window": 4, "pooling": "avg", "alpha": 0.5})]


def built_inputs():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, KV_HEADS, S, D, generator=g)
    queries = torch.randn(2, KV_HEADS * GROUP, S, D, generator=g)
    # different heads prefer different tokens, with different sharpness: head-local decisions differ
    queries[:, :GROUP] *= 4.0
    queries[:, -GROUP:] *= 0.2
    pos = torch.full((2, S), EMPTY, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        pos[i, S - n :] = torch.arange(n)
    return keys, queries, pos


def compress(name, params, keys, queries, pos):
    """Kept positions [b, heads, slots] after compressing the given heads."""
    policy = make_policy(name, **params)
    layer = policy.make_layer()
    layer.append(keys, keys + 1, pos)
    step = StepContext(cache=None, positions=pos, compress=True, row_budgets=torch.tensor(BUDGETS))
    policy.compress_layer(layer, queries, step, 0, 1, D**-0.5)
    kept = layer.kept_positions() if isinstance(layer, RaggedKVLayer) else layer.positions
    return [[sorted(p for p in head.tolist() if p != EMPTY) for head in row] for row in kept]


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        keys, queries, pos = built_inputs()
        h = KV_HEADS // world
        k = keys[:, rank * h : (rank + 1) * h]
        q = queries[:, rank * h * GROUP : (rank + 1) * h * GROUP]
        results = [compress(name, params, k, q, pos) for name, params in CASES]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{n}{p or ''}" for n, p in CASES])
def test_two_ranks_keep_what_one_process_keeps(two_rank_results, case):
    name, params = CASES[case]
    keys, queries, pos = built_inputs()
    single = compress(name, params, keys, queries, pos)
    split = [two_rank_results[0][case][b] + two_rank_results[1][case][b] for b in range(2)]
    assert split == single
    # the reduction matters: compressing one rank's heads alone decides differently
    h = KV_HEADS // 2
    alone = compress(name, params, keys[:, h:], queries[:, h * GROUP :], pos)
    assert [row[h:] for row in single] != alone


def test_single_process_helpers_are_no_ops():
    from policies.signals import all_heads, all_reduce_sum, tp_world

    assert tp_world() == (0, 1)
    x = torch.randn(2, 3, 5)
    assert torch.equal(all_reduce_sum(x), x)
    assert all_heads(x)[0] is x and all_heads(x)[1] == 0
