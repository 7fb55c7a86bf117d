"""`h2o` (Zhang et al. 2023, arXiv 2306.14048): heavy hitters by accumulated attention + recent tokens.

Every slot accumulates the attention it receives from every query that sees it (softmax over
the slots the query sees, averaged over the query heads of its GQA group), in the layer's
`slot_stats["h2o"]`: at prefill from all prompt queries (as the reference H2O and
KVCache-Factory do), then from each decoded token. Each (row, kv head) keeps its
`budget - recent` heaviest hitters plus the `recent` newest tokens, with
recent = budget * recent_fraction (the paper splits the budget evenly: recent_fraction 0.5).
The policy compresses during decoding too, so the cache stays capped at the budget and the
lowest-accumulated token is evicted at each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.kv_cache import EMPTY
from policies.base import ScorePolicy, host_row_budgets, keep_topk, over_budget
from policies.registry import register
from policies.signals import KEEP_BASE, group_mean, summed_attention, visible_slots

STAT = "h2o"


def recent_slots(positions: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """[b, h, s] True for each row's `recent[b]` newest positions."""
    newest = positions.to(torch.int64).amax(dim=(1, 2))  # [b]
    pos = positions.to(torch.int64)
    return (pos != EMPTY) & (pos > (newest - recent)[:, None, None])


@register
class H2O(ScorePolicy):
    name = "h2o"
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (Zhang et al. 2023)"
    compress_during_decode = True

    @dataclass
    class Params:
        recent_fraction: float = 0.5
        query_block: int = 256  # prefill queries per attention block (memory bound, not a result)

        def __post_init__(self) -> None:
            if not 0.0 <= self.recent_fraction <= 1.0:
                raise ValueError("recent_fraction must be in [0, 1]")
            if self.query_block < 1:
                raise ValueError("query_block must be >= 1")

    def accumulate(self, layer, queries, step, scaling) -> torch.Tensor:
        block = self.params.query_block
        valid = step.valid_counts()
        uptos = None
        if valid is not None and step.seen_host is not None:  # (else read per block from the device)
            uptos = visible_slots(valid, step.seen_host, queries.shape[2], layer.keys.shape[2], block)
        newest = not step.padded  # this forward's tokens are the last slots, none of them padding
        received = summed_attention(layer, queries, step.positions, scaling, block, uptos, newest)
        received = group_mean(received, layer.keys.shape[1])  # [b, h, s]
        acc = layer.slot_stats.get(STAT)
        acc = received if acc is None else acc + received
        layer.slot_stats[STAT] = acc
        return acc

    def recent_counts(self, budgets: torch.Tensor) -> torch.Tensor:
        """budget - floor(budget * (1 - recent_fraction)) per row, on the device (float64, as Python
        computes it: no host round trip)."""
        heavy = (budgets.to(torch.float64) * (1.0 - self.params.recent_fraction)).floor()
        return budgets - heavy.to(budgets.dtype)

    def score(self, layer, queries, step, layer_idx, num_layers, scaling) -> torch.Tensor:
        acc = layer.slot_stats[STAT]
        recent = recent_slots(layer.positions, self.recent_counts(step.row_budgets))
        return torch.where(recent, KEEP_BASE + layer.positions.float(), acc)

    def compress_layer(self, layer, queries, step, layer_idx, num_layers, scaling) -> None:
        self.accumulate(layer, queries, step, scaling)  # every step, over budget or not
        budgets, host = step.row_budgets, host_row_budgets(step)
        if not over_budget(layer, budgets, host):
            return
        scores = self.score(layer, queries, step, layer_idx, num_layers, scaling)
        keep_topk(layer, scores, budgets, host_budgets=host)
