"""The compressed KV cache: a `transformers.Cache` whose layers store only what a policy kept.

Each layer holds keys/values of shape [batch, kv_heads, slots, head_dim] and, beside them, the
absolute position of every slot ([batch, kv_heads, slots], int32; -1 marks an empty slot).
Rows and heads may keep different tokens and different numbers of tokens: the slot count is
the largest any (row, head) keeps, and shorter ones leave empty slots. Positions drive the
attention mask (causality and emptiness), so nothing is ever "evicted" by masking a
full-size cache: compressing a layer builds new, smaller tensors.

Slots live in buffers with spare capacity (`SlotBuffer`): a decode step writes its token in
place instead of copying the whole layer, which would triple the bytes a step moves. The
engine sizes the spare (`CompressedCache.set_spare`, `reserve`) so that nothing is
reallocated during decoding and no memory is held that decoding will not use.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from pipeline.attention_math import EMPTY, dense_bias, grouped_attention, position_mask
from pipeline.decode_kernels import static_decode


@dataclass
class StepContext:
    """Per-forward state the engine hands to the cache and the attention hook (one object, no threading)."""

    cache: CompressedCache
    positions: torch.Tensor  # [batch, q] absolute positions of the new tokens, EMPTY for padding
    compress: bool = False  # compress each layer after its attention in this forward
    row_budgets: torch.Tensor | None = None  # [batch] tokens per head each row may keep
    extras: dict = field(default_factory=dict)  # policy-specific per-step data
    padded: bool = True  # some new token is padding (EMPTY); the engine knows it without a device sync
    # The static-shape decode step (`pipeline.decode_graph`): per layer a 1-element int64 device
    # tensor, the slot that layer writes this step's token to (its used count). When set, layers
    # write at that device-side index and attend over their whole capacity with the count read
    # on the device, so that one CUDA graph serves every step; host bookkeeping follows after
    # the step (`CompressedCache.commit_static`).
    static_slots: list[torch.Tensor] | None = None
    # Per-row facts the engine knows on the host (None: unknown, and whoever needs one reads the
    # device instead). Left padding puts a row's new tokens last in the forward, at consecutive
    # positions; a compression that knows these reads nothing from the device.
    budgets_host: list[int] | None = None  # `row_budgets` on the host
    valid_host: list[int] | None = None  # new tokens of each row that are not padding
    seen_host: list[int] | None = None  # tokens of each row up to this forward's newest (its position + 1)

    _slot_positions: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def slot_positions(self) -> torch.Tensor:
        """`positions` as the int32 the cache stores (converted once per forward, not per layer)."""
        if self._slot_positions is None:
            self._slot_positions = self.positions.to(torch.int32)
        return self._slot_positions

    def valid_counts(self) -> list[int] | None:
        """Non-padding new tokens of each row on the host: all of them when nothing is padded."""
        if self.valid_host is not None:
            return self.valid_host
        return None if self.padded else [self.positions.shape[-1]] * self.positions.shape[0]


class SlotBuffer:
    """A tensor that grows along its slot dimension (2) with spare capacity; `view` is the used part."""

    def __init__(self, tensor: torch.Tensor | None = None, spare: int = 0) -> None:
        self.buf: torch.Tensor | None = None
        self.used = 0
        if tensor is not None:
            self.set(tensor, spare)

    def set(self, tensor: torch.Tensor | None, spare: int = 0) -> None:
        """Hold `tensor` (taken as is when no spare is asked for, else copied into a larger buffer)."""
        if tensor is None:
            self.buf, self.used = None, 0
            return
        self.used = tensor.shape[2]
        if spare <= 0:
            self.buf = tensor
            return
        self.buf = tensor.new_empty((*tensor.shape[:2], self.used + spare, *tensor.shape[3:]))
        self.buf[:, :, : self.used] = tensor

    @property
    def view(self) -> torch.Tensor | None:
        if self.buf is None:
            return None
        return self.buf if self.used == self.buf.shape[2] else self.buf[:, :, : self.used]

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else self.buf.shape[2]

    def append(self, new: torch.Tensor, spare: int) -> None:
        """Write `new` ([b, h, q, ...]) after the used slots; grow to used + q + `spare` if needed."""
        q = new.shape[2]
        if self.used + q > self.capacity:
            self.resize(self.used + q + spare)
        self.buf[:, :, self.used : self.used + q] = new
        self.used += q

    def resize(self, capacity: int) -> None:
        """Reallocate to exactly `capacity` slots (>= used), keeping the used ones."""
        if self.buf is None or capacity == self.capacity:
            return
        old = self.view
        self.buf = old.new_empty((*old.shape[:2], capacity, *old.shape[3:]))
        self.buf[:, :, : self.used] = old

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.buf is not None:
            self.buf = self.buf[rows]

    def stored_bytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()


class KVLayer(CacheLayerMixin):
    """One decoder layer's dense kept tokens plus their positions."""

    is_compileable = False
    is_sliding = False
    # The host counts each row's filled slots (`row_counts_host`) through this class's append,
    # note_padding and keep; a storage form that replaces those without calling them says False.
    counts_rows: ClassVar[bool] = True

    def __init__(self) -> None:
        self._k, self._v, self._p = SlotBuffer(), SlotBuffer(), SlotBuffer()
        # filled slots of each row, the same in every head (None: unknown), and the width of an
        # append that `note_padding` has not confirmed yet (its padding is unknown until then)
        self._rows: list[int] | None = None
        self._unconfirmed: int | None = None
        super().__init__()
        # Per-slot running statistics a policy keeps (e.g. H2O's accumulated attention),
        # each [b, h, slots]: new tokens start at 0, and they follow the slots through keep().
        self.slot_stats: dict[str, torch.Tensor] = {}
        # Host-side facts about the slots, kept without device syncs; they pick attention's
        # fast path. True is always safe (the masked path); False is a promise.
        self.has_empty = False  # some (row, head) has an EMPTY slot
        self.heads_differ = False  # heads hold different positions
        self.spare = 0  # slots to allocate beyond what is needed whenever storage is (re)allocated
        self._static_slot: torch.Tensor | None = None  # the slot of this static step's token (device)

    def __copy__(self):
        """A shallow copy with its own buffer bookkeeping (tensors shared until either side replaces them)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._k, new._v, new._p = copy.copy(self._k), copy.copy(self._v), copy.copy(self._p)
        new.slot_stats = dict(self.slot_stats)
        return new

    # keys / values / positions are the used part of growable buffers; assigning replaces them.
    @property
    def keys(self) -> torch.Tensor | None:
        return self._k.view

    @keys.setter
    def keys(self, value) -> None:
        self._k.set(value)

    @property
    def values(self) -> torch.Tensor | None:
        return self._v.view

    @values.setter
    def values(self, value) -> None:
        self._v.set(value)

    @property
    def positions(self) -> torch.Tensor | None:
        return self._p.view

    @positions.setter
    def positions(self, value) -> None:
        self._p.set(value)
        self._rows = None  # positions from outside: their counts are unknown

    def row_counts_host(self) -> list[int] | None:
        """Filled slots of each row (every head holds that many) on the host, or None if unknown."""
        return self._appended_rows() if self.counts_rows else None

    def _appended_rows(self) -> list[int] | None:
        """The row counts as this class's own methods kept them (None while an append is unconfirmed)."""
        return None if self._unconfirmed is not None else self._rows

    # -- transformers' layer protocol -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, h, 0), dtype=torch.int32, device=key_states.device)
        self._rows = [0] * b
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
        """Store new tokens ([b, h, q, d]) at `positions` ([b, q]).

        Returns the stored keys/values for direct callers; the cache ignores it (attention reads
        the layer through `attend`), so storage forms may return None.
        """
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        b, h, q, _ = keys.shape
        if self._unconfirmed is not None:  # the previous append was never confirmed
            self._rows = None
        self._unconfirmed = q
        new_pos = positions.to(torch.int32)[:, None, :].expand(b, h, q)
        self._k.append(keys, self.spare)
        self._v.append(values, self.spare)
        self._p.append(new_pos, self.spare)
        for name, stat in self.slot_stats.items():
            self.slot_stats[name] = torch.cat([stat, stat.new_zeros((b, h, q))], dim=-1)
        return self.keys, self.values

    def append_step(self, keys: torch.Tensor, values: torch.Tensor, step: StepContext) -> None:
        """Store a forward's new tokens ([b, h, q, d]) and confirm their padding: `append` at the
        step's positions, then `note_padding` with its host facts (`CompressedCache.update`). A
        storage form may store them in one go where the step's host facts make it cheaper (kivi: a
        chunk without padding at host-known slots)."""
        self.append(keys, values, step.slot_positions)
        self.note_padding(step.padded, step.valid_host)

    # -- the static-shape decode step (graph-capturable; dense layers, and storage forms that
    # implement these methods for their own form) --------------------------------------------
    def prepare_static(self) -> None:
        """Host-side work due before a static decode step, run eagerly before every one (captured
        graph replays included). Dense layers have none; a storage form does here what its `append`
        would do first and a replayed graph cannot (kivi: quantise the groups its rings completed).
        What it changes in place the next replay reads; a tensor it replaces changes
        `static_buffers`, so the runner captures anew."""

    def static_decode_ready(self) -> bool:
        """Whether this layer can take a static-shape decode step now: a plain dense layer (a storage
        form that overrides append/attend says so itself), no per-slot statistics to follow, room
        for one more token."""
        return type(self) is KVLayer and self.is_initialized and self._room_for_one_token()

    def _room_for_one_token(self) -> bool:
        """No per-slot statistics to follow, and the buffers have room for one more token each."""
        return (
            not self.slot_stats
            and self._k.used < self._k.capacity
            and self._v.used < self._v.capacity
            and self._p.used < self._p.capacity
            and self._k.used == self._v.used == self._p.used
        )

    @property
    def slots_used(self) -> int:
        """Slots in use (host count; the static step's write index)."""
        return self._k.used

    def static_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole key/value/position buffers (capacity included) a static step writes and reads."""
        return self._k.buf, self._v.buf, self._p.buf

    def append_static(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, slot) -> None:
        """Write one decode token ([b, h, 1, d]) at slot `slot` (1-element int64 device tensor).

        No host state changes: `commit_static` advances the used counts once the step ran.
        """
        b, h = keys.shape[:2]
        self._k.buf.index_copy_(2, slot, keys)
        self._v.buf.index_copy_(2, slot, values)
        self._p.buf.index_copy_(2, slot, positions.to(torch.int32)[:, None, :].expand(b, h, 1))
        self._static_slot = slot

    def attend_static(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention [b, H, 1, d] of a decode query over slots 0..(the slot just written)."""
        k, v, p = self.static_buffers()
        out = static_decode(query[:, :, 0], k, v, p if self.has_empty else None, self._static_slot, scaling)
        return out[:, :, None]

    def commit_static(self, steps: int = 1) -> None:
        """Host bookkeeping of `steps` static decode steps that ran (each stored one token)."""
        self._k.used += steps
        self._v.used += steps
        self._p.used += steps
        if self._rows is not None:  # a decode token per row, never padding
            self._rows = [n + steps for n in self._rows]

    def note_padding(self, padded: bool, valid: list[int] | None = None) -> None:
        """The last append stored padding (EMPTY) slots when `padded` is True; `valid`: how many of
        its tokens each row really got, when the host knows it (it keeps the row counts known)."""
        self.has_empty = self.has_empty or padded
        q, self._unconfirmed = self._unconfirmed, None
        if self._rows is None or q is None:
            return
        added = valid if padded else [q] * len(self._rows)
        self._rows = None if added is None else [n + a for n, a in zip(self._rows, added)]
        if self._rows is not None and self.counts_rows:
            self.has_empty = any(n < self._p.used for n in self._rows)  # exact, not only "or padded"

    def reserve(self, extra: int) -> None:
        """Right-size storage to the used slots plus `extra` (the tokens decoding will append)."""
        if self.is_initialized:
            for buf in (self._k, self._v, self._p):
                buf.resize(buf.used + extra)

    def attention_mask(self, query_positions: torch.Tensor) -> torch.Tensor:
        """Boolean mask [b, h_or_1, q, slots]: a query sees filled slots at or before its position."""
        return position_mask(self.positions, query_positions, self.heads_differ)

    def attend(self, query: torch.Tensor, step: StepContext, scaling: float) -> torch.Tensor:
        """This forward's attention [b, H, q, d] over every stored slot (the new tokens included).

        Storage forms override this with attention over their own form (quantised, ragged).
        """
        if step.static_slots is not None:
            return self.attend_static(query, scaling)
        keys, values = self.keys, self.values
        if self.has_empty or step.padded:
            bias = self.attention_mask(step.positions)
        else:
            bias = dense_bias(query.shape[2], keys.shape[2])
        return grouped_attention(query, keys, values, bias, scaling)

    def keep(
        self,
        index: torch.Tensor,
        filled: torch.Tensor | None,
        rows: list[int] | None = None,
        heads_differ: bool = True,
    ) -> None:
        """Keep slots `index` ([b, h, k]); slots where `filled` is False become empty.

        `rows`: how many slots each row keeps (`filled` True; the same in every head), when the
        caller knows it on the host; `heads_differ` then says whether heads may keep different
        positions (True is always safe). Without `rows` both facts are read from the device.
        `filled` None (with `rows`): every kept slot is filled (the layers that count rows only).
        """
        d = self.keys.shape[-1]
        gather = index[..., None].expand(*index.shape, d)
        pos = torch.gather(self.positions, 2, index)
        if filled is not None:
            pos = torch.where(filled, pos, torch.full_like(pos, EMPTY))
        self._k.set(torch.gather(self.keys, 2, gather), self.spare)
        self._v.set(torch.gather(self.values, 2, gather), self.spare)
        self._p.set(pos, self.spare)
        for name, stat in self.slot_stats.items():
            stat = torch.gather(stat, 2, index)
            self.slot_stats[name] = stat if filled is None else stat.masked_fill(~filled, 0).contiguous()
        if rows is not None:  # the facts attention's fast paths need, without a device sync
            self._rows = list(rows)
            self.has_empty = any(n < index.shape[-1] for n in rows)
            self.heads_differ = heads_differ
            return
        if filled is None:
            raise ValueError("keep: `filled` None needs the host's `rows`")
        # one device sync: the same facts read from the device (heads compared by kept positions)
        all_filled, same_heads = torch.stack([filled.all(), (pos == pos[:, :1]).all()]).tolist()
        self.has_empty = not all_filled
        self.heads_differ = not same_heads
        self._rows = None if self.has_empty else [index.shape[-1]] * index.shape[0]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished rows leave the batch)."""
        self._rows = None  # (which rows stay is on the device)
        if self.is_initialized:
            for buf in (self._k, self._v, self._p):
                buf.select_rows(rows)
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
        """Bytes of every tensor this layer holds: empty slots, spare capacity and positions included."""
        if not self.is_initialized:
            return 0
        return sum(buf.stored_bytes() for buf in (self._k, self._v, self._p))


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
        layer = self.layers[layer_idx]
        if self.step.static_slots is not None:
            layer.append_static(
                key_states, value_states, self.step.slot_positions, self.step.static_slots[layer_idx]
            )
            return key_states, value_states
        layer.append_step(key_states, value_states, self.step)
        # attention reads the layer's own storage (`KVLayer.attend`), not these
        return key_states, value_states

    def prepare_static(self) -> None:
        """Every layer's host work before a static decode step (`KVLayer.prepare_static`)."""
        for layer in self.layers:
            layer.prepare_static()

    def static_decode_ready(self) -> bool:
        """Every layer can take a static-shape decode step (see `KVLayer.static_decode_ready`)."""
        return all(layer.static_decode_ready() for layer in self.layers)

    def commit_static(self, steps: int = 1) -> None:
        for layer in self.layers:
            layer.commit_static(steps)

    def set_spare(self, slots: int) -> None:
        """Spare slots every layer allocates beyond its need when it (re)allocates storage."""
        for layer in self.layers:
            layer.spare = slots

    def reserve(self, extra: int) -> None:
        """Right-size every layer to its slots plus `extra` (before decoding `extra` tokens)."""
        for layer in self.layers:
            layer.reserve(extra)

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
