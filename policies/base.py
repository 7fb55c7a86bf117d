"""What every compression policy shares: budgets, the score-then-keep selection, the registry.

A policy is pure tensor code. Most policies only say how much each cached token is worth
(`score`); `ScorePolicy.compress_layer` then keeps each (row, head)'s top tokens within its
budget and physically shrinks the layer. Policies with another storage form (quantised,
merged) override `make_layer` and/or `compress_layer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from pipeline.kv_cache import EMPTY, KVLayer, StepContext

NEVER_EVICT = float("inf")


@dataclass
class Budget:
    """How many prompt tokens each (row, kv head) keeps: a ratio of the prompt or a token count."""

    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError("a budget is either a ratio of the prompt or a token count, exactly one")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"budget ratio must be in (0, 1], got {self.ratio}")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"budget tokens must be >= 1, got {self.tokens}")

    def for_length(self, prompt_tokens: int) -> int:
        if self.tokens is not None:
            return min(self.tokens, prompt_tokens)
        return max(1, min(prompt_tokens, math.ceil(self.ratio * prompt_tokens)))


class Policy:
    """Base policy: keeps everything (subclasses compress)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    compresses: ClassVar[bool] = True
    # Also compress after each decode step (keeps the cache capped at the budget during long
    # generations: H2O, TOVA). Otherwise only the prompt is compressed and new tokens append.
    compress_during_decode: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    def __init__(self, **params) -> None:
        known = {f.name for f in fields(self.Params)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"policy {self.name!r} has no parameter(s) {unknown}; its parameters are {sorted(known)}"
            )
        self.params = self.Params(**params)

    def make_layer(self) -> KVLayer:
        return KVLayer()

    def compress_layer(
        self,
        layer: KVLayer,
        queries: torch.Tensor,
        step: StepContext,
        layer_idx: int,
        num_layers: int,
        scaling: float,
    ) -> None:
        """Shrink `layer` to the step's row budgets; the base policy keeps everything."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class ScorePolicy(Policy):
    """Keep each (row, kv head)'s highest-scoring tokens; subclasses define `score`."""

    def score(
        self,
        layer: KVLayer,
        queries: torch.Tensor,
        step: StepContext,
        layer_idx: int,
        num_layers: int,
        scaling: float,
    ) -> torch.Tensor:
        """[b, kv_heads, slots] worth of each stored token; empty slots are ignored."""
        raise NotImplementedError

    def layer_budgets(self, row_budgets: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        """Budgets for this layer ([b]); pyramid-shaped policies override."""
        return row_budgets

    def compress_layer(self, layer, queries, step, layer_idx, num_layers, scaling) -> None:
        budgets = self.layer_budgets(step.row_budgets, layer_idx, num_layers)
        filled = layer.positions != EMPTY
        if bool((filled.sum(-1) <= budgets[:, None]).all()):
            return  # nothing over budget
        scores = self.score(layer, queries, step, layer_idx, num_layers, scaling).float()
        keep_topk(layer, scores, budgets)


def best_first(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Slot indices [b, h, s] from best to worst; equal scores rank the newer token first.

    Exact ties are common (max pooling copies one value onto its neighbours; recent windows),
    and `topk` breaks them by slot index, which depends on a row's left padding. Ordering by
    (score, position) makes the kept set a function of the row's own tokens only, so a row
    keeps the same tokens batched or alone. Empty slots come last.
    """
    by_position = positions.to(torch.int64).argsort(dim=-1, descending=True, stable=True)
    by_score = torch.gather(scores, 2, by_position).argsort(dim=-1, descending=True, stable=True)
    return torch.gather(by_position, 2, by_score)


def keep_topk(layer: KVLayer, scores: torch.Tensor, budgets: torch.Tensor) -> None:
    """Keep the top `budgets[b]` filled slots of every (row b, head) by `scores`; order by position.

    `budgets` is [b] (same for every head) or [b, heads] (per-head budgets).
    """
    filled = layer.positions != EMPTY
    scores = scores.float().masked_fill(~filled, float("-inf"))
    if budgets.dim() == 1:
        budgets = budgets[:, None].expand(filled.shape[:2])
    kept_len = int(budgets.max().clamp(max=scores.shape[-1]))
    top = best_first(scores, layer.positions)[..., :kept_len]
    rank = torch.arange(kept_len, device=scores.device)
    within_budget = rank[None, None, :] < budgets[..., None]
    chosen_filled = torch.gather(filled, 2, top) & within_budget
    # order kept slots by position so that layers stay in sequence order; empty slots go last
    pos = torch.gather(layer.positions, 2, top).to(torch.int64)
    order_key = torch.where(chosen_filled, pos, torch.full_like(pos, torch.iinfo(torch.int64).max))
    order = order_key.argsort(dim=-1)
    layer.keep(torch.gather(top, 2, order), torch.gather(chosen_filled, 2, order))


def row_budgets(budget: Budget | None, prompt_lengths: list[int], device) -> torch.Tensor:
    """Per-row token budgets; `None` (the full cache) keeps every prompt token."""
    values = [n if budget is None else budget.for_length(n) for n in prompt_lengths]
    return torch.tensor(values, dtype=torch.int64, device=device)
