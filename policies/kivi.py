"""`kivi` (Liu et al. 2024, arXiv 2402.02750): tuning-free asymmetric 2/4-bit KV quantisation.

Storage (`QuantizedKVLayer`), per (row, kv head), over that row's own tokens (padding is never
stored, so groups line up with the row's tokens whatever its batch's padding):

- keys are quantised **per channel**: each channel of a group of `group_size` consecutive
  tokens shares one scale and zero point (min) (the paper's G = 32);
- values are quantised **per token**: each group of `group_size` consecutive channels of one
  token shares a scale and zero point (min(group_size, head_dim) channels when the head is
  narrower than a group);
- asymmetric: q = round((x - min) / scale), scale = (max - min) / (2**bits - 1); x' = q*scale + min;
- payload packed 4 (2-bit) or 2 (4-bit) values per uint8; scales and zero points in the model
  dtype (fp32 on CPU, bf16 on GPU);
- the residual stays full precision (paper Algorithm 1, R = `residual`, 128): key tokens are
  kept in full precision until `residual` of them have gathered (a multiple of the group),
  then quantised together (at prefill every complete block of `residual` tokens is quantised,
  `n mod residual` stay full precision); values keep at least the newest `residual` tokens in
  full precision: once `residual + group_size` have gathered, the oldest `group_size` of them are
  quantised together (one bulk quantisation every G decode steps, not one per step; the paper's
  code quantises one value per step), so between R and R + G - 1 values stay full precision.

When: the tokens of a forward are stored in full precision and that forward's attention uses
them as they are (the paper's prefill attends in full precision; at decode the new token joins
the residual before attention); quantisation of complete groups happens right after the
layer's attention (`compress_layer`) or at the latest when the next forward appends.
Attention: decode steps on CUDA run the fused Triton kernel over the packed store
(`policies.kivi_kernels.decode_attention`); forwards of several tokens (prefill chunks) attend
with flash over the de-quantised earlier tokens (a Triton kernel writes them in the model dtype)
plus the residual; flushes of layers whose (row, head)s hold equal counts quantise with Triton
kernels on CUDA; everything has a torch path (CPU, ragged counts) that the kernels equal.

Prefill chunks (the cache's `append_step`: no padding, equal counts) cost the host little beyond
a full cache's append: the tokens go to host-known slots by slices, the counts advance on the
host only (the device's catch up when read), a compressing forward's rings hold every token at
its own index so that attention de-quantises the earlier tokens into them and reads them in place
(one kernel for keys and values) and the flush quantises from them (one kernel) and puts the
residual back into decoding's rings; the store is sized once for the prompt (`keeps_every_token`).

Decode steps take the static step of `pipeline.decode_graph` (a CUDA graph on one GPU) where the
fused kernel serves: the token is written at each (row, head)'s count read on the device (equal
counts or not), the kernel reads the counts on the device over a grid sized by capacity, and the
flush a dynamic step's `append` begins with runs eagerly before the step (`prepare_static`),
advancing the device counts in place, so one capture serves every step (see "the static-shape
decode step" in `QuantizedKVLayer`).

Budget: KIVI evicts nothing, so a `Budget` does not change what it stores (one is still needed
so that the engine calls `compress_layer` after prefill). Its stated target is the byte ratio
it achieves by construction, `target_ratio()` (see there); `kept_bytes_per_row` counts packed
payload + scales + zero points + full-precision residual from the real tensors.

Eviction before quantisation (`snapkv+kivi`, ...): the evictor's `keep()` runs on the
full-precision tokens of the forward (one-shot prefill: everything), then KIVI quantises what
was kept. If an evictor ever drops tokens that are already quantised (chunked prefill,
decode-time eviction), the kept ones are de-quantised into the residual and quantised again
with their new neighbours (a second rounding of those tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.attention_math import dense_bias, grouped_attention
from pipeline.kv_cache import EMPTY, KVLayer
from pipeline.triton_gate import kernel_may_run
from policies import kivi_kernels
from policies.base import Policy
from policies.kivi_kernels import KiviStore, dequantized
from policies.registry import register
from policies.seqstore import _expand_index, compact, front_mask, ragged_append

# -- quantisation primitives (pure tensor code) ------------------------------------------------


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along the last dim (a multiple of 8 // bits) into uint8."""
    per = 8 // bits
    q = q.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    return (q << _shifts(bits, q.device)).sum(-1, dtype=torch.uint8)


_SHIFTS: dict[tuple[int, str], torch.Tensor] = {}


def _shifts(bits: int, device) -> torch.Tensor:
    """[8 // bits] uint8 bit offsets of the values packed in a byte (cached per device)."""
    key = (bits, str(device))
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(8 // bits, device=device, dtype=torch.uint8) * bits
    return _SHIFTS[key]


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., m] -> uint8 [..., m * 8 // bits]."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    vals = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def quantize_groups(x: torch.Tensor, bits: int, store_dtype: torch.dtype):
    """Asymmetric quantisation of groups along the last dim of `x` ([..., g]).

    Returns (packed uint8 [..., g * bits / 8], scale [...], zero [...]) with scale/zero stored
    in `store_dtype`; the integers are computed against the stored (rounded) scale and zero,
    so de-quantising with them is exact up to the integer rounding.
    """
    xf = x.float()
    lo, hi = torch.aminmax(xf, dim=-1)
    levels = (1 << bits) - 1
    zero = lo.to(store_dtype)
    scale = ((hi - lo) / levels).to(store_dtype)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((xf - zero.float()[..., None]) / s[..., None]).clamp(0, levels)
    return pack(q, bits), scale, zero


_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def _unpack_table(bits: int, device) -> torch.Tensor:
    """[256, 8 // bits] float32: the integers packed in each byte value (low bits first)."""
    key = (bits, str(device))
    if key not in _TABLES:
        _TABLES[key] = unpack(torch.arange(256, dtype=torch.uint8, device=device)[:, None], bits)[
            :, :
        ].float()
    return _TABLES[key]


def dequantize_groups(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype):
    """Inverse of `quantize_groups`: packed [..., g * bits / 8], scale/zero [...] -> [..., g]."""
    q = _unpack_table(bits, packed.device)[packed.long()]  # [..., m, per] one lookup per byte
    q = q.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))
    return torch.addcmul(zero.float()[..., None], q, scale.float()[..., None]).to(dtype)


def kivi_bytes(
    n: int, head_dim: int, bits: int, group_size: int, residual: int, dtype_bytes: int
) -> tuple[int, int]:
    """(key bytes, value bytes) KIVI stores for one (row, kv head) holding `n` tokens after a flush."""
    d, s, g = head_dim, dtype_bytes, group_size
    gv = min(g, d)
    unit = residual if residual > 0 else g
    nk = (n // unit) * unit
    nv = max(0, n - residual) // g * g
    key = nk * d * bits // 8 + (nk // g) * d * 2 * s + (n - nk) * d * s
    value = nv * d * bits // 8 + nv * (d // gv) * 2 * s + (n - nv) * d * s
    return key, value


class _DeviceCount:
    """A device count of `QuantizedKVLayer` (`_n`, `_nk`, `_nv`), stored under `attr`: reading or
    replacing it first brings the counts up to date if they are behind the host's (see "the device
    counts" in the class)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        if layer._counts_behind:
            layer._catch_up_counts()
        return layer.__dict__[self.attr]

    def __set__(self, layer, value: torch.Tensor) -> None:
        if layer._counts_behind:
            layer._catch_up_counts()
        layer.__dict__[self.attr] = value


class QuantizedKVLayer(KVLayer):
    """KIVI storage: packed per-channel keys, packed per-token values, full-precision residuals.

    Every (row, head) holds its own token sequence, `_n` tokens long; its first `_nk` keys and
    first `_nv` values are quantised, the rest are in the residual rings (`_kres`/`_vres`
    [b, h, W + 1, d]: the key of token j >= nk is in slot j % Wk, the value of token j >= nv
    in slot j % Wv; slot W is a dump for padding). Nothing moves when a token leaves a
    residual: it is quantised and written after the packed tokens, in place.

    The packed stores and the positions live in buffers with spare capacity (the last slot of
    each is a dump for the writes of (row, head)s that have nothing to write), grown
    geometrically, to the engine's spare (the rest of the prompt and the decode tokens: once for
    a prefill) or to what `reserve` asks, so a decode step copies nothing already stored. Ring
    slots that hold no live token hold whatever they held: only live tokens are ever read.
    The host mirrors the counts (`_hn`, `_hnk`, `_hnv`, CPU): a forward without padding
    (`note_padding(False)`) advances them without a device sync; after one with padding they
    are read back once, when next needed. While every (row, head) holds the same counts the host
    keeps them as three ints (`_uni`) and builds the CPU tensors only when a caller asks.

    `keys`, `values` and `positions` are the de-quantised view over slots [0, max n) (slot j of
    a (row, head) = its j-th token; slots past its length are EMPTY) - the reference path, used
    for prefill and eviction; decode attention (`attend`) reads the packed store directly.
    """

    counts_rows = False  # (its own counts: `_hn`)

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128) -> None:
        self.bits = bits
        self.group_size = group_size
        self.residual = residual
        self._ready = False
        self._counts_behind = False  # (see "the device counts")
        super().__init__()
        self.has_empty = self.heads_differ = True  # ragged per-(row, head) views: the masked path
        self._fits: bool | None = None  # the fused decode kernel takes this layer's shapes (seen at `attend`)
        self._lag_of: tuple | None = None  # the host counts `_lag_val` was derived from (`_lags`)
        self._lag_val = (0, 0, 0)

    # keys / values / positions are views built on demand from the compressed storage; the
    # base classes assign None to them in __init__, which is accepted and ignored.
    @property
    def keys(self) -> torch.Tensor | None:
        return self._assemble("k") if self._ready else None

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("QuantizedKVLayer.keys is derived from its quantised storage")

    @property
    def values(self) -> torch.Tensor | None:
        return self._assemble("v") if self._ready else None

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("QuantizedKVLayer.values is derived from its quantised storage")

    @property
    def positions(self) -> torch.Tensor | None:
        return self._pos if self._ready else None

    @positions.setter
    def positions(self, value) -> None:
        if value is not None:
            raise AttributeError("QuantizedKVLayer.positions is derived from its storage")

    # used parts of the buffers
    @property
    def _pos(self) -> torch.Tensor:
        return self._pos_buf[:, :, : self._slots()]

    @property
    def _kq(self) -> torch.Tensor:
        return self._kq_buf[:, :, : self._key_groups()]

    @property
    def _kscale(self) -> torch.Tensor:
        return self._ks_buf[:, :, : self._key_groups()]

    @property
    def _kzero(self) -> torch.Tensor:
        return self._kz_buf[:, :, : self._key_groups()]

    @property
    def _vq(self) -> torch.Tensor:
        return self._vq_buf[:, :, : self._value_tokens()]

    @property
    def _vscale(self) -> torch.Tensor:
        return self._vs_buf[:, :, : self._value_tokens()]

    @property
    def _vzero(self) -> torch.Tensor:
        return self._vz_buf[:, :, : self._value_tokens()]

    @property
    def _kres(self) -> torch.Tensor:  # the key ring without its dump slot
        return self._kring[:, :, :-1]

    @property
    def _vres(self) -> torch.Tensor:
        return self._vring[:, :, :-1]

    # -- the device counts -------------------------------------------------------------------
    # `_n`, `_nk`, `_nv` ([b, h] int64 on the device) are what kernels and the index paths read.
    # A prefill chunk stored by slices (`_append_uniform`) and the flush that follows it advance
    # only the host's `_uni` and leave the device counts behind (`_counts_behind`): they are
    # written from `_uni` (three fills) when next read, once after the prefill rather than three
    # ops per chunk and layer. A flush of counts that are not behind advances them in place, as a
    # captured decode step reads them by address (and every static step reads them first).
    _n = _DeviceCount("_dn")
    _nk = _DeviceCount("_dnk")
    _nv = _DeviceCount("_dnv")

    def _catch_up_counts(self) -> None:
        """Write the uniform host counts into the device counts (in place: their addresses stay),
        in the inference mode they were made in (a read may come after the prefill's mode ended)."""
        self._counts_behind = False
        with torch.inference_mode(self._dn.is_inference()):
            for t, x in zip((self._dn, self._dnk, self._dnv), self._uni):
                t.fill_(x)

    # -- host mirror of the counts -----------------------------------------------------------
    # `_hc`: (n, nk, nv) as [b, h] CPU tensors, or None while the counts are uniform (`_uni`, three
    # host ints, is all the uniform paths need): the tensors are then built from `_uni` when a ragged
    # path or a caller asks for them (`_hn`, `_hnk`, `_hnv`), not advanced on every forward.
    @property
    def _hn(self) -> torch.Tensor:
        return self._host_counts()[0]

    @property
    def _hnk(self) -> torch.Tensor:
        return self._host_counts()[1]

    @property
    def _hnv(self) -> torch.Tensor:
        return self._host_counts()[2]

    def _host_counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The host counts as they stand (no device read; see `_host` for exact ones)."""
        if self._hc is None:  # held as `_uni` only
            b, h = self._dn.shape
            self._hc = tuple(torch.full((b, h), x, dtype=torch.int64) for x in self._uni)
        return self._hc

    def _host(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, nk, nv) on the host, exact; reads them back (one sync) only when they are unknown."""
        if self._pending is not None or (self._hc is None and not isinstance(self._uni, tuple)):
            self._hc = tuple(torch.stack([self._n, self._nk, self._nv]).cpu().unbind(0))
            self._pending = None
            self._uni = _UNKNOWN
        return self._host_counts()

    def _uniform(self) -> tuple[int, int, int] | None:
        """(n, nk, nv) as ints when every (row, head) holds the same counts (host-known), else None.

        Equal counts let decode steps address the storage with host integers (slices, no index
        tensors) and let a forward without padding attend densely (flash, no mask)."""
        if self._uni is _UNKNOWN or self._pending is not None:
            hn, hnk, hnv = self._host()
            flat = [x.flatten() for x in (hn, hnk, hnv)]
            same = hn.numel() > 0 and all(bool((x == x[0]).all()) for x in flat)
            self._uni = tuple(int(x[0]) for x in flat) if same else None
        return self._uni

    def note_padding(self, padded: bool, valid: list[int] | None = None) -> None:
        super().note_padding(padded, valid)
        if self._ready and self._pending is not None and not padded:
            # every row and head stored all the new tokens
            if self._hc is not None:
                hn, hnk, hnv = self._hc
                self._hc = (hn + self._pending, hnk, hnv)
            if isinstance(self._uni, tuple):
                n, nk, nv = self._uni
                self._uni = (n + self._pending, nk, nv)
            self._pending = None

    @staticmethod
    def _max(x: torch.Tensor) -> int:
        return int(x.max()) if x.numel() else 0

    def _slots(self) -> int:
        u = self._uniform()
        return u[0] if u is not None else self._max(self._host()[0])

    def _key_groups(self) -> int:
        u = self._uniform()
        return (u[1] if u is not None else self._max(self._host()[1])) // self.group_size

    def _value_tokens(self) -> int:
        u = self._uniform()
        return u[2] if u is not None else self._max(self._host()[2])

    # -- storage ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty storage for rows and heads like `key_states`': counts, positions (room for this
        forward's tokens and the spare when the engine gives one), decoding's rings, and packed
        buffers of no item (their dump slot, never read: they are sized when first needed)."""
        b, h, q, d = key_states.shape
        g = self.group_size
        self.gv = min(g, d)
        if d % self.gv or (g * self.bits) % 8 or (d * self.bits) % 8:
            raise ValueError(
                f"kivi: head_dim {d} and group_size {g} do not pack into bytes at {self.bits} bits"
            )
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.head_dim = d
        dev, dt = key_states.device, key_states.dtype
        self._counts_behind = False
        self._n, self._nk, self._nv = torch.zeros((3, b, h), dtype=torch.int64, device=dev).unbind(0)
        self._hc = None  # (the host counts are `_uni`)
        self._pending: int | None = None
        self._uni = (0, 0, 0)
        room = q + self.spare if self.spare > 0 else 0  # (as `_grow` would size it for this forward)
        self._pos_buf = torch.full((b, h, room + 1), EMPTY, dtype=torch.int32, device=dev)
        # keys: groups of g tokens, per channel -> packed [b, h, groups, d, g*bits/8]
        self._kq_buf = torch.empty((b, h, 1, d, g * self.bits // 8), dtype=torch.uint8, device=dev)
        self._ks_buf = torch.empty((b, h, 1, d), dtype=dt, device=dev)
        self._kz_buf = torch.empty((b, h, 1, d), dtype=dt, device=dev)
        # values: per token, groups of gv channels -> packed [b, h, tokens, d*bits/8]
        self._vq_buf = torch.empty((b, h, 1, d * self.bits // 8), dtype=torch.uint8, device=dev)
        self._vs_buf = torch.empty((b, h, 1, d // self.gv), dtype=dt, device=dev)
        self._vz_buf = torch.empty((b, h, 1, d // self.gv), dtype=dt, device=dev)
        self._kring = torch.zeros((b, h, self._ring_min("k") + 1, d), dtype=dt, device=dev)
        self._vring = torch.zeros((b, h, self._ring_min("v") + 1, d), dtype=dt, device=dev)
        self._ready = True
        self.is_initialized = True
        self._decode_rings: dict[str, torch.Tensor] = {}  # (see `_append_uniform`)

    def __copy__(self):
        new = super().__copy__()
        new._decode_rings = {}  # never shared: a layer writes its residual into it
        return new

    def get_seq_length(self) -> int:
        return self._slots() if self._ready else 0

    def _unit(self) -> int:
        return self.residual if self.residual > 0 else self.group_size

    def _ring_min(self, which: str) -> int:
        """Ring slots a decode step needs: the most residual tokens after a flush, plus one."""
        return self._unit() if which == "k" else self.residual + self.group_size

    def _grow(self, name: str, need: int, top: int, fill=0) -> None:
        """Make buffer `name` hold at least `need` items (+ its dump slot), keeping the stored ones.

        `top`: the tokens of the longest (row, head) once this store is done. With a spare (the
        tokens the engine says will follow: the rest of a prompt for a storage form that keeps every
        token, the decode tokens) the buffer is sized at once for top + spare tokens, exactly as
        `reserve` sizes it, so that it is not grown again; without one, geometrically."""
        buf = getattr(self, name)
        cap = buf.shape[2] - 1
        if need <= cap:
            return
        if self.spare > 0:
            per = self.group_size if name in _KEY_BUFFERS else 1  # key buffers hold groups
            new_cap = max(need, -(-(top + self.spare) // per))
        else:
            new_cap = need + max(need // 8, 16)
        new = buf.new_full((*buf.shape[:2], new_cap + 1, *buf.shape[3:]), fill)
        if cap:
            new[:, :, :cap] = buf[:, :, :cap]
        setattr(self, name, new)

    def _resize_ring(self, which: str, size: int) -> None:
        """Re-place ring `which` into `size` slots (live tokens [count, n) of each (row, head))."""
        ring = self._kring if which == "k" else self._vring
        old = ring.shape[2] - 1
        if size == old:
            return
        count = self._nk if which == "k" else self._nv
        b, h, _, d = ring.shape
        new = ring.new_zeros((b, h, size + 1, d))
        live = min(old, size)
        if live:
            tok = count[..., None] + torch.arange(live, device=ring.device)  # [b, h, live]
            src = torch.gather(ring, 2, _expand_index(tok % old, ring))
            dst = torch.where(tok < self._n[..., None], tok % size, torch.full_like(tok, size))
            new.scatter_(2, _expand_index(dst, new), src)
        if which == "k":
            self._kring = new
        else:
            self._vring = new

    def _place_ring(
        self, which: str, size: int, count: int, n: int, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`_resize_ring` when every (row, head) holds tokens [count, n) in ring `which`: copied by
        host-int slices (one per run that no ring wraps), no index tensors, into a new zeroed ring
        of `size` slots or into `into` (of that shape; its other slots keep what they hold, which
        is never read: only live tokens are)."""
        ring = self._kring if which == "k" else self._vring
        b, h, _, d = ring.shape
        new = ring.new_zeros((b, h, size + 1, d)) if into is None else into
        _copy_ring(ring, count, n, new)
        setattr(self, "_kring" if which == "k" else "_vring", new)
        return new

    def _store(self) -> KiviStore:
        return KiviStore(
            self._n, self._nk, self._nv, self._kq, self._kscale, self._kzero, self._kres,
            self._vq, self._vscale, self._vzero, self._vres, self.bits, self.group_size,
        )  # fmt: skip

    def _assemble(self, which: str) -> torch.Tensor:
        """De-quantised keys or values [b, h, slots, d] in the per-(row, head) token order."""
        keys, values = dequantized(self._store(), self._slots())
        return (keys if which == "k" else values).to(self.dtype)

    def _flush(self) -> None:
        """Quantise every complete key block and every value that left the residual window."""
        if not self._ready:
            return
        if self._uniform() is not None:
            self._flush_uniform()
            return
        g, bits = self.group_size, self.bits
        b, h = self._n.shape
        d = self.head_dim
        unit = self._unit()
        hn, hnk, hnv = self._host()
        # keys: blocks of `unit` tokens (a multiple of g), per channel within groups of g tokens
        mk_host = torch.div(hn - hnk, unit, rounding_mode="floor") * unit
        m = self._max(mk_host)
        if m > 0:
            mk = torch.div(self._n - self._nk, unit, rounding_mode="floor") * unit
            tok = self._nk[..., None] + torch.arange(m, device=self._n.device)
            wk = self._kring.shape[2] - 1
            block = torch.gather(self._kring, 2, _expand_index(tok % wk, self._kring))
            block = block.reshape(b, h, m // g, g, d).transpose(-1, -2)
            packed, scale, zero = quantize_groups(block, bits, self.dtype)
            grp = torch.arange(m // g, device=self._n.device)
            groups, top = self._max(hnk + mk_host) // g, self._max(hn)
            for name in _KEY_BUFFERS:
                self._grow(name, groups, top)
            dump = self._kq_buf.shape[2] - 1
            idx = torch.where(grp < (mk // g)[..., None], (self._nk // g)[..., None] + grp, dump)
            self._kq_buf.scatter_(2, _expand_index(idx, packed), packed)
            self._ks_buf.scatter_(2, _expand_index(idx, scale), scale)
            self._kz_buf.scatter_(2, _expand_index(idx, zero), zero)
            self._nk.add_(mk)  # in place: a captured decode step reads the counts by address
            hnk = hnk + mk_host
            self._hc = (hn, hnk, hnv)
            self._uni = _UNKNOWN
        # values: whole groups of G older than the newest `residual` tokens, per token
        mv_host = torch.div((hn - hnv - self.residual).clamp(min=0), g, rounding_mode="floor") * g
        m = self._max(mv_host)
        if m > 0:
            mv = torch.div((self._n - self._nv - self.residual).clamp(min=0), g, rounding_mode="floor") * g
            j = torch.arange(m, device=self._n.device)
            tok = self._nv[..., None] + j
            wv = self._vring.shape[2] - 1
            tokens = torch.gather(self._vring, 2, _expand_index(tok % wv, self._vring))
            packed, scale, zero = quantize_groups(
                tokens.reshape(b, h, m, d // self.gv, self.gv), bits, self.dtype
            )
            packed = packed.reshape(b, h, m, -1)
            need, top = self._max(hnv + mv_host), self._max(hn)
            for name in ("_vq_buf", "_vs_buf", "_vz_buf"):
                self._grow(name, need, top)
            dump = self._vq_buf.shape[2] - 1
            idx = torch.where(j < mv[..., None], tok, dump)
            self._vq_buf.scatter_(2, _expand_index(idx, packed), packed)
            self._vs_buf.scatter_(2, _expand_index(idx, scale), scale)
            self._vz_buf.scatter_(2, _expand_index(idx, zero), zero)
            self._nv.add_(mv)
            hnv = hnv + mv_host
            self._hc = (hn, hnk, hnv)
            self._uni = _UNKNOWN
        # rings larger than a decode step needs (after a prefill) go back to that size
        for which, count in (("k", hnk), ("v", hnv)):
            ring = self._kring if which == "k" else self._vring
            size = max(self._ring_min(which), self._max(hn - count))
            if ring.shape[2] - 1 > size:
                self._resize_ring(which, size)

    def _flush_uniform(self) -> None:
        """`_flush` when every (row, head) holds the same counts: host-integer slices, no index tensors."""
        n, nk, nv = self._uni
        g, bits = self.group_size, self.bits
        mk = (n - nk) // self._unit() * self._unit()
        mv = max(0, n - nv - self.residual) // g * g
        if mk > 0 or mv > 0:
            for name in _KEY_BUFFERS:
                self._grow(name, (nk + mk) // g, n)
            for name in ("_vq_buf", "_vs_buf", "_vz_buf"):
                self._grow(name, nv + mv, n)
            if kernels_run(self._kring):
                # one kernel from the rings to the packed stores (no float32 temporaries)
                kivi_kernels.quantize_from_rings(
                    self._kring, self._kq_buf, self._ks_buf, self._kz_buf, nk, mk,
                    self._vring, self._vq_buf, self._vs_buf, self._vz_buf, nv, mv, bits,
                )  # fmt: skip
            else:
                self._quantize_uniform(nk, mk, nv, mv)
            if not self._counts_behind:  # (else they catch up with `_uni` when next read)
                self._nk.add_(mk)  # in place: a captured decode step reads the counts by address
                self._nv.add_(mv)
            nk, nv = nk + mk, nv + mv
        self._uni = (n, nk, nv)
        self._hc = None  # (the host counts are `_uni`)
        for which, count in (("k", nk), ("v", nv)):  # rings larger than decoding needs shrink
            ring = self._kring if which == "k" else self._vring
            size = max(self._ring_min(which), n - count)
            if ring.shape[2] - 1 > size:  # (the ring decoding had before a wide forward, if it fits)
                into = self._decode_rings.pop(which, None)
                if into is not None and into.shape != (*ring.shape[:2], size + 1, ring.shape[3]):
                    into = None
                self._place_ring(which, size, count, n, into)

    def _quantize_uniform(self, nk: int, mk: int, nv: int, mv: int) -> None:
        """The torch form of `_flush_uniform`'s kernels: key tokens [nk, nk + mk) and value tokens
        [nv, nv + mv) from the rings into the packed store (grown already)."""
        g, bits, d = self.group_size, self.bits, self.head_dim
        b, h = self._dn.shape
        if mk > 0:  # complete key blocks: per channel within groups of g tokens
            block = _ring_range(self._kring, nk, nk + mk).reshape(b, h, mk // g, g, d).transpose(-1, -2)
            packed, scale, zero = quantize_groups(block, bits, self.dtype)
            lo, hi = nk // g, (nk + mk) // g
            for name, x in (("_kq_buf", packed), ("_ks_buf", scale), ("_kz_buf", zero)):
                getattr(self, name)[:, :, lo:hi] = x
        if mv > 0:  # whole groups of values that left the window: per token, groups of gv channels
            tokens = _ring_range(self._vring, nv, nv + mv).reshape(b, h, mv, d // self.gv, self.gv)
            packed, scale, zero = quantize_groups(tokens, bits, self.dtype)
            packed = packed.reshape(b, h, mv, -1)
            for name, x in (("_vq_buf", packed), ("_vs_buf", scale), ("_vz_buf", zero)):
                getattr(self, name)[:, :, nv : nv + mv] = x

    def flush(self) -> None:
        self._flush()

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        """Store new tokens in the residual rings (in place); returns (None, None): attention reads
        the layer's own storage (`attend`)."""
        if not self._ready:
            self.lazy_initialization(keys, values)
        self._flush()  # tokens of earlier forwards that completed a group; the host counts are exact
        b, h, q, d = keys.shape
        if q == 1 and not self.slot_stats and self._uniform() is not None:
            self._append_one(keys, values, positions)
            return None, None
        hn, hnk, hnv = self._host()
        valid = (positions != EMPTY)[:, None, :].expand(b, h, q)
        rank = valid.long().cumsum(-1) - 1
        tok = self._n[..., None] + rank  # the (row, head)'s own index of each new token
        for which, new, count in (("k", keys, hnk), ("v", values, hnv)):
            need = self._max(hn - count) + q
            ring = self._kring if which == "k" else self._vring
            if ring.shape[2] - 1 < need:
                self._resize_ring(which, max(need, self._ring_min(which)))
            ring = self._kring if which == "k" else self._vring
            w = ring.shape[2] - 1
            idx = torch.where(valid, tok % w, w)
            ring.scatter_(2, _expand_index(idx, new), new.to(ring.dtype))
        self._grow("_pos_buf", self._max(hn) + q, self._max(hn) + q, fill=EMPTY)
        dump = self._pos_buf.shape[2] - 1
        new_pos = positions.to(torch.int32)[:, None, :].expand(b, h, q)
        self._pos_buf.scatter_(2, torch.where(valid, tok, dump), new_pos)
        for name, stat in self.slot_stats.items():
            self.slot_stats[name], _ = ragged_append(stat, self._n, stat.new_zeros((b, h, q)), valid)
        self._n = self._n + valid.sum(-1)
        self._pending = q  # `note_padding(False)` will confirm that every (row, head) took all q
        if self.slot_stats:  # stats are sized to the longest sequence: follow the positions view
            s = self._slots()
            self.slot_stats = {x: t[:, :, :s] for x, t in self.slot_stats.items()}
        return None, None

    def append_step(self, keys: torch.Tensor, values: torch.Tensor, step) -> None:
        """A forward's tokens (`KVLayer.append_step`). A chunk (several tokens) without padding or
        per-slot statistics over uniform counts goes to the same host-known slots of every (row,
        head), written by slices (`_append_uniform`): no index tensors, and no `note_padding` to
        wait for (the step says that nothing is padded). Everything else: `append`, `note_padding`."""
        if not self._ready:
            self.lazy_initialization(keys, values)
        if keys.shape[2] > 1 and not step.padded and not self.slot_stats:
            self._flush()  # (what `append` does first)
            if self._uniform() is not None:
                self._append_uniform(keys, values, step.slot_positions, wide=step.compress)
                return
        super().append_step(keys, values, step)

    def _append_uniform(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, wide: bool
    ) -> None:
        """Tokens [n, n + q) of every (row, head) (no padding, uniform counts, flushed): ring slots
        j % W and positions [n, n + q) by slices; the counts advance by q on the host (the device's
        catch up when read: "the device counts").

        `wide` (the forward compresses: `compress_layer` flushes this layer right after its
        attention): each ring holds every token at its own index (W >= n + q), so that attention
        de-quantises the earlier tokens into the ring's dead slots [0, count) and attends over
        the ring itself (`_dense`: no dense copy, no residual copy), and the flush quantises from it
        and puts the residual back into a ring of decoding's size. The wide ring is what attention
        would allocate anyway (the dense keys or values of the layer), taken a little earlier and
        given back by the flush, which puts the residual back into the ring decoding had (kept in
        `_decode_rings` meanwhile: no new ring, no zero fill); without the flush to follow, rings
        grow only to the residual plus the chunk."""
        n, nk, nv = self._uni
        b, h, q, d = keys.shape
        for which, new, count in (("k", keys, nk), ("v", values, nv)):
            ring = self._kring if which == "k" else self._vring
            need = n + q if wide else n - count + q
            if ring.shape[2] - 1 < need:
                size = max(need, self._ring_min(which))
                into = None
                if wide:  # every slot is written before it is read: no zero fill
                    self._decode_rings[which] = ring
                    into = ring.new_empty((b, h, size + 1, d))
                ring = self._place_ring(which, size, count, n, into)
            _write_ring(ring, n, new)
        self._grow("_pos_buf", n + q, n + q, fill=EMPTY)
        self._pos_buf[:, :, n : n + q] = positions[:, None, :]
        self._uni = (n + q, nk, nv)
        self._hc = None
        self._counts_behind = True  # (`_n` catches up with `_uni` when next read)

    def _append_one(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """A decode token when every (row, head) holds the same counts: written at host-known slots.

        Slot n of every (row, head) is free (past its length, in the rings and the positions), so
        a row whose position is EMPTY may be written there too: its length does not advance."""
        n, nk, nv = self._uni
        for which, new, count in (("k", keys, nk), ("v", values, nv)):
            ring = self._kring if which == "k" else self._vring
            if ring.shape[2] - 1 < n - count + 1:
                self._resize_ring(which, max(n - count + 1, self._ring_min(which)))
                ring = self._kring if which == "k" else self._vring
            ring[:, :, n % (ring.shape[2] - 1)] = new[:, :, 0]
        self._grow("_pos_buf", n + 1, n + 1, fill=EMPTY)
        self._pos_buf[:, :, n] = positions.to(torch.int32)  # [b, 1] over every head
        self._n = self._n + (positions != EMPTY)
        self._pending = 1  # `note_padding(False)` confirms that every row stored its token

    def reserve(self, extra: int) -> None:
        """Capacity for `extra` more tokens per (row, head) (decoding appends in place, copies nothing)."""
        if not self._ready:
            return
        top = self._lags()[0] + extra
        g = self.group_size
        for name, need, fill in (
            ("_pos_buf", top, EMPTY),
            ("_kq_buf", -(-top // g), 0),
            ("_ks_buf", -(-top // g), 0),
            ("_kz_buf", -(-top // g), 0),
            ("_vq_buf", top, 0),
            ("_vs_buf", top, 0),
            ("_vz_buf", top, 0),
        ):
            buf = getattr(self, name)
            if buf.shape[2] - 1 != need:  # exactly what decoding will use (+ the dump slot)
                keep = min(buf.shape[2] - 1, need)
                new = buf.new_full((*buf.shape[:2], need + 1, *buf.shape[3:]), fill)
                new[:, :, :keep] = buf[:, :, :keep]
                setattr(self, name, new)

    def attend(self, query: torch.Tensor, step, scaling: float) -> torch.Tensor:
        """This forward's attention over the stored tokens (the new ones included).

        - decode (one query, no padding) on CUDA: the fused kernel over the packed store;
        - a forward without padding over (row, head)s that all hold the same number of tokens (no
          slot empty, the new tokens last): SDPA without a mask (causal; lower-right after earlier
          tokens) over the de-quantised earlier tokens and the full-precision residual; a first
          forward attends over its own tokens in the residual ring, assembling nothing;
        - else the de-quantising reference path (`KVLayer.attend` over `keys`/`values` and a mask).
        """
        if step.static_slots is not None:
            return self.attend_static(query, scaling)
        q = query.shape[2]
        if self._fits is None:  # the shapes the kernel tiles do not change while the layer lives
            shapes = self._store_for_kernel(counts=False)
            self._fits = kivi_kernels.kernel_supports(shapes, query[:, :, -1:])
        if q == 1 and not step.padded and kernels_run(query) and self._fits:
            store = self._store_for_kernel()
            return kivi_kernels.decode_attention(query, store, scaling, max_tokens=self._slots())
        if not step.padded and self._uniform() is not None:
            n, nk, nv = self._uni
            keys, values = self._dense(n, nk, nv)
            return grouped_attention(query, keys, values, dense_bias(q, n), scaling)
        return super().attend(query, step, scaling)

    def _dense(self, n: int, nk: int, nv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, h, n, d] (model dtype) when every (row, head) holds n tokens, the first
        nk keys and nv values quantised: the de-quantised tokens, then the residual ring's.

        A ring of n slots or more holds token j in slot j, so the quantised tokens' slots [0, count)
        are dead: the earlier tokens are de-quantised into them and the ring is the dense view (no
        copy); nothing quantised: a view of the ring (when it does not wrap). On CUDA one kernel
        de-quantises the keys and the values (straight to the model dtype)."""
        outs, rests = [], []
        for ring, count in ((self._kring, nk), (self._vring, nv)):
            b, h, _, d = ring.shape
            if count == 0 or ring.shape[2] - 1 >= n:
                outs.append(ring if count else _ring_range(ring, 0, n))
                rests.append(None)
            else:
                outs.append(ring.new_empty((b, h, n, d)))
                rests.append(_ring_range(ring, count, n))
        if (nk or nv) and kernels_run(self._kring):
            kivi_kernels.dequantize_into(
                self._kq_buf, self._ks_buf, self._kz_buf, outs[0], nk // self.group_size,
                self._vq_buf, self._vs_buf, self._vz_buf, outs[1], nv, self.bits,
            )  # fmt: skip
        elif nk or nv:
            self._dequantize_torch("k", outs[0], nk)
            self._dequantize_torch("v", outs[1], nv)
        for out, rest, count in zip(outs, rests, (nk, nv)):
            if rest is not None:
                out[:, :, count:] = rest
        return outs[0][:, :, :n], outs[1][:, :, :n]

    def _dequantize_torch(self, which: str, out: torch.Tensor, count: int) -> None:
        """The torch form of the de-quantisation kernel: tokens [0, count) of keys or values into
        `out` [b, h, >= count, d] (float32 products rounded once to the model dtype)."""
        b, h, _, d = out.shape
        g, bits = self.group_size, self.bits
        table = _unpack_table(bits, out.device)
        step = max(g, (1 << 24) // max(1, b * h * d) // g * g)  # bounded float32 temporaries
        for lo in range(0, count, step):
            hi = min(count, lo + step)
            if which == "k":  # [b, h, groups, d, g*bits/8] -> tokens of groups [lo/g, hi/g)
                packed = self._kq_buf[:, :, lo // g : hi // g]
                scale, zero = self._ks_buf[:, :, lo // g : hi // g], self._kz_buf[:, :, lo // g : hi // g]
            else:  # [b, h, tokens, d*bits/8] -> groups of gv channels
                packed = self._vq_buf[:, :, lo:hi].reshape(b, h, hi - lo, d // self.gv, -1)
                scale, zero = self._vs_buf[:, :, lo:hi], self._vz_buf[:, :, lo:hi]
            x = table[packed.long()].reshape(*packed.shape[:-1], -1)
            x = (x * scale.float()[..., None] + zero.float()[..., None]).to(out.dtype)
            if which == "k":
                out[:, :, lo:hi].view(b, h, (hi - lo) // g, g, d).copy_(x.transpose(-1, -2))
            else:
                out[:, :, lo:hi] = x.reshape(b, h, hi - lo, d)

    def _store_for_kernel(self, counts: bool = True) -> KiviStore:
        """The store over whole buffers (no host counts needed: the kernel reads the lengths);
        `counts` False: for its shapes only (device counts as they are, maybe behind)."""
        n, nk, nv = (self._n, self._nk, self._nv) if counts else (self._dn, self._dnk, self._dnv)
        return KiviStore(
            n, nk, nv, self._kq_buf, self._ks_buf, self._kz_buf, self._kres,
            self._vq_buf, self._vs_buf, self._vz_buf, self._vres, self.bits, self.group_size,
        )  # fmt: skip

    # -- the static-shape decode step (`pipeline.decode_graph`) ---------------------------------
    # A decode token goes to each (row, head)'s own next slot, read on the device from `_n` (the
    # runner's `slot` is not needed: it is max n, and rows may hold different counts), and `_n`
    # advances in place; attention is the fused kernel over the whole buffers with the counts read
    # on the device and a grid sized by the position buffer's capacity. The flushes `append` does
    # first run eagerly before every step (`prepare_static`), advancing the counts in place, so one
    # capture serves every step until a row leaves the batch or a buffer is replaced.
    def _lags(self) -> tuple[int, int, int]:
        """(max n, max n - nk, max n - nv) over the (row, head)s, host ints (no device read once the
        host counts are known). Derived again only when the host count tensors were replaced
        (they are never changed in place); `commit_static` advances them itself."""
        u = self._uniform()
        if u is not None:
            n, nk, nv = u
            return n, n - nk, n - nv
        counts = self._host()
        if self._lag_of is None or any(a is not b for a, b in zip(self._lag_of, counts)):
            hn, hnk, hnv = counts
            self._lag_val = (self._max(hn), self._max(hn - hnk), self._max(hn - hnv))
            self._lag_of = counts
        return self._lag_val

    def _flush_due(self) -> bool:
        """Some (row, head) completed a key block or a value group (what `_flush` would quantise)."""
        _, lag_k, lag_v = self._lags()
        return lag_k >= self._unit() or lag_v - self.residual >= self.group_size

    def prepare_static(self) -> None:
        """The flush a dynamic step's `append` begins with, when one is due (host counts say so)."""
        if self._ready and self._flush_due():
            self._flush()

    def static_decode_ready(self) -> bool:
        """The static step serves this layer now: the fused kernel runs here and takes its shapes,
        no per-slot statistics, no flush due (`prepare_static` ran it), and room for one more token
        in the position buffer and in both rings (nothing is reallocated while decoding)."""
        if not self._ready or self.slot_stats or not self._fits or not kernels_run(self._kring):
            return False
        top, lag_k, lag_v = self._lags()
        return (
            not self._flush_due()
            and top < self._pos_buf.shape[2] - 1
            and lag_k < self._kring.shape[2] - 1
            and lag_v < self._vring.shape[2] - 1
        )

    @property
    def slots_used(self) -> int:
        """The most tokens a (row, head) holds (host)."""
        return self._lags()[0]

    def static_buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor a static step reads or writes: the device counts, the packed store, the rings,
        the position buffer and the kernel's scratch workspace (once it exists)."""
        bufs = (
            self._n, self._nk, self._nv, self._pos_buf, self._kq_buf, self._ks_buf, self._kz_buf,
            self._vq_buf, self._vs_buf, self._vz_buf, self._kring, self._vring,
        )  # fmt: skip
        ws = kivi_kernels.workspace(self._n.device)
        return bufs if ws is None else (*bufs, ws)

    def append_static(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, slot) -> None:
        """Write one decode token ([b, h, 1, d]) at each (row, head)'s next slot, `_n` on the device:
        token j's key in ring slot j % Wk, its value in j % Wv, its position at j; then `_n` advances
        in place. No host read and no host state change (`commit_static` follows)."""
        b, h = self._n.shape
        n = self._n[..., None, None]  # [b, h, 1, 1]
        for ring, new in ((self._kring, keys), (self._vring, values)):
            idx = (n % (ring.shape[2] - 1)).expand(b, h, 1, ring.shape[-1])
            ring.scatter_(2, idx, new.to(ring.dtype))
        pos = positions.to(torch.int32)[:, None, :].expand(b, h, 1)
        self._pos_buf.scatter_(2, n[..., 0], pos)
        self._n.add_(positions != EMPTY)  # [b, 1] over every head

    def attend_static(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """The fused kernel over the whole buffers: it reads n, nk, nv on the device, and its grid,
        sized by the position buffer's capacity, serves every step while the buffers stay."""
        store = self._store_for_kernel()
        return kivi_kernels.decode_attention(query, store, scaling, max_tokens=self._pos_buf.shape[2] - 1)

    def commit_static(self, steps: int = 1) -> None:
        """Host bookkeeping of `steps` static steps: every (row, head) stored one token per step
        (decode positions are never EMPTY)."""
        old = self._hc
        if old is not None:
            hn, hnk, hnv = old
            self._hc = (hn + steps, hnk, hnv)
        if isinstance(self._uni, tuple):
            n, nk, nv = self._uni
            self._uni = (n + steps, nk, nv)
        if old is not None and self._lag_of is not None and all(a is b for a, b in zip(self._lag_of, old)):
            self._lag_of = self._hc
            self._lag_val = tuple(x + steps for x in self._lag_val)

    def _load_dense(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, stats) -> None:
        """Replace the storage by full-precision tokens (compacted per (row, head))."""
        filled = positions != EMPTY
        names = list(stats)
        n, (k, v, pos, *st) = compact(filled, keys, values, positions, *[stats[x] for x in names])
        b, h = n.shape
        s = k.shape[2]
        self._n = n
        self._nk = torch.zeros_like(n)
        self._nv = torch.zeros_like(n)
        hn = n.to("cpu", copy=True)  # never the device tensor itself (on CPU), which advances in place
        self._hc = (hn, torch.zeros_like(hn), torch.zeros_like(hn))
        self._pending = None
        self._uni = _UNKNOWN
        pos = torch.where(front_mask(n, s), pos, torch.full_like(pos, EMPTY))
        self._pos_buf = torch.full((b, h, s + self.spare + 1), EMPTY, dtype=torch.int32, device=n.device)
        self._pos_buf[:, :, :s] = pos
        for which, x in (("k", k), ("v", v)):  # token j in slot j (s >= every length)
            ring = x.new_zeros((b, h, max(s, self._ring_min(which)) + 1, x.shape[-1]))
            ring[:, :, :s] = x
            setattr(self, "_kring" if which == "k" else "_vring", ring)
        self.slot_stats = {x: t.masked_fill(~front_mask(n, t.shape[-1]), 0) for x, t in zip(names, st)}
        self._decode_rings = {}

    def keep(self, index: torch.Tensor, filled: torch.Tensor, **_host) -> None:
        """Eviction on quantised storage: gather the (de-quantised) kept slots into the residual
        (its own host facts: the caller's, for a dense layer, are not needed)."""
        d = self.head_dim
        gather = index[..., None].expand(*index.shape, d)
        keys = torch.gather(self.keys, 2, gather)
        values = torch.gather(self.values, 2, gather)
        pos = torch.gather(self._pos, 2, index)
        pos = torch.where(filled, pos, torch.full_like(pos, EMPTY))
        stats = {x: torch.gather(t, 2, index) for x, t in self.slot_stats.items()}
        self._load_dense(keys, values, pos, stats)

    def select_rows(self, rows: torch.Tensor) -> None:
        if not self._ready:
            return
        self._host()
        host_rows = rows.cpu()
        self._hc = tuple(x[host_rows] for x in self._host_counts())
        self._uni = _UNKNOWN
        self._decode_rings = {}
        for name in (
            "_n", "_nk", "_nv", "_pos_buf", "_kq_buf", "_ks_buf", "_kz_buf",
            "_kring", "_vq_buf", "_vs_buf", "_vz_buf", "_vring",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name)[rows])
        for name, stat in self.slot_stats.items():
            self.slot_stats[name] = stat[rows]

    # -- accounting --------------------------------------------------------------------------
    def filled_slots_per_row(self) -> torch.Tensor:
        return self._n.sum(-1)

    def kept_bytes_per_row(self) -> torch.Tensor:
        """[b] packed payload + scales + zero points + full-precision residuals, from the tensors."""
        if not self._ready:
            return torch.zeros(0, dtype=torch.int64)
        g = self.group_size

        def per_item(*tensors: torch.Tensor) -> int:  # bytes of one item along dim 2, all tensors
            return sum(math.prod(t.shape[3:]) * t.element_size() for t in tensors)

        key_group = per_item(self._kq_buf, self._ks_buf, self._kz_buf)
        value_token = per_item(self._vq_buf, self._vs_buf, self._vz_buf)
        fp_token = per_item(self._kring)
        kb = (self._nk // g) * key_group + (self._n - self._nk) * fp_token
        vb = self._nv * value_token + (self._n - self._nv) * fp_token
        return (kb + vb).sum(-1)

    def stored_bytes(self) -> int:
        """Bytes of every buffer this layer holds: spare capacity, dump slots and positions included."""
        if not self._ready:
            return 0
        names = (
            "_pos_buf",
            "_kq_buf",
            "_ks_buf",
            "_kz_buf",
            "_kring",
            "_vq_buf",
            "_vs_buf",
            "_vz_buf",
            "_vring",
        )
        return sum(getattr(self, x).numel() * getattr(self, x).element_size() for x in names)


_UNKNOWN = object()  # `QuantizedKVLayer._uni` not yet derived from the host counts
_KEY_BUFFERS = ("_kq_buf", "_ks_buf", "_kz_buf")  # items: key groups


def _ring_range(ring: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Tokens [lo, hi) of a ring ([b, h, W + 1, d], token j in slot j % W): a view unless they wrap."""
    w = ring.shape[2] - 1
    start = lo % w
    if start + (hi - lo) <= w:
        return ring[:, :, start : start + hi - lo]
    return torch.cat([ring[:, :, start:w], ring[:, :, : hi - lo - (w - start)]], dim=2)


def _ring_runs(lo: int, hi: int, *widths: int):
    """(first token, length) of the runs of tokens [lo, hi) within which no ring of `widths` wraps."""
    j = lo
    while j < hi:
        run = min(hi - j, *(w - j % w for w in widths))
        yield j, run
        j += run


def _copy_ring(src: torch.Tensor, lo: int, hi: int, dst: torch.Tensor) -> None:
    """Tokens [lo, hi) of ring `src` into ring `dst` (each [b, h, W + 1, d], token j in slot j % W)."""
    ws, wd = src.shape[2] - 1, dst.shape[2] - 1
    for j, run in _ring_runs(lo, hi, ws, wd):
        dst[:, :, j % wd : j % wd + run] = src[:, :, j % ws : j % ws + run]


def _write_ring(ring: torch.Tensor, lo: int, new: torch.Tensor) -> None:
    """Tokens [lo, lo + q) of `new` ([b, h, q, d]) into `ring` (token j in slot j % W)."""
    w = ring.shape[2] - 1
    for j, run in _ring_runs(lo, lo + new.shape[2], w):
        ring[:, :, j % w : j % w + run] = new[:, :, j - lo : j - lo + run]


# Tests set this to run the fused kernels on CPU tensors under Triton's interpreter; the
# pipeline never does (`pipeline.triton_gate`).
CPU_INTERPRET = False


def kernels_run(x: torch.Tensor) -> bool:
    """`kivi_kernels`' Triton kernels may run on tensors like `x` (`pipeline.triton_gate`)."""
    return kivi_kernels.triton is not None and kernel_may_run(x.device, CPU_INTERPRET)


@register
class KIVI(Policy):
    name = "kivi"
    paper = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al. 2024)"
    storage_form = True  # composable after an eviction policy: "snapkv+kivi"
    keeps_every_token = True  # (alone: composed after an evictor, the composition keeps what that keeps)

    @dataclass
    class Params:
        bits: int = 2  # 2 or 4
        group_size: int = 32  # G: tokens per key group, channels per value group
        residual: int = 128  # R: full-precision residual (a multiple of group_size; 0: none)

        def __post_init__(self) -> None:
            if self.bits not in (2, 4):
                raise ValueError("kivi bits must be 2 or 4")
            if self.group_size < 1 or (self.group_size * self.bits) % 8:
                raise ValueError("kivi group_size must be >= 1 and pack into whole bytes")
            if self.residual < 0 or self.residual % self.group_size:
                raise ValueError("kivi residual must be a non-negative multiple of group_size")

    def make_layer(self) -> KVLayer:
        p = self.params
        return QuantizedKVLayer(p.bits, p.group_size, p.residual)

    def compress_layer(self, layer, queries, step, layer_idx, num_layers, scaling) -> None:
        if isinstance(layer, QuantizedKVLayer):
            layer.flush()

    def target_ratio(
        self, prompt_tokens: int | None = None, dtype_bytes: int = 2, head_dim: int = 64
    ) -> float:
        """KIVI's stated byte ratio: stored bytes / full-precision bytes, for one (row, kv head).

        With n = `prompt_tokens`, s = `dtype_bytes` (of the model dtype, used for the full cache,
        the residual, scales and zero points), d = head_dim, b = bits, G = group_size,
        R = residual, Gv = min(G, d):
            n_k = floor(n / R) * R quantised keys, n_v = floor(max(0, n - R) / G) * G quantised values,
            keys   = n_k * d * b/8 + (n_k / G) * d * 2s + (n - n_k) * d * s
            values = n_v * d * b/8 + n_v * (d / Gv) * 2s + (n - n_v) * d * s
            ratio  = (keys + values) / (2 * n * d * s)
        e.g. 2-bit, G 32, R 128, n 2048: bf16 0.2129, fp32 0.1523; 4-bit bf16 0.3379.
        Without `prompt_tokens`: the long-prompt limit b / (8s) + 2 / G (bf16 2-bit: 0.1875).
        """
        p = self.params
        if prompt_tokens is None:
            gv = min(p.group_size, head_dim)
            return p.bits / (8 * dtype_bytes) + 1 / p.group_size + 1 / gv
        key, value = kivi_bytes(prompt_tokens, head_dim, p.bits, p.group_size, p.residual, dtype_bytes)
        return (key + value) / (2 * prompt_tokens * head_dim * dtype_bytes)
