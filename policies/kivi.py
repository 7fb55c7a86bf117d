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
  `n mod residual` stay full precision); values keep a sliding window of the newest `residual`
  tokens in full precision, every older token being quantised as it leaves the window.

When: the tokens of a forward are stored in full precision and that forward's attention uses
them as they are (the paper's prefill attends in full precision; at decode the new token joins
the residual before attention); quantisation of complete groups happens right after the
layer's attention (`compress_layer`) or at the latest when the next forward appends.
Attention gets de-quantised keys/values (a reference path; a fused kernel is a GPU issue).

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

from pipeline.kv_cache import EMPTY, KVLayer
from policies.base import Policy
from policies.registry import register
from policies.seqstore import compact, drop_front, front_mask, ragged_append, take_front

# -- quantisation primitives (pure tensor code) ------------------------------------------------


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along the last dim (a multiple of 8 // bits) into uint8."""
    per = 8 // bits
    q = q.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(per, device=q.device, dtype=torch.uint8) * bits
    return (q << shifts).sum(-1, dtype=torch.uint8)


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
    lo = xf.amin(-1)
    hi = xf.amax(-1)
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
    nv = max(0, n - residual)
    key = nk * d * bits // 8 + (nk // g) * d * 2 * s + (n - nk) * d * s
    value = nv * d * bits // 8 + nv * (d // gv) * 2 * s + (n - nv) * d * s
    return key, value


class QuantizedKVLayer(KVLayer):
    """KIVI storage: packed per-channel keys, packed per-token values, full-precision residuals.

    Every (row, head) holds its own token sequence, left-aligned, `_n` tokens long; its first
    `_nk` keys and first `_nv` values are quantised, the rest are in the residuals. `keys`,
    `values` and `positions` are the de-quantised view over slots [0, max n) (slot j of a
    (row, head) = its j-th token; slots past its length are EMPTY).
    """

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128) -> None:
        self.bits = bits
        self.group_size = group_size
        self.residual = residual
        self._ready = False
        super().__init__()
        self.has_empty = self.heads_differ = True  # ragged per-(row, head) views: the masked path

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

    # -- storage ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
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
        zeros = torch.zeros((b, h), dtype=torch.int64, device=dev)
        self._n, self._nk, self._nv = zeros.clone(), zeros.clone(), zeros.clone()
        self._pos = torch.empty((b, h, 0), dtype=torch.int32, device=dev)
        # keys: groups of g tokens, per channel -> packed [b, h, groups, d, g*bits/8]
        self._kq = torch.empty((b, h, 0, d, g * self.bits // 8), dtype=torch.uint8, device=dev)
        self._kscale = torch.empty((b, h, 0, d), dtype=dt, device=dev)
        self._kzero = torch.empty((b, h, 0, d), dtype=dt, device=dev)
        self._kres = torch.empty((b, h, 0, d), dtype=dt, device=dev)
        # values: per token, groups of gv channels -> packed [b, h, tokens, d*bits/8]
        self._vq = torch.empty((b, h, 0, d * self.bits // 8), dtype=torch.uint8, device=dev)
        self._vscale = torch.empty((b, h, 0, d // self.gv), dtype=dt, device=dev)
        self._vzero = torch.empty((b, h, 0, d // self.gv), dtype=dt, device=dev)
        self._vres = torch.empty((b, h, 0, d), dtype=dt, device=dev)
        self._ready = True
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self._pos.shape[-1] if self._ready else 0

    def _slots(self) -> int:
        return self._pos.shape[-1]

    def _assemble(self, which: str) -> torch.Tensor:
        """De-quantised keys or values [b, h, slots, d] in the per-(row, head) token order."""
        s, d = self._slots(), self.head_dim
        if which == "k":
            b, h, ng = self._kq.shape[:3]
            deq = dequantize_groups(
                self._kq, self._kscale, self._kzero, self.bits, self.dtype
            )  # [b,h,ng,d,g]
            deq = deq.transpose(-1, -2).reshape(b, h, ng * self.group_size, d)
            nq, res = self._nk, self._kres
        else:
            b, h, nt = self._vq.shape[:3]
            deq = dequantize_groups(
                self._vq.reshape(b, h, nt, d // self.gv, self.gv * self.bits // 8),
                self._vscale,
                self._vzero,
                self.bits,
                self.dtype,
            ).reshape(b, h, nt, d)
            nq, res = self._nv, self._vres
        b, h = nq.shape
        out = deq.new_zeros((b, h, s + 1, d))
        m = min(deq.shape[2], s)
        out[:, :, :m] = deq[:, :, :m]
        r = res.shape[2]
        if r:  # residual tokens follow each sequence's quantised ones
            j = torch.arange(r, device=res.device)
            idx = torch.where(
                j < (self._n - nq)[..., None], nq[..., None] + j, torch.full_like(nq[..., None], s)
            )
            out.scatter_(2, idx[..., None].expand(b, h, r, d), res)
        return out[:, :, :s]

    def _flush(self) -> None:
        """Quantise every complete key block and every value that left the residual window."""
        if not self._ready:
            return
        g, bits = self.group_size, self.bits
        b, h = self._n.shape
        d = self.head_dim
        unit = self.residual if self.residual > 0 else g
        # keys: blocks of `unit` tokens (a multiple of g), per channel within groups of g tokens
        rk = self._n - self._nk
        mk = torch.div(rk, unit, rounding_mode="floor") * unit
        m = int(mk.max()) if mk.numel() else 0
        if m > 0:
            block = take_front(self._kres, m).reshape(b, h, m // g, g, d).transpose(-1, -2)
            packed, scale, zero = quantize_groups(block, bits, self.dtype)
            valid = front_mask(mk // g, m // g)
            ngroups = self._nk // g
            self._kq, _ = ragged_append(self._kq, ngroups, packed, valid)
            self._kscale, _ = ragged_append(self._kscale, ngroups, scale, valid)
            self._kzero, _ = ragged_append(self._kzero, ngroups, zero, valid)
            self._kres, _ = drop_front(self._kres, rk, mk)
            self._nk = self._nk + mk
        # values: everything older than the newest `residual` tokens, per token
        rv = self._n - self._nv
        mv = (rv - self.residual).clamp(min=0)
        m = int(mv.max()) if mv.numel() else 0
        if m > 0:
            tokens = take_front(self._vres, m).reshape(b, h, m, d // self.gv, self.gv)
            packed, scale, zero = quantize_groups(tokens, bits, self.dtype)
            valid = front_mask(mv, m)
            self._vq, _ = ragged_append(self._vq, self._nv, packed.reshape(b, h, m, -1), valid)
            self._vscale, _ = ragged_append(self._vscale, self._nv, scale, valid)
            self._vzero, _ = ragged_append(self._vzero, self._nv, zero, valid)
            self._vres, _ = drop_front(self._vres, rv, mv)
            self._nv = self._nv + mv

    def flush(self) -> None:
        self._flush()

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        if not self._ready:
            self.lazy_initialization(keys, values)
        self._flush()  # tokens of earlier forwards that completed a group
        b, h, q, _ = keys.shape
        valid = (positions != EMPTY)[:, None, :].expand(b, h, q)
        new_pos = positions.to(torch.int32)[:, None, :].expand(b, h, q)
        self._kres, _ = ragged_append(self._kres, self._n - self._nk, keys, valid)
        self._vres, _ = ragged_append(self._vres, self._n - self._nv, values, valid)
        pos, _ = ragged_append(self._pos, self._n, new_pos, valid)
        for name, stat in self.slot_stats.items():
            self.slot_stats[name], _ = ragged_append(stat, self._n, stat.new_zeros((b, h, q)), valid)
        n = self._n + valid.sum(-1)
        self._pos = torch.where(front_mask(n, pos.shape[-1]), pos, torch.full_like(pos, EMPTY))
        self._n = n
        return self.keys, self.values

    def _load_dense(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, stats) -> None:
        """Replace the storage by full-precision tokens (compacted per (row, head))."""
        filled = positions != EMPTY
        names = list(stats)
        n, (k, v, pos, *st) = compact(filled, keys, values, positions, *[stats[x] for x in names])
        b, h = n.shape
        d = self.head_dim
        self._n = n
        self._nk = torch.zeros_like(n)
        self._nv = torch.zeros_like(n)
        self._pos = torch.where(front_mask(n, pos.shape[-1]), pos, torch.full_like(pos, EMPTY))
        self._kres, self._vres = k.contiguous(), v.contiguous()
        self._kq = self._kq.new_empty((b, h, 0, *self._kq.shape[3:]))
        self._kscale = self._kscale.new_empty((b, h, 0, d))
        self._kzero = self._kzero.new_empty((b, h, 0, d))
        self._vq = self._vq.new_empty((b, h, 0, *self._vq.shape[3:]))
        self._vscale = self._vscale.new_empty((b, h, 0, d // self.gv))
        self._vzero = self._vzero.new_empty((b, h, 0, d // self.gv))
        self.slot_stats = {x: t.masked_fill(~front_mask(n, t.shape[-1]), 0) for x, t in zip(names, st)}

    def keep(self, index: torch.Tensor, filled: torch.Tensor) -> None:
        """Eviction on quantised storage: gather the (de-quantised) kept slots into the residual."""
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
        for name in (
            "_n",
            "_nk",
            "_nv",
            "_pos",
            "_kq",
            "_kscale",
            "_kzero",
            "_kres",
            "_vq",
            "_vscale",
            "_vzero",
            "_vres",
        ):
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

        key_group = per_item(self._kq, self._kscale, self._kzero)
        value_token = per_item(self._vq, self._vscale, self._vzero)
        fp_token = per_item(self._kres)
        kb = (self._nk // g) * key_group + (self._n - self._nk) * fp_token
        vb = self._nv * value_token + (self._n - self._nv) * fp_token
        return (kb + vb).sum(-1)

    def stored_bytes(self) -> int:
        if not self._ready:
            return 0
        names = ("_pos", "_kq", "_kscale", "_kzero", "_kres", "_vq", "_vscale", "_vzero", "_vres")
        return sum(getattr(self, x).numel() * getattr(self, x).element_size() for x in names)


@register
class KIVI(Policy):
    name = "kivi"
    paper = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al. 2024)"
    storage_form = True  # composable after an eviction policy: "snapkv+kivi"

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
            n_k = floor(n / R) * R quantised keys, n_v = max(0, n - R) quantised values,
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
