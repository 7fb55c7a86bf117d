"""`streaming_llm` (Xiao et al. 2023, arXiv 2309.17453): attention sinks plus a recent window.

The first `sink_tokens` positions are always kept; the rest of the budget goes to the most
recent tokens. Expressed as a score: sinks score +inf, every other token its position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policies.base import NEVER_EVICT, ScorePolicy
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
