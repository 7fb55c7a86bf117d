"""`tova` (Oren et al. 2024, arXiv 2401.06104): token omission via attention of the last query.

"Transformers are Multi-State RNNs": the newest token's softmax attention over the cache,
averaged over all query heads of the layer, scores every cached token; the layer keeps the
top `budget` tokens, the same ones in every kv head (the paper's per-layer policy). The
newest token is always kept. Applied at prefill (the prompt's last query) and after every
decoded token, so the cache stays capped at the budget (one token evicted per step).
Under tensor parallelism the head average is all-reduced, so every rank keeps the same tokens.
"""

from __future__ import annotations

import torch

from policies.base import ScorePolicy
from policies.registry import register
from policies.signals import KEEP_BASE, all_reduce_sum, attention_probs, tp_world


@register
class TOVA(ScorePolicy):
    name = "tova"
    paper = "Transformers are Multi-State RNNs (Oren et al. 2024)"
    compress_during_decode = True
    same_heads = True  # one score per (row, slot), the same in every kv head

    def score(self, layer, queries, step, layer_idx, num_layers, scaling) -> torch.Tensor:
        last_pos = step.positions[:, -1:]
        newest = not step.padded  # the last query sees every filled slot: no position mask
        probs = attention_probs(layer, queries[:, :, -1:], last_pos, scaling, newest=newest)[:, :, 0]
        _, world = tp_world()
        mean = all_reduce_sum(probs.sum(dim=1)) / (probs.shape[1] * world)  # [b, s]
        scores = mean[:, None, :].expand(layer.positions.shape)
        newest = layer.positions.to(torch.int64) == last_pos[:, :, None].to(torch.int64)
        return torch.where(newest, KEEP_BASE + layer.positions.float(), scores)
