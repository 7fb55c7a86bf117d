"""`pyramidkv` (Cai et al. 2024, arXiv 2406.02069): SnapKV scores, budgets shrinking with depth.

Scoring is SnapKV's (observation window, pooling, GQA-group mean; the window is always kept).
The prefix capacity per layer follows the paper's arithmetic sequence: with the uniform
capacity c = budget - window, the last layer gets c / beta, the first 2c - c/beta, linearly in
between, so the mean over layers is c; if the first layer would exceed the prompt's prefix
(n - window), it is capped there and the last layer raised to keep the mean (as in the
reference). The reference rounds steps down, which loses a few tokens; here the real-valued
sequence is floored and the remainder handed one token each to the shallowest layers that
are below the cap, so budgets are non-increasing with depth and sum to exactly the uniform
total (layers x budget), per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.kv_cache import EMPTY
from policies.base import host_row_budgets, keep_topk, over_budget
from policies.registry import register
from policies.signals import window_size
from policies.snapkv import SnapKV


def pyramid_capacities(capacity: int, available: int, num_layers: int, beta: float) -> list[int]:
    """Prefix tokens per layer (window excluded): non-increasing, summing to num_layers * capacity."""
    if num_layers == 1 or capacity <= 0:
        return [max(capacity, 0)] * num_layers
    low = capacity / beta
    high = 2 * capacity - low
    if high > available:
        high = float(available)
        low = 2 * capacity - high
    step = (high - low) / (num_layers - 1)
    floors = [int(high - i * step) for i in range(num_layers)]
    floors = [min(f, available) for f in floors]
    remainder = num_layers * capacity - sum(floors)
    i = 0
    while remainder > 0 and i < num_layers:
        if floors[i] < available:
            floors[i] += 1
            remainder -= 1
        i += 1
    return floors


@register
class PyramidKV(SnapKV):
    name = "pyramidkv"
    paper = (
        "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al. 2024)"
    )

    @dataclass
    class Params(SnapKV.Params):
        beta: float = 20.0

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.beta < 1:
                raise ValueError("beta must be >= 1")

    def pyramid_budgets(self, step, layer, layer_idx: int, num_layers: int) -> torch.Tensor:
        """[b] tokens per head this layer keeps: the row's window plus its pyramid capacity."""
        return self._forward_budgets(step, num_layers)[0][layer_idx]

    def _forward_budgets(self, step, num_layers: int) -> tuple[torch.Tensor, list[list[int]]]:
        """Every layer's budgets in this forward: ([layers, b] on the device, the same on the host).

        They depend on the step only (not on the layer), so they are computed once per forward
        and kept in the step's extras."""
        key = ("pyramidkv_budgets", self.params.window, self.params.beta, num_layers)
        cached = step.extras.get(key)
        if cached is not None:
            return cached
        windows, filled = self._windows_and_seen(step)
        rows = []
        for budget, win, n in zip(host_row_budgets(step), windows, filled):
            win = min(win, budget)
            caps = pyramid_capacities(budget - win, max(n - win, 0), num_layers, self.params.beta)
            rows.append([win + c for c in caps])
        host = [list(per_layer) for per_layer in zip(*rows)] if rows else [[] for _ in range(num_layers)]
        device = torch.tensor(host, dtype=torch.int64).to(step.row_budgets.device, non_blocking=True)
        step.extras[key] = (device, host)
        return device, host

    def _windows_and_seen(self, step) -> tuple[list[int], list[int]]:
        """Per row: its window's tokens (the non-padding ones among the forward's last w) and the
        tokens it has seen so far (the newest position + 1): from the engine's host facts, else
        read from the device (one read per forward)."""
        w = window_size(step.positions, self.params.window)
        valid = step.valid_counts()
        if valid is not None and step.seen_host is not None:
            return [min(w, v) for v in valid], step.seen_host  # a row's new tokens are its last
        windows = (step.positions[:, -w:] != EMPTY).sum(-1)
        filled = step.positions.max(dim=-1).values + 1
        windows, filled = torch.stack([windows.to(filled.dtype), filled]).tolist()
        return windows, filled

    def compress_layer(self, layer, queries, step, layer_idx, num_layers, scaling) -> None:
        device, host = self._forward_budgets(step, num_layers)
        budgets, host = device[layer_idx], host[layer_idx]
        if not over_budget(layer, budgets, host):
            return
        scores = self.score(layer, queries, step, layer_idx, num_layers, scaling).float()
        keep_topk(layer, scores, budgets, host_budgets=host)
