"""`knorm` (Devoto et al. 2024, arXiv 2406.11430): keep the keys with the lowest L2 norm.

"A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression": a key's (post-RoPE,
as cached) L2 norm is inversely correlated with the attention it receives, so each (row, kv
head) keeps its `budget` lowest-norm keys. No queries, no window: the score is -||k||.
"""

from __future__ import annotations

import torch

from policies.base import ScorePolicy
from policies.registry import register


@register
class KNorm(ScorePolicy):
    name = "knorm"
    paper = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (Devoto et al. 2024)"

    def score(self, layer, queries, step, layer_idx, num_layers, scaling) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)
