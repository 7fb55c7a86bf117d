"""`snapkv` (Li et al. 2024, arXiv 2404.14469): observation-window attention, pooled.

The last `window` queries of the forward that compresses (min(window, prompt) for shorter
prompts) vote for the prefix: their softmax attention over the layer's slots (causal inside
the window) is summed over the window queries, averaged over the query heads of each GQA
group (one score per kv head, as kvpress and AdaKV's GQA branch do), and smoothed with a 1-D
pooling of `kernel` (avg or max, zero padding, computed in position order). Each (row, kv
head) keeps the window itself plus the top `budget - window` prefix tokens; the window is
always kept (if a budget is smaller than the window, its newest tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policies.base import ScorePolicy
from policies.registry import register
from policies.signals import check_observation_params, snapkv_scores


@register
class SnapKV(ScorePolicy):
    name = "snapkv"
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al. 2024)"

    @dataclass
    class Params:
        window: int = 32
        kernel: int = 7
        pooling: str = "avg"  # "avg" | "max"

        def __post_init__(self) -> None:
            check_observation_params(self.window, self.kernel, self.pooling)

    def score(self, layer, queries, step, layer_idx, num_layers, scaling) -> torch.Tensor:
        p = self.params
        return snapkv_scores(
            layer, queries, step.positions, scaling, p.window, p.kernel, p.pooling, newest=not step.padded
        )
