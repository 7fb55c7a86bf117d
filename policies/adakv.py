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
from policies.base import Policy, keep_topk
from policies.ragged_heads import RaggedKVLayer
from policies.registry import register
from policies.signals import (
    all_heads,
    check_observation_params,
    in_window,
    snapkv_scores,
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
    """
    b, h, s = prefix_scores.shape
    total = capacity * h  # [b]
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
    remainder = (total - base.sum(-1).to(torch.int64)).clamp(min=0)  # [b], < h
    order = (base - real).argsort(dim=-1, stable=True)  # largest fractional part first
    rank = order.argsort(dim=-1)
    return (base + (rank < remainder[:, None]).to(torch.float64)).to(torch.int64)


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

    def head_budgets(self, layer: KVLayer, scores: torch.Tensor, step) -> torch.Tensor:
        """[b, h_local] tokens each of this rank's heads keeps (window included)."""
        w = window_size(step.positions, self.params.window)
        wpos = step.positions[:, -w:]
        windows = torch.minimum((wpos != EMPTY).sum(-1), step.row_budgets)  # [b]
        filled = layer.positions != EMPTY
        prefix = filled & ~in_window(layer.positions, wpos)
        available = prefix.sum(-1).min(-1).values  # [b]
        capacity = torch.minimum(step.row_budgets - windows, available).clamp(min=0)
        prefix_scores = scores.masked_fill(~prefix, float("-inf"))
        everything, offset = all_heads(prefix_scores)
        positions, _ = all_heads(layer.positions.float(), fill=float(EMPTY))
        caps = head_capacities(everything, capacity, self.params.alpha, positions.to(torch.int64))
        caps = caps[:, offset : offset + scores.shape[1]]
        return windows[:, None] + caps

    def compress_layer(self, layer, queries, step, layer_idx, num_layers, scaling) -> None:
        view = layer.as_dense() if isinstance(layer, RaggedKVLayer) else layer
        filled = view.positions != EMPTY
        over = not bool((filled.sum(-1) <= step.row_budgets[:, None]).all())
        if not over and tp_world()[1] == 1:
            return  # (under tensor parallelism every rank joins the all-reduce regardless)
        p = self.params
        scores = snapkv_scores(view, queries, step.positions, scaling, p.window, p.kernel, p.pooling).float()
        budgets = self.head_budgets(view, scores, step)
        if not over:
            return
        keep_topk(view, scores, budgets)
        if view is not layer:
            layer.store_dense(view.keys, view.values, view.positions)
