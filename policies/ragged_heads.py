"""A cache layer whose (row, kv head)s keep different numbers of tokens, with no padding stored.

`KVLayer` pads every (row, head) to the longest one, so per-head budgets (AdaKV) would pay
for the longest head everywhere. `RaggedKVLayer` stores the compressed tokens flattened:
one [N, d] tensor of keys (and of values, and an [N] int32 of positions) holding each
(row, head)'s segment back to back in (row, head) order, and `seg_lens` [b, h] giving the
segment lengths. Tokens appended after the last compression live in the dense tail that
`KVLayer` already manages (every head gets every new token, so the tail has no padding).

Policies (scoring, `keep`) see a transient dense view ([b, h, longest segment + tail, d],
empty slots at EMPTY) built for one layer at a time; kept and stored bytes come from the flat
tensors. Per-slot statistics (`slot_stats`) are not supported here.

Decoding reads the flat store in place: on CUDA (with Triton) `attend` for one query per row
runs `ragged_kernels.ragged_decode_attention` over each (row, head)'s segment plus the tail,
with no padded copy and no device sync. What it needs beyond the flat tensors (segment
offsets, int32 lengths, the longest segment as a host int) is computed once per compression
in `store_dense`. A prefill chunk (several queries, no padding, CUDA fp16/bf16) goes through
flash attention's varlen mode, one sequence per (row, head): its segment and its tail packed
side by side (one copy, no padding), lower-right causal (`ragged_kernels.ragged_prefill_attention`):
no padded copy, no mask. Other calls (padded batches, CPU, no Triton) take the exact masked
path over the dense view, or the base layer's path while nothing was compressed yet.

The dense view is built in one copy per tensor (flat tokens scattered to their padded rows,
indices from the segment lengths without a device sync); while nothing was compressed it is
the tail itself. The segment lengths size the store and give the host its view of the layer
(`filled_counts_host`: whether any (row, head) is over budget, known without a device read).
AdaKV's compressions (`store_dense(bound=...)`) size the store by a bound the host computes and
copy the lengths to the host without waiting (`DeferredRead`); the copy is taken, and the store
trimmed to its real tokens, when the store is next read, a forward later: no compression waits
for the device. Other stores (row selection, `keep`) read the lengths at once (one sync).
"""

from __future__ import annotations

import copy

import torch

from pipeline.attention_math import grouped_attention, position_mask
from pipeline.kv_cache import EMPTY, KVLayer
from policies import ragged_kernels

_NONZERO_STATIC = hasattr(torch, "nonzero_static")


def _nonzero(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D `mask`, `count` of them (no sync): the True count, or a
    bound the host knows (then index 0 fills the rest); all of them (a sync) without nonzero_static."""
    global _NONZERO_STATIC
    if _NONZERO_STATIC:
        try:
            return torch.nonzero_static(mask, size=count, fill_value=0).squeeze(1)
        except (NotImplementedError, RuntimeError):
            _NONZERO_STATIC = False
    return mask.nonzero().squeeze(1)


class DeferredRead:
    """A small device tensor on its way to the host: the copy is queued without waiting, and
    `get` waits for it only when the value is needed (one forward later, when it is long done)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.clone()
        self.host.deferred_read = True  # (`pipeline.bench.host_work` counts its read apart from syncs)

    def get(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _settled(name: str) -> property:
    """An attribute of `RaggedKVLayer` (kept as `_name`) read after `_settle`."""
    private = "_" + name

    def get(self):
        self._settle()
        return self.__dict__.get(private)

    def set_(self, value) -> None:
        self.__dict__[private] = value

    return property(get, set_)


class RaggedKVLayer(KVLayer):
    counts_rows = False  # (per (row, head): `filled_counts_host`)

    def __init__(self) -> None:
        super().__init__()
        # A store whose segment lengths are still on their way to the host (`store_dense` with a
        # bound): the flat tensors hold `bound` rows, the real tokens first. Reading the store's
        # host numbers or flat tensors takes the lengths first (`_settle`).
        self._pending: tuple[DeferredRead, int] | None = None
        self.flat_keys: torch.Tensor | None = None
        self.flat_values: torch.Tensor | None = None
        self.flat_positions: torch.Tensor | None = None
        self.seg_lens: torch.Tensor | None = None  # [b, h] int64
        self.seg_lens_host: list[list[int]] | None = None  # the same on the host, read at the last store
        # computed once per compression (`_index_segments`), read by every decode step
        self.seg_offsets: torch.Tensor | None = None  # [b * h] int64: exclusive cumsum of seg_lens
        self.seg_lens32: torch.Tensor | None = None  # [b * h] int32
        self.seg_cu: torch.Tensor | None = None  # [b * h + 1] int32: inclusive cumsum with a leading 0
        self.max_seg = 0  # host int: the longest segment (no device read per step)

    # the flat store's tensors and host numbers: each read after `_settle`
    flat_keys = _settled("flat_keys")
    flat_values = _settled("flat_values")
    flat_positions = _settled("flat_positions")
    max_seg = _settled("max_seg")
    seg_lens_host = _settled("seg_lens_host")

    def _settle(self) -> None:
        """Take the segment lengths of a deferred store: its host numbers, and its flat tensors
        trimmed to the real tokens (copied, so that the bound's spare rows are freed)."""
        pending = self.__dict__.get("_pending")
        if pending is None:
            return
        self._pending = None
        read, bound = pending
        host = read.get()
        lens = [n for row in host for n in row]
        n = sum(lens)
        if n > bound:  # nonzero_static dropped tokens: the caller's bound was wrong
            raise RuntimeError(f"ragged store: {n} kept tokens exceed the bound {bound}")
        if n < bound:
            for name in ("_flat_keys", "_flat_values", "_flat_positions"):
                self.__dict__[name] = self.__dict__[name][:n].clone()
        self._max_seg = max(lens, default=0)
        self._seg_lens_host = host

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.flat_keys = key_states.new_empty((0, d))
        self.flat_values = value_states.new_empty((0, value_states.shape[-1]))
        self.flat_positions = torch.empty((0,), dtype=torch.int32, device=key_states.device)
        self.seg_lens = torch.zeros((b, h), dtype=torch.int64, device=key_states.device)
        self.seg_lens_host = [[0] * h for _ in range(b)]
        self._index_segments(0)

    @property
    def seg_lens(self) -> torch.Tensor | None:
        return self._seg_lens

    @seg_lens.setter
    def seg_lens(self, value: torch.Tensor | None) -> None:
        self._seg_lens = value
        self.seg_lens_host = None  # set again by whoever knows it (store_dense)

    def filled_counts_host(self) -> list[list[int]] | None:
        """[b][h] filled slots of each (row, head), known on the host without a device read: the
        segment lengths of the last store plus the tail's row counts (`KVLayer`'s, which the
        engine's non-padding counts keep known in padded batches too); else None."""
        tail = self._appended_rows()
        if not self.is_initialized or tail is None or self.seg_lens_host is None:
            return None
        return [[n + t for n in row] for row, t in zip(self.seg_lens_host, tail)]

    def _index_segments(self, max_seg: int) -> None:
        lens = self.seg_lens.reshape(-1)
        ends = torch.cumsum(lens, 0)
        self.seg_offsets = ends - lens
        self.seg_lens32 = lens.to(torch.int32)
        self.seg_cu = torch.cat([lens.new_zeros(1), ends]).to(torch.int32)
        self.max_seg = max_seg

    # -- dense view (transient) -------------------------------------------------------------
    def _dense_rows(self, width: int) -> torch.Tensor:
        """[N] row of each flat token in a [b * h * width, ...] padded form (segment i at rows i * width...).

        Built from the segment lengths without a device sync (`output_size` is the host N)."""
        lens = self.seg_lens.reshape(-1)
        n = self.flat_keys.shape[0]
        seg = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens, output_size=n)
        return seg * width + (torch.arange(n, device=lens.device) - self.seg_offsets[seg])

    def _padded(self, flat: torch.Tensor, tail: torch.Tensor, fill, rows: torch.Tensor) -> torch.Tensor:
        """[b, h, max_seg + t, ...]: each (row, head)'s segment, `fill` after it, then the tail (one copy)."""
        b, h, t = tail.shape[:3]
        width = self.max_seg + t
        out = tail.new_full((b, h, width, *tail.shape[3:]), fill)
        if flat.shape[0]:
            out.view(b * h * width, -1)[rows] = flat.reshape(flat.shape[0], -1)
        out[:, :, self.max_seg :] = tail
        return out

    def dense_positions(self) -> torch.Tensor:
        if self.max_seg == 0:
            return self.positions
        rows = self._dense_rows(self.max_seg + self.positions.shape[-1])
        return self._padded(self.flat_positions, self.positions, EMPTY, rows)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of every slot, padded per (row, head): a transient copy
        (the tail itself, not a copy, while nothing was compressed)."""
        if self.max_seg == 0:
            return self.keys, self.values, self.positions
        rows = self._dense_rows(self.max_seg + self.keys.shape[-2])
        keys = self._padded(self.flat_keys, self.keys, 0, rows)
        values = self._padded(self.flat_values, self.values, 0, rows)
        positions = self._padded(self.flat_positions, self.positions, EMPTY, rows)
        return keys, values, positions

    def as_dense(self) -> KVLayer:
        """A plain `KVLayer` over the dense view (for scoring and `keep_topk`); see `store_dense`.

        Its `keep` replaces the view's tensors and never writes into them, so a view sharing the
        layer's tail (nothing compressed yet) leaves the layer intact."""
        view = KVLayer()
        view.keys, view.values, view.positions = self.dense()
        view.device = self.device
        view.is_initialized = True
        # once compressed, heads hold different positions and shorter segments leave empty slots:
        # the view's mask (scoring's attention) must be per head, not head 0's for every head
        view.has_empty = self.has_empty or self.max_seg > 0
        view.heads_differ = self.max_seg > 0
        return view

    def store_dense(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        bound: int | None = None,
        filled: torch.Tensor | None = None,
    ) -> None:
        """Replace the layer's content by the filled slots of a dense [b, h, k, ...] form (`filled`:
        the slots to store, when not every non-EMPTY one).

        The segment lengths give the flat token count (sizes the store), the longest segment
        (sizes views and the decode grid) and the host's view of the layer (`filled_counts_host`:
        the next over-budget test needs no read). Without `bound` they are read at once (one
        device sync). `bound` (>= the filled slots: the caller's host arithmetic) sizes the store
        instead, and the lengths come to the host without a wait (`DeferredRead`), taken when the
        store is next read: a compression then never waits for the device."""
        self._settle()
        if filled is None:
            filled = positions != EMPTY
        self.seg_lens = filled.sum(-1)
        if bound is None:
            host = self.seg_lens.tolist()
            lens = [n for row in host for n in row]
            rows, max_seg = sum(lens), max(lens, default=0)
        else:
            rows, max_seg = bound, None
        index = _nonzero(filled.reshape(-1), rows)
        self.flat_keys = keys.reshape(-1, keys.shape[-1]).index_select(0, index)
        self.flat_values = values.reshape(-1, values.shape[-1]).index_select(0, index)
        self.flat_positions = positions.reshape(-1).index_select(0, index).to(torch.int32)
        self._index_segments(max_seg)
        if bound is None:
            self.seg_lens_host = host
        else:
            self._pending = (DeferredRead(self.seg_lens), index.shape[0])
        b, h, _, d = keys.shape
        self.keys = keys.new_empty((b, h, 0, d))
        self.values = values.new_empty((b, h, 0, values.shape[-1]))
        self.positions = torch.empty((b, h, 0), dtype=torch.int32, device=positions.device)
        self._rows, self._unconfirmed = [0] * b, None  # (the tail's row counts)
        self.has_empty = False  # the flat store holds filled slots only; the tail is empty
        self.heads_differ = True

    def kept_positions(self) -> torch.Tensor:
        """[b, h, slots] positions of the dense view (EMPTY where a head keeps fewer)."""
        return self.dense_positions()

    # -- the layer protocol -----------------------------------------------------------------
    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.max_seg + self.keys.shape[-2]

    def append(self, keys, values, positions):
        """Store new tokens in the dense tail; returns the tail's keys/values (not the whole layer:
        attention reads the layer through `attend`, and building the dense view here would copy
        the whole cache every step)."""
        if self.slot_stats:
            raise RuntimeError("RaggedKVLayer does not keep per-slot statistics")
        return super().append(keys, values, positions)

    def attention_mask(self, query_positions: torch.Tensor) -> torch.Tensor:
        return position_mask(self.dense_positions(), query_positions, heads_differ=True)

    def attend(self, query: torch.Tensor, step, scaling: float) -> torch.Tensor:
        if step.static_slots is not None:
            return self.attend_static(query, scaling)
        if query.shape[2] == 1 and not step.padded and ragged_kernels.usable(query, query.shape[-1]):
            return self.attend_decode(query, scaling)
        if self.max_seg == 0:  # nothing compressed yet: the whole layer is the dense tail
            return super().attend(query, step, scaling)
        if (
            query.shape[2] > 1
            and not (step.padded or self.has_empty)
            and ragged_kernels.prefill_usable(query)
        ):
            return self.attend_prefill(query, scaling)
        return self.attend_masked(query, step, scaling)

    def attend_prefill(self, query: torch.Tensor, scaling: float, attn=None) -> torch.Tensor:
        """A prefill chunk (no padding, no EMPTY tail slot) over the flat store plus the tail: one
        varlen flash call over each (row, head)'s segment and tail, lower-right causal
        (`ragged_kernels.ragged_prefill_attention`); `attn` replaces flash in tests."""
        return ragged_kernels.ragged_prefill_attention(
            query,
            self.flat_keys,
            self.flat_values,
            self.seg_cu,
            self.max_seg,
            self.keys,
            self.values,
            scaling,
            attn=attn,
        )

    def attend_decode(
        self, query: torch.Tensor, scaling: float, tail_used: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One query per row ([b, H, 1, d]) over the flat store in place plus the tail (the kernel).

        `tail_used` (a static step): the device-held index of the tail's last slot; the kernel then
        reads the tail's whole buffers and their length on the device."""
        if tail_used is None:
            tail_k, tail_v, tail_p = self.keys, self.values, self.positions
        else:
            tail_k, tail_v, tail_p = super().static_buffers()
        out = ragged_kernels.ragged_decode_attention(
            query[:, :, 0],
            self.flat_keys,
            self.flat_values,
            self.seg_offsets,
            self.seg_lens32,
            self.max_seg,
            tail_k,
            tail_v,
            tail_p if self.has_empty else None,
            scaling,
            tail_used=tail_used,
        )
        return out[:, :, None]

    # -- the static-shape decode step (`pipeline.decode_graph`) -------------------------------
    # The flat store does not change while decoding (AdaKV compresses at prefill only); the
    # tail takes the token at the device-held slot like a dense layer (`KVLayer.append_static`),
    # and the kernel reads the tail's length on the device, its splits sized by the capacity.
    def static_decode_ready(self) -> bool:
        return (
            self.is_initialized
            and self._room_for_one_token()
            and ragged_kernels.usable_on(self.device, self.flat_keys.dtype, self.flat_keys.shape[-1])
        )

    def static_buffers(self) -> tuple[torch.Tensor, ...]:
        """The tail's whole buffers and the flat store a static step reads (a compression or a row
        selection replaces the latter, and then a captured step is stale)."""
        flat = (self.flat_keys, self.flat_values, self.seg_offsets, self.seg_lens32)
        return (*super().static_buffers(), *flat)

    def attend_static(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        return self.attend_decode(query, scaling, tail_used=self._static_slot)

    def attend_masked(self, query: torch.Tensor, step, scaling: float) -> torch.Tensor:
        """The exact path: masked attention over the padded dense view (a transient copy)."""
        keys, values, positions = self.dense()
        mask = position_mask(positions, step.positions, heads_differ=True)
        return grouped_attention(query, keys, values, mask, scaling)

    def keep(self, index: torch.Tensor, filled: torch.Tensor, **_host) -> None:
        """Keep slots `index` ([b, h, k]) of the dense view; unfilled ones are dropped (the store
        keeps its own host facts)."""
        keys, values, positions = self.dense()
        keys = torch.gather(keys, 2, index[..., None].expand(*index.shape, keys.shape[-1]))
        values = torch.gather(values, 2, index[..., None].expand(*index.shape, values.shape[-1]))
        positions = torch.gather(positions, 2, index)
        positions = torch.where(filled, positions, torch.full_like(positions, EMPTY))
        self.store_dense(keys, values, positions)

    def select_rows(self, rows: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = self._dense_rows(self.max_seg)  # the padded store alone (an empty tail below)
        keys = self._padded(self.flat_keys, self.keys[:, :, :0], 0, index)[rows]
        values = self._padded(self.flat_values, self.values[:, :, :0], 0, index)[rows]
        positions = self._padded(self.flat_positions, self.positions[:, :, :0], EMPTY, index)[rows]
        tail = [copy.copy(buf) for buf in (self._k, self._v, self._p)]  # capacity kept: decode goes on
        for buf in tail:
            buf.select_rows(rows)
        has_empty = self.has_empty  # (of the tail, which stays)
        self.store_dense(keys, values, positions)
        self._k, self._v, self._p = tail
        self.has_empty = has_empty
        self._rows = None  # (the tail's rows that stay are on the device)

    def filled_slots_per_row(self) -> torch.Tensor:
        return self.seg_lens.sum(-1) + (self.positions != EMPTY).sum(dim=(1, 2))

    def stored_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        tensors = (
            self.flat_keys,
            self.flat_values,
            self.flat_positions,
            self.seg_lens,
            self.keys,
            self.values,
            self.positions,
        )
        return sum(t.numel() * t.element_size() for t in tensors)
