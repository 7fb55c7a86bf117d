"""The compressed KV cache: a `transformers.Cache` whose layers store only what a policy kept.

Each layer holds keys/values of shape [batch, kv_heads, slots, head_dim] and, beside them, the
absolute position of every slot ([batch, kv_heads, slots], int32; -1 marks an empty slot).
Rows and heads may keep different tokens and different numbers of tokens: the slot count is
the largest any (row, head) keeps, and shorter ones leave empty slots. Positions drive the
attention mask (causality and emptiness), so nothing is ever "evicted" by masking a
full-size cache: compressing a layer builds new, smaller tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

EMPTY = -1  # position of a slot that holds no token


@dataclass
class StepContext:
    """Per-forward state the engine hands to the cache and the attention hook (one object, no threading)."""

    cache: CompressedCache
    positions: torch.Tensor  # [batch, q] absolute positions of the new tokens, EMPTY for padding
    compress: bool = False  # compress each layer after its attention in this forward
    row_budgets: torch.Tensor | None = None  # [batch] tokens per head each row may keep
    extras: dict = field(default_factory=dict)  # policy-specific per-step data


class KVLayer(CacheLayerMixin):
    """One decoder layer's dense kept tokens plus their positions."""

    is_compileable = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None
        # Per-slot running statistics a policy keeps (e.g. H2O's accumulated attention),
        # each [b, h, slots]: new tokens start at 0, and they follow the slots through keep().
        self.slot_stats: dict[str, torch.Tensor] = {}

    # -- transformers' layer protocol -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, h, 0), dtype=torch.int32, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("KVLayer.update needs positions: go through CompressedCache.update")

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    # -- kvpipe ----------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        """Store new tokens ([b, h, q, d]) at `positions` ([b, q]); return all stored keys/values."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        b, h, q, _ = keys.shape
        new_pos = positions.to(torch.int32)[:, None, :].expand(b, h, q)
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)
        self.positions = torch.cat([self.positions, new_pos], dim=-1)
        for name, stat in self.slot_stats.items():
            self.slot_stats[name] = torch.cat([stat, stat.new_zeros((b, h, q))], dim=-1)
        return self.keys, self.values

    def attention_mask(self, query_positions: torch.Tensor) -> torch.Tensor:
        """Boolean mask [b, h_or_1, q, slots]: a query sees filled slots at or before its position.

        A padding query (EMPTY) is let see the new tokens of its own forward, so its row of
        attention is never empty (an all-masked row gives NaN, and NaN * 0 spreads).
        """
        pos = self.positions
        if bool((pos == pos[:, :1]).all()):  # every head keeps the same slots: one mask for all
            pos = pos[:, :1]
        q = query_positions[:, None, :, None]
        k = pos[:, :, None, :]
        mask = (k <= q) & (k != EMPTY)
        q_len = query_positions.shape[-1]
        pad_query = (query_positions == EMPTY)[:, None, :, None]
        own_forward = torch.zeros_like(mask[:1, :1, :1, :])
        own_forward = own_forward.expand(1, 1, 1, mask.shape[-1]).clone()
        own_forward[..., -q_len:] = True
        return mask | (pad_query & own_forward)

    def keep(self, index: torch.Tensor, filled: torch.Tensor) -> None:
        """Keep slots `index` ([b, h, k]); slots where `filled` is False become empty."""
        d = self.keys.shape[-1]
        gather = index[..., None].expand(*index.shape, d)
        self.keys = torch.gather(self.keys, 2, gather).contiguous()
        self.values = torch.gather(self.values, 2, gather).contiguous()
        pos = torch.gather(self.positions, 2, index)
        self.positions = torch.where(filled, pos, torch.full_like(pos, EMPTY)).contiguous()
        for name, stat in self.slot_stats.items():
            self.slot_stats[name] = torch.gather(stat, 2, index).masked_fill(~filled, 0).contiguous()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished rows leave the batch)."""
        if self.is_initialized:
            self.keys = self.keys[rows]
            self.values = self.values[rows]
            self.positions = self.positions[rows]
            for name, stat in self.slot_stats.items():
                self.slot_stats[name] = stat[rows]

    def filled_slots_per_row(self) -> torch.Tensor:
        """[b] number of filled (head, slot) pairs."""
        return (self.positions != EMPTY).sum(dim=(1, 2))

    def bytes_per_slot(self) -> int:
        return (
            self.keys.shape[-1] * self.keys.element_size()
            + self.values.shape[-1] * self.values.element_size()
        )

    def kept_bytes_per_row(self) -> torch.Tensor:
        """[b] bytes of key/value payload each row really occupies."""
        return self.filled_slots_per_row() * self.bytes_per_slot()

    def stored_bytes(self) -> int:
        """Bytes of every tensor this layer holds, empty slots and positions included."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))


class CompressedCache(Cache):
    """A `Cache` over `KVLayer`s; the engine sets `step` before every forward."""

    def __init__(self, num_layers: int, policy=None, layer_factory=None) -> None:
        if layer_factory is None:  # the policy's storage form (quantised, codebook...), else dense
            layer_factory = policy.make_layer if policy is not None else KVLayer
        super().__init__(layers=[layer_factory() for _ in range(num_layers)])
        self.policy = policy
        self.step: StepContext | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.step is None:
            raise RuntimeError("CompressedCache.update called without a StepContext")
        return self.layers[layer_idx].append(key_states, value_states, self.step.positions)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def select_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(rows)

    def kept_bytes_per_row(self) -> torch.Tensor:
        return sum(layer.kept_bytes_per_row() for layer in self.layers)

    def filled_slots_per_row(self) -> torch.Tensor:
        return sum(layer.filled_slots_per_row() for layer in self.layers)

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self.layers)
