"""`adakv` (Feng et al. 2024, arXiv 2407.11550): adaptive per-head budgets over SnapKV scores.

Ada-SnapKV as in the authors' code (AdaptiveSnapKVCluster, GQA branch): SnapKV scores per kv
head (window attention, GQA-group mean, pooling; defaults window 32, kernel 7, max pooling as
the AdaKV repository). With the uniform prefix capacity C = budget - window per head, the
layer's h*C prefix slots are chosen by one top-k over the scores of all its heads (per row);
head i's count n_i is then blended with the floor: capacity_i = (1 - alpha) n_i + alpha C
(alpha = 0.2, the paper's safeguard), rounded by largest remainder so that the layer keeps
exactly h*C prefix tokens (the reference rounds each head and may drift by a few). Each head
keeps its window plus its top capacity_i prefix tokens.

Heads keep different numbers of tokens, so the layer is a `RaggedKVLayer` (no padding to the
longest head). Under tensor parallelism the top-k runs over the scores of every rank's heads
(gathered with an all-reduce), so the allocation equals the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.kv_cache import EMPTY, KVLayer
from policies.base import Policy, host_row_budgets, keep_topk, over_budget, ranking_key, top_slots
from policies.ragged_heads import RaggedKVLayer
from policies.registry import register
from policies.signals import (
    all_heads,
    check_observation_params,
    in_window,
    later_mask,
    snapkv_scores_and_window,
    tp_world,
    window_size,
)


def head_capacities(
    prefix_scores: torch.Tensor, capacity: torch.Tensor, alpha: float, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-head prefix capacities [b, h] from prefix scores [b, h, s] (-inf: not a candidate).

    capacity [b]: uniform per-head prefix capacity C of each row. The layer's top h*C scores
    over all heads give counts n (exact ties go to the lower head, then the newer position,
    so the result does not depend on slot layout); the result is (1 - alpha) n + alpha C
    rounded by largest remainder to sum exactly h*C.

    Only the counts matter, so no order is built: with t the (h*C)-th largest score of the row,
    each head counts its scores above t, and the picks still owed go to the scores equal to t
    in head order (the newer-position rule decides which of a head's tied slots, never how
    many). `positions` is accepted for compatibility and not needed.
    """
    b, h, s = prefix_scores.shape
    total = capacity * h  # [b]
    flat = prefix_scores.reshape(b, h * s).float()
    if b and h * s:
        ranked = flat.sort(dim=-1, descending=True).values
        threshold = torch.gather(ranked, 1, (total - 1).clamp(min=0, max=h * s - 1)[:, None])  # [b, 1]
        scores = flat.reshape(b, h, s)
        above = (scores > threshold[:, :, None]).sum(-1)  # [b, h]
        tied = (scores == threshold[:, :, None]).sum(-1)
        owed = total[:, None] - above.sum(-1, keepdim=True)  # picks left for the tied scores
        tied_before = tied.cumsum(-1) - tied  # tied scores of the lower heads
        # (a row of total 0 counts 0: its threshold is its largest score, so none is above it and
        # none is owed)
        counts = (above + torch.minimum((owed - tied_before).clamp(min=0), tied)).to(torch.float64)
    else:
        counts = torch.zeros((b, h), dtype=torch.float64, device=prefix_scores.device)
    real = (1.0 - alpha) * counts + alpha * capacity[:, None].to(torch.float64)
    base = real.floor()
    remainder = (total - base.sum(-1).to(torch.int64)).clamp(min=0)  # [b], < h
    # each head's place when heads are ordered by fractional part, largest first, ties by head
    # index (a stable sort's order), counted pairwise instead of sorted: [b, h, h] for small h
    frac = real - base
    other, this = frac[:, None, :], frac[:, :, None]  # [b, 1, h] (head j), [b, h, 1] (head i)
    lower = later_mask(h, frac.device).T  # [i, j]: j < i
    rank = ((other > this) | ((other == this) & lower)).sum(-1)  # [b, h]
    return (base + (rank < remainder[:, None]).to(torch.float64)).to(torch.int64)


def kept_bound(budgets: list[int], counts: list[list[int]] | None, heads: int) -> int:
    """A host bound on the slots a layer keeps (sizes the ragged store without a device read).

    Row r's heads keep sum(window + capacity_i) = h * (window + C) <= h * budget slots
    (`head_capacities` sums exactly h * C, and each head's count is within its filled slots),
    and never more than the row holds (`counts`, when known)."""
    if counts is None:
        return heads * sum(budgets)
    return sum(min(heads * budget, sum(row)) for budget, row in zip(budgets, counts))


@register
class AdaKV(Policy):
    name = "adakv"
    paper = "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation (Feng et al. 2024)"

    @dataclass
    class Params:
        window: int = 32
        kernel: int = 7
        pooling: str = "max"  # the AdaKV repository's default
        alpha: float = 0.2  # floor: each head keeps at least alpha * (budget - window) prefix tokens

        def __post_init__(self) -> None:
            check_observation_params(self.window, self.kernel, self.pooling)
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError("alpha must be in [0, 1]")

    def make_layer(self) -> KVLayer:
        return RaggedKVLayer()

    def head_budgets(
        self,
        layer: KVLayer,
        scores: torch.Tensor,
        step,
        window_slots: torch.Tensor | None = None,
        filled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[b, h_local] tokens each of this rank's heads keeps (window included); `filled`: the
        layer's non-EMPTY slots, when the caller has them."""
        windows = self._windows(step)
        if filled is None:
            filled = layer.positions != EMPTY
        if window_slots is None:
            w = window_size(step.positions, self.params.window)
            window_slots = in_window(layer.positions, step.positions[:, -w:])
        prefix = filled & ~window_slots
        available = prefix.sum(-1).min(-1).values  # [b]
        capacity = torch.minimum(step.row_budgets - windows, available).clamp(min=0)
        prefix_scores = scores.masked_fill(~prefix, float("-inf"))
        everything, offset = all_heads(prefix_scores)
        caps = head_capacities(everything, capacity, self.params.alpha)
        caps = caps[:, offset : offset + scores.shape[1]]
        return windows[:, None] + caps

    def _windows(self, step) -> torch.Tensor:
        """[b] each row's window tokens within its budget: the same for every layer of a forward,
        so made once per forward (kept in the step's extras)."""
        key = ("adakv_windows", self.params.window)
        if key not in step.extras:
            wpos = step.positions[:, -window_size(step.positions, self.params.window) :]
            step.extras[key] = torch.minimum((wpos != EMPTY).sum(-1), step.row_budgets)
        return step.extras[key]

    def compress_layer(self, layer, queries, step, layer_idx, num_layers, scaling) -> None:
        single = tp_world()[1] == 1
        host = host_row_budgets(step)
        ragged = isinstance(layer, RaggedKVLayer)
        counts = layer.filled_counts_host() if ragged else None
        if counts is not None:  # known on the host: no device sync before the work is queued
            over = any(n > budget for row, budget in zip(counts, host) for n in row)
            if not over and single:
                return
        view = layer.as_dense() if ragged else layer
        positions = view.positions
        filled = positions != EMPTY
        if counts is None:
            over = over_budget(view, step.row_budgets, host)
        if not over and single:
            return  # (under tensor parallelism every rank joins the all-reduce regardless)
        p = self.params
        scores, window_slots = snapkv_scores_and_window(
            view, queries, step.positions, scaling, p.window, p.kernel, p.pooling, newest=not step.padded
        )
        budgets = self.head_budgets(view, scores.float(), step, window_slots, filled)
        if not over:
            return
        if view is layer:
            keep_topk(layer, scores, budgets)
            return
        # Each (row, head)'s top `budgets` slots by (score, position) go straight to the flat store
        # (kept in slot order = position order); the per-head budgets stay on the device, so the
        # ranking spans every slot.
        key = ranking_key(scores.float().masked_fill(~filled, float("-inf")), positions)
        chosen = top_slots(key, budgets, key.shape[-1]) & filled
        bound = kept_bound(host, counts, scores.shape[1]) if single else None
        layer.store_dense(view.keys, view.values, positions, bound=bound, filled=chosen)
