"""`streaming_llm` (Xiao et al. 2023, arXiv 2309.17453): attention sinks plus a recent window.

The first `sink_tokens` positions are always kept; the rest of the budget goes to the most
recent tokens. Expressed as a score: sinks score +inf, every other token its position.

The keep needs no ranking where the host knows the layer's shape: in a layer without empty
slots whose heads hold the same positions, slots hold increasing positions, so the sinks are a
prefix of the slots and the most recent tokens their end. Each row then keeps its sink prefix
and the last `budget - sinks` slots, the set the ranking would choose, without the top-k and
sort over every slot (on SmolLM2 shapes at 32K those were most of the policy's prefill cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policies.base import NEVER_EVICT, ScorePolicy, host_row_budgets
from policies.registry import register


@register
class StreamingLLM(ScorePolicy):
    name = "streaming_llm"
    paper = "Efficient Streaming Language Models with Attention Sinks (Xiao et al. 2023)"
    same_heads = True  # a score is the slot's position

    @dataclass
    class Params:
        sink_tokens: int = 4

    def score(self, layer, queries, step, layer_idx, num_layers, scaling) -> torch.Tensor:
        sinks = layer.positions < self.params.sink_tokens
        return layer.positions.float().masked_fill_(sinks, NEVER_EVICT)

    def compress_layer(self, layer, queries, step, layer_idx, num_layers, scaling) -> None:
        budget = self._positional_budget(layer, step)
        if budget is None:
            super().compress_layer(layer, queries, step, layer_idx, num_layers, scaling)
            return
        slots = layer.positions.shape[-1]
        if slots <= budget:
            return  # nothing over budget
        b, heads = layer.positions.shape[:2]
        layer.keep(
            self._kept_slots(layer, budget).expand(b, heads, budget),
            None,
            rows=[budget] * b,
            heads_differ=False,
        )

    def _positional_budget(self, layer, step) -> int | None:
        """The one budget of every row when the keep is positional, else None (the ranking).

        Positional: the host knows each row's count, every slot is filled, every head holds the
        same positions, every row has the same budget, larger than the sinks (so every sink is
        kept and the recent part is not empty)."""
        if layer.has_empty or layer.heads_differ or step.row_budgets is None:
            return None
        rows = layer.row_counts_host()
        budgets = host_row_budgets(step)
        if rows is None or not budgets or len(set(budgets)) != 1:
            return None
        budget = budgets[0]
        return budget if budget > self.params.sink_tokens else None

    def _kept_slots(self, layer, budget: int) -> torch.Tensor:
        """[b, 1, budget] slots each row keeps, in slot order: its m sinks (positions below
        `sink_tokens`, the first m slots; m < budget) and then its last budget - m slots."""
        sink = self.params.sink_tokens
        positions = layer.positions[:, :1]
        slots = positions.shape[-1]
        m = (positions[..., :sink] < sink).sum(-1, keepdim=True)  # [b, 1, 1]
        j = torch.arange(budget, device=positions.device)
        # slot j for j < m, else the (j - m)th of the last budget - m slots: slots - budget + j
        return torch.where(j < m, j, j + (slots - budget))
