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
    # Its layers keep every token they are given (a storage form alone: kivi quantises them all):
    # the engine then sizes their storage once for the whole prompt, as for a full cache, since
    # no compression will make room for the next chunk.
    keeps_every_token: ClassVar[bool] = False

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

    # The score of a slot depends on its position only, not on its head (whenever every head
    # holds the same positions): every head then keeps the same slots, and attention's masks
    # stay one per row. False is always safe.
    same_heads: ClassVar[bool] = False

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
        host = host_row_budgets(step) if budgets is step.row_budgets else None
        if host is not None:
            if not over_budget(layer, budgets, host):
                return
        elif bool(((layer.positions != EMPTY).sum(-1) <= budgets[:, None]).all()):
            return  # nothing over budget
        scores = self.score(layer, queries, step, layer_idx, num_layers, scaling).float()
        keep_topk(layer, scores, budgets, host_budgets=host, same_heads=self.same_heads)


def host_row_budgets(step: StepContext) -> list[int]:
    """`step.row_budgets` on the host: the engine's copy, else read once per forward (one device
    sync for all layers)."""
    if step.budgets_host is not None:
        return step.budgets_host
    host = step.extras.get("row_budgets_host")
    if host is None:
        host = step.extras["row_budgets_host"] = step.row_budgets.tolist()
    return host


def over_budget(layer: KVLayer, budgets: torch.Tensor, host: list[int]) -> bool:
    """Whether some (row, head) of `layer` holds more filled slots than its row's budget.

    `host` is `budgets` ([b]) on the host. Decided there (no device sync) when the slot count is
    within every budget, or when the layer promises no empty slot (`has_empty` False: every
    (row, head) holds all its slots, so the row of the smallest budget is over); else read from
    the device. A device sync here would make the GPU wait, idle, for everything the host still
    has to issue for this layer's compression (at prefill, the compression is host-bound).
    With the layer's row counts on the host (`row_counts_host`) it is always decided there."""
    slots = layer.positions.shape[-1]
    if not host or slots <= min(host):
        return False
    rows = layer.row_counts_host()
    if rows is not None:
        return any(n > budget for n, budget in zip(rows, host))
    if not layer.has_empty:
        return True
    return not bool(((layer.positions != EMPTY).sum(-1) <= budgets[:, None]).all())


# -- selection ------------------------------------------------------------------------------------
# A slot's rank is (score, position): higher scores first, and among equal scores the newer token.
# Exact ties are common (max pooling copies one value onto its neighbours; recent windows), and
# `topk` alone breaks them by slot index, which depends on a row's left padding. Ranking by
# (score, position) makes the kept set a function of the row's own tokens only, so a row keeps
# the same tokens batched or alone. Both go into one int64 per slot, so one sort or top-k ranks.
def ranking_key(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 [b, h, s] ordered as (score, position) is: the float32 score's bits, made to sort like
    the float (-0.0 counted as 0.0), in the high 32 bits, position + 1 (EMPTY: 0) in the low ones.
    Filled slots of a (row, head) hold distinct positions, so their keys are distinct."""
    bits = (scores.float() + 0.0).view(torch.int32)  # (+ 0.0 turns -0.0 into 0.0)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their magnitude order
    # monotone * 2**32 + (position + 1): the same bits as (monotone << 32) | (position + 1), in
    # one kernel (the int32 operand is widened inside the add)
    return torch.add(positions + 1, monotone.to(torch.int64), alpha=2**32)


def best_first(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Slot indices [b, h, s] from best to worst; equal scores rank the newer token first.

    Empty slots (lowest scores, position EMPTY) come last, in slot order."""
    return ranking_key(scores, positions).argsort(dim=-1, descending=True, stable=True)


def top_slots(
    key: torch.Tensor, budgets: torch.Tensor, max_budget: int, uniform: bool = False
) -> torch.Tensor:
    """[b, h, s] True for the `budgets[b, h]` slots of highest `key` (a `ranking_key`) per (row, head).

    `max_budget` >= every budget (a host int). `uniform` promises that every budget is the same,
    which spares sorting the top-k. Keys must be distinct where it matters (filled slots)."""
    s = key.shape[-1]
    k = min(max_budget, s)
    if k <= 0:
        return torch.zeros(key.shape, dtype=torch.bool, device=key.device)
    if k == s and uniform:
        return torch.ones(key.shape, dtype=torch.bool, device=key.device)
    top = key.topk(k, dim=-1, sorted=not uniform).values
    if uniform:
        threshold = top.min(dim=-1, keepdim=True).values
    else:
        threshold = torch.gather(top, 2, (budgets.clamp(min=1, max=k) - 1)[..., None])
    return (key >= threshold) & (budgets[..., None] > 0)


def compact_slots(chosen: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, filled) [b, h, width]: each (row, head)'s chosen slots in slot order, then unfilled
    entries (index 0). Every (row, head) must have at most `width` chosen slots."""
    b, h, s = chosen.shape
    place = torch.where(chosen, chosen.cumsum(dim=-1) - 1, width)  # not chosen: a spill column
    slots = torch.arange(s, device=chosen.device).expand(b, h, s)
    index = torch.zeros((b, h, width + 1), dtype=torch.int64, device=chosen.device)
    index = index.scatter_(2, place, slots)[..., :width]
    filled = torch.arange(width, device=chosen.device) < chosen.sum(dim=-1, keepdim=True)
    return index, filled


def keep_topk(
    layer: KVLayer,
    scores: torch.Tensor,
    budgets: torch.Tensor,
    max_budget: int | None = None,
    uniform: bool = False,
    host_budgets: list[int] | None = None,
    same_heads: bool = False,
) -> None:
    """Keep the top `budgets[b]` filled slots of every (row b, head) by `scores`; order by position.

    `budgets` is [b] (same for every head) or [b, heads] (per-head budgets). `max_budget`: the
    largest budget when the host knows it (else it is read from the device); `uniform`: every
    budget is the same. `host_budgets`: [b] `budgets` on the host (gives both, and, with the
    layer's row counts on the host, the kept counts: the layer's facts need no device read);
    `same_heads`: the scores are the same in every head that holds the same positions.
    The layer's filled slots must hold increasing positions per (row, head), as every `KVLayer`
    keeps them, so slot order is position order and no sort is needed to order the kept slots.
    """
    if host_budgets is not None:
        max_budget, uniform = max(host_budgets), len(set(host_budgets)) == 1
    facts = _kept_facts(layer, host_budgets, same_heads)
    if facts and uniform and min(facts["rows"]) == max_budget:
        _keep_top_k(layer, scores, max_budget, facts)
        return
    positions = layer.positions
    filled = positions != EMPTY
    if budgets.dim() == 1:
        budgets = budgets[:, None].expand(filled.shape[:2])
    if max_budget is None:
        max_budget = int(budgets.max())
    kept_len = min(max_budget, filled.shape[-1])
    key = ranking_key(scores.float().masked_fill(~filled, float("-inf")), positions)
    chosen = top_slots(key, budgets, kept_len, uniform) & filled
    layer.keep(*compact_slots(chosen, kept_len), **facts)


def _keep_top_k(layer: KVLayer, scores: torch.Tensor, k: int, facts: dict) -> None:
    """keep_topk when every (row, head) keeps exactly `k` slots (one budget, every row holds at
    least k filled slots: known on the host). The k best keys are then exactly the slots the
    threshold would choose (filled slots rank above empty ones, by distinct keys), so their
    indices, sorted, are the kept slots in slot order: no threshold, mask or compaction. Where
    every head holds the same positions and scores alike, one head is ranked for all."""
    positions = layer.positions
    heads = positions.shape[1]
    one_head = not facts["heads_differ"]  # every head holds the same positions and scores alike
    if one_head:  # rank one head's slots: the others keep the same ones
        scores, positions = scores[:, :1], positions[:, :1]
    scores = scores.float()
    if layer.has_empty:  # (else no slot to rank last)
        scores = scores.masked_fill(positions == EMPTY, float("-inf"))
    index = ranking_key(scores, positions).topk(k, dim=-1, sorted=False).indices
    # into slot order; as int32 (slot counts are far below 2**31) the radix sort takes half the passes
    # of int64's (8 -> 4 kernels: ~25 of a SmolLM2 layer's ~250 us of snapkv compression, H100)
    index = index.to(torch.int32).sort(dim=-1).values.long()
    layer.keep(index.expand(-1, heads, -1) if one_head else index, None, **facts)


def _kept_facts(layer: KVLayer, host_budgets: list[int] | None, same_heads: bool) -> dict:
    """`KVLayer.keep`'s host facts when they follow from the host's counts: a (row, head) of `n`
    filled slots keeps min(n, budget) of them (filled slots rank above empty ones, by distinct
    keys), and heads keep the same slots only if they held the same positions and score alike."""
    rows = layer.row_counts_host() if host_budgets is not None else None
    if rows is None:
        return {}
    kept = [min(n, budget) for n, budget in zip(rows, host_budgets)]
    return {"rows": kept, "heads_differ": layer.heads_differ or not same_heads}


def row_budget_values(budget: Budget | None, prompt_lengths: list[int]) -> list[int]:
    """Per-row token budgets on the host; `None` (the full cache) keeps every prompt token."""
    return [n if budget is None else budget.for_length(n) for n in prompt_lengths]


def row_budgets(budget: Budget | None, prompt_lengths: list[int], device) -> torch.Tensor:
    """Per-row token budgets ([b] int64 on `device`; `row_budget_values` on the host)."""
    return torch.tensor(row_budget_values(budget, prompt_lengths), dtype=torch.int64, device=device)
