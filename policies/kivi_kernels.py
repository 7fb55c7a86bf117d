"""KIVI decode attention straight from the packed store: a fused Triton kernel and its reference.

One decode query per query head attends over every token a (row, kv head) stores (decode
queries are the newest tokens, so no mask is needed beyond the lengths). The store
(`KiviStore`) is what `policies.kivi.QuantizedKVLayer` holds:

- token j of a (row, kv head) with j < nk: its key is quantised per channel in key group
  j // G (`kq` [b, h, groups, d, G*bits/8] uint8, token t of a group in byte t // per at bit
  (t % per) * bits, per = 8 // bits; `kscale`/`kzero` [b, h, groups, d]); else it is
  `kres[j % Wk]` (full precision, a ring of Wk slots);
- j < nv: its value is quantised per token (`vq` [b, h, tokens, d*bits/8], channel c in byte
  c // per at bit (c % per) * bits; `vscale`/`vzero` [b, h, tokens, d / gv]); else `vres[j % Wv]`;
- x' = q * scale + zero.

`decode_attention` (CUDA, or the Triton interpreter on CPU tensors) is flash decoding: the
token axis is split among programs, each program takes one (row, kv head, split) with all
`group` query heads of that kv head (so the packed bytes are read once), de-quantises tiles of
tokens in registers and keeps an online softmax; a small kernel merges the splits. Within a tile
the tokens are visited in the order the key bytes hold them (all tokens at bit offset 0 of their
byte, then offset `bits`, ...): softmax attention does not depend on the order of the tokens,
and this way a loaded key byte tile is shifted, never gathered.

Two launches of one split kernel: the fast tiles (`_fast_tile`: tokens below the last whole
tile whose keys and values are all quantised, the bulk of a long cache: no masks, no rings,
loads software-pipelined) and the tail (`_tail_tile`: residual rings, lengths; one program per
(row, head), its own part for the merge). The fast kernel is compiled without the tail's code,
under a register cap (`DEFAULTS`: 128, so 4 programs of 4 warps or 8 of 2 fit an SM). Its
de-quantisation has no int -> float conversion (quarter-rate on the H100): in bfloat16 on CUDA,
inline PTX permutes the packed bytes into the low bytes of 16-bit lanes under 0x43 (bfloat16
128 + v, exact), masks, subtracts 128 (all four 2-bit offsets of a register per call), then one
packed bfloat16 FMA applies scale and zero (DEQ 4; DEQ 3 per offset for 4 bits); elsewhere the
integer is put in a float32 mantissa by its bits and one FMA follows (DEQ 1, the interpreter's
path). A tile's PER key products come first, then one max, one sum and one rescale per tile.

Llama-8B shapes, 2 bits, 32K tokens, one layer, H100, one run (check_kivi --quick --baseline,
ea0bb46): 1.87 ms at batch 75 (1019 GB/s over the packed bytes and scales) and 0.164 ms at
batch 4, against 3.85 / 0.246 ms for the former kernel in the same run (2.06x / 1.50x). The
target (about 1.1 ms at batch 75) is not reached. Where the time goes (SASS of the fast loop
per 128-token tile of 4 warps, per thread, ptxas for sm_90; 64-token tiles of 2 warps are alike
per token): ~1300 instructions, of which ~280 register moves assembling the query's operand
fragments for each key product, ~260 packed FMAs and ~330 permute/logic ops of the
de-quantisation, ~64 HMMA, 36 barriers; IPC about 1.5 per SM (latency:
every value sub-tile goes through shared memory to become a transposed operand, each sub-tile's
probabilities too). History, measured slower and removed (not worth retrying): the former
single-launch kernel (128-token 3-D tiles, int -> float conversions, 255 registers and spills:
0.226-0.246 ms at batch 4, 3.67-3.85 ms at batch 75 on an H100; 0.232-0.249 / 3.88 on an H200);
de-quantisation through Triton bfloat16 bitcasts without inline PTX (0.589 ms at batch 4, 2.75
at 75, H100, 928f7ac); one key product over the whole tile with the sub-tiles joined back into
token order (3.56-3.99 ms at batch 75: the joined keys go through shared memory); 256-token
tiles of 8 warps (4.03 ms at 75); no register cap (2.88 ms at 75); a cap of 96 (spills, 2.38);
64-token blocks loading each value byte once per channel it holds (0.553 ms at batch 4, H100,
cb524fc); 2-D tiles with integers made floats by their bits and per-element scale loads (0.373
ms at batch 4, 6.06 ms at batch 75, H200).

`decode_attention_reference` computes the same function in float32 with plain torch.

Prefill kernels: `dequantize_into` writes the de-quantised earlier keys and values straight in
the model dtype (a chunk of a chunked prefill attends over them), `quantize_from_rings` quantises
complete key groups and value groups from the residual rings into the packed store (what
`policies.kivi.quantize_groups` computes, byte for byte: torch.round's half-to-even rounding,
IEEE division). Each is one launch for keys and values (a program does a key group and a tile
of value tokens, each where it has one): a launch costs the host more than either's work costs
the GPU at prefill shapes.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from pipeline import cuda_rtc
from pipeline.triton_gate import import_triton, multiprocessors
from policies import kivi_cuda

# triton is optional: without it (or without CUDA) the layer uses its reference path
triton, tl = import_triton()


@dataclass
class KiviStore:
    """The tensors of a KIVI layer's packed store (see the module docstring); dims 2 may have spare."""

    n: torch.Tensor  # [b, h] tokens stored
    nk: torch.Tensor  # [b, h] quantised keys (a multiple of group_size)
    nv: torch.Tensor  # [b, h] quantised values
    kq: torch.Tensor  # [b, h, groups, d, G*bits/8] uint8
    kscale: torch.Tensor  # [b, h, groups, d]
    kzero: torch.Tensor
    kres: torch.Tensor  # [b, h, Wk, d]: key of token j >= nk at slot j % Wk
    vq: torch.Tensor  # [b, h, tokens, d*bits/8] uint8
    vscale: torch.Tensor  # [b, h, tokens, d/gv]
    vzero: torch.Tensor
    vres: torch.Tensor  # [b, h, Wv, d]: value of token j >= nv at slot j % Wv
    bits: int
    group_size: int


def kernel_supports(store: KiviStore, query: torch.Tensor) -> bool:
    """Whether the fused kernel handles these shapes (powers of two that tile into its blocks)."""
    d = store.kres.shape[-1]
    g = store.group_size
    gv = d // store.vscale.shape[-1]
    group = query.shape[1] // store.n.shape[1]

    def pow2(x: int) -> bool:
        return x > 0 and x & (x - 1) == 0

    per = 8 // store.bits if store.bits in (2, 4) else 0
    return (
        triton is not None
        and per > 0
        and pow2(d)
        and 16 * per <= d <= 256  # 16 <= d / per: the value sub-tiles' matrix products
        and pow2(g)
        and g <= default_block_n(store.bits)
        and pow2(gv)
        and gv >= per
        and group <= 64
        and query.shape[2] == 1
    )


# -- reference (float32, plain torch) ----------------------------------------------------------


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    vals = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def dequantized(
    store: KiviStore, slots: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [b, h, slots, d] (`dtype`, float32 by default) of each (row, head)'s tokens
    (zero past its length)."""
    b, h = store.n.shape
    d = store.kres.shape[-1]
    dev = store.n.device
    j = torch.arange(slots, device=dev)

    def token_major(x: torch.Tensor) -> torch.Tensor:  # [b, h, m, d] -> exactly `slots` tokens
        m = x.shape[2]
        if m >= slots:
            return x[:, :, :slots]
        return torch.cat([x, x.new_zeros((b, h, slots - m, d))], dim=2)

    kdq = _unpack(store.kq, store.bits).to(dtype) * store.kscale.to(dtype)[..., None]
    kdq = kdq + store.kzero.to(dtype)[..., None]
    kdq = token_major(kdq.transpose(-1, -2).reshape(b, h, -1, d))
    ngv = store.vscale.shape[-1]
    vq = store.vq.reshape(*store.vq.shape[:3], ngv, store.vq.shape[-1] // ngv)
    vdq = _unpack(vq, store.bits).to(dtype) * store.vscale.to(dtype)[..., None]
    vdq = vdq + store.vzero.to(dtype)[..., None]
    vdq = token_major(vdq.reshape(b, h, -1, d))
    kres = store.kres.to(dtype)[:, :, j % store.kres.shape[2]]
    vres = store.vres.to(dtype)[:, :, j % store.vres.shape[2]]
    keys = torch.where((j < store.nk[..., None])[..., None], kdq, kres)
    values = torch.where((j < store.nv[..., None])[..., None], vdq, vres)
    inside = (j < store.n[..., None])[..., None]
    return keys.where(inside, 0.0), values.where(inside, 0.0)


def decode_attention_reference(
    query: torch.Tensor, store: KiviStore, scaling: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Attention [b, H, 1, d] (`dtype`, float32 by default) of decode queries [b, H, 1, d] over
    every stored token."""
    b, num_heads, _, d = query.shape
    h = store.n.shape[1]
    slots = int(store.n.max())
    keys, values = dequantized(store, slots, dtype)
    q = query.to(dtype).reshape(b, h, num_heads // h, d)
    scores = torch.einsum("bhgd,bhsd->bhgs", q, keys) * scaling
    scores = scores.masked_fill(~(torch.arange(slots, device=q.device) < store.n[..., None, None]), -math.inf)
    out = torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), values)
    return out.reshape(b, num_heads, 1, d)


def _unpack_asm(shift: int, mask: int) -> str:
    """PTX: 4 packed bytes ($2) -> their integers at bit `shift` (`mask`) as 4 exact bfloat16 in
    $0, $1: the integer put in the low byte of a 16-bit lane whose high byte is 0x43 (bfloat16
    128 + v, by its bits; one byte permute per lane pair, one AND), then minus 128 (one FMA per
    pair)."""
    lane_mask = 0x43004300 | (mask << 16) | mask
    return f"""{{
    .reg .b32 t, c, one, neg;
    shr.b32 t, $2, {shift};
    mov.b32 c, 0x43434343;
    mov.b32 one, 0x3F803F80;
    mov.b32 neg, 0xC300C300;
    prmt.b32 $0, t, c, 0x4140;
    prmt.b32 $1, t, c, 0x4342;
    and.b32 $0, $0, {lane_mask:#x};
    and.b32 $1, $1, {lane_mask:#x};
    fma.rn.bf16x2 $0, $0, one, neg;
    fma.rn.bf16x2 $1, $1, one, neg;
    }}"""


def _unpack_all_asm() -> str:
    """PTX: 4 packed bytes ($8) -> their 2-bit integers at bit offsets 0, 2, 4, 6 as exact
    bfloat16 (offset s in $2s, $2s+1), as `_unpack_asm` but with its constants set once per 16."""
    body = []
    for s in range(4):
        shifted = "$8" if s == 0 else "t"
        if s:
            body.append(f"shr.b32 t, $8, {2 * s};")
        body += [
            f"prmt.b32 ${2 * s}, {shifted}, c, 0x4140;",
            f"prmt.b32 ${2 * s + 1}, {shifted}, c, 0x4342;",
            f"and.b32 ${2 * s}, ${2 * s}, 0x43034303;",
            f"and.b32 ${2 * s + 1}, ${2 * s + 1}, 0x43034303;",
            f"fma.rn.bf16x2 ${2 * s}, ${2 * s}, one, neg;",
            f"fma.rn.bf16x2 ${2 * s + 1}, ${2 * s + 1}, one, neg;",
        ]
    lines = "\n    ".join(body)
    return f"""{{
    .reg .b32 t, c, one, neg;
    mov.b32 c, 0x43434343;
    mov.b32 one, 0x3F803F80;
    mov.b32 neg, 0xC300C300;
    {lines}
    }}"""


if triton is not None:
    _ASM_2BIT_ALL = tl.constexpr(_unpack_all_asm())
    _ASM_2BIT_0 = tl.constexpr(_unpack_asm(0, 3))
    _ASM_2BIT_1 = tl.constexpr(_unpack_asm(2, 3))
    _ASM_2BIT_2 = tl.constexpr(_unpack_asm(4, 3))
    _ASM_2BIT_3 = tl.constexpr(_unpack_asm(6, 3))
    _ASM_4BIT_0 = tl.constexpr(_unpack_asm(0, 15))
    _ASM_4BIT_1 = tl.constexpr(_unpack_asm(4, 15))


# -- the fused kernel --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _kivi_decode_merge(
        OP,
        MP,
        LP,
        OUT,
        sob,
        soh,
        H: tl.constexpr,
        num_splits,
        D: tl.constexpr,
        GROUP: tl.constexpr,
        M: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        rm = tl.arange(0, M)
        c = tl.arange(0, D)
        m_i = tl.full([M], -float("inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D], tl.float32)
        for split in range(0, num_splits):
            part = bh * num_splits + split
            m_s = tl.load(MP + part * M + rm, mask=rm < GROUP, other=-float("inf"))
            l_s = tl.load(LP + part * M + rm, mask=rm < GROUP, other=0.0)
            o_s = tl.load(
                OP + (part * M + rm)[:, None] * D + c[None, :], mask=(rm < GROUP)[:, None], other=0.0
            )
            m_new = tl.maximum(m_i, m_s)
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            a_old = tl.exp2(m_i - m_safe)
            a_new = tl.exp2(m_s - m_safe)
            l_i = l_i * a_old + l_s * a_new
            acc = acc * a_old[:, None] + o_s * a_new[:, None]
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        qmask = rm < GROUP
        ptr = OUT + b * sob + (h * GROUP + rm)[:, None] * soh + c[None, :]
        tl.store(ptr, out.to(OUT.dtype.element_ty), mask=qmask[:, None])

    @triton.jit
    def _values(
        vq_base, vs_base, vz_base, tok, nv, svt, sut,
        D: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr,
    ):  # fmt: skip
        """Packed value bytes [NB, D/GV, GV/PER] of tokens `tok` [NB], scales/zeros [NB, D/GV, 1]
        (each byte and each scale loaded once; zero past `nv`)."""
        PER: tl.constexpr = 8 // BITS
        NGV: tl.constexpr = D // GV
        GVB: tl.constexpr = GV // PER
        gi = tl.arange(0, NGV)
        jv = tl.arange(0, GVB)
        bptr = vq_base + tok[:, None, None] * svt + gi[None, :, None] * GVB + jv[None, None, :]
        sptr = tok[:, None, None] * sut + gi[None, :, None]
        ok = (tok < nv)[:, None, None]
        vb = tl.load(bptr, mask=ok, other=0)
        vs = tl.load(vs_base + sptr, mask=ok, other=0.0).to(tl.float32)
        vz = tl.load(vz_base + sptr, mask=ok, other=0.0).to(tl.float32)
        return vb, vs, vz

    @triton.jit
    def _pv(
        acc, p, vb, vs, vz, t: tl.constexpr, tok, n, nv, vr_base, swt, Wv, dt,
        D: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """acc [M, D/PER] (channels j * PER + t) += p [M, NB] @ values of tokens `tok` there (the
        residual ring's from `nv` on)."""
        PER: tl.constexpr = 8 // BITS
        NGV: tl.constexpr = D // GV
        GVB: tl.constexpr = GV // PER
        MASK: tl.constexpr = (1 << BITS) - 1
        NB: tl.constexpr = tok.shape[0]
        v3 = ((vb >> (t * BITS)) & MASK).to(tl.float32) * vs + vz  # [NB, NGV, GVB]
        gi = tl.arange(0, NGV)
        jv = tl.arange(0, GVB)
        ch = (gi[None, :, None] * GVB + jv[None, None, :]) * PER + t
        res = ((tok >= nv) & (tok < n))[:, None, None]
        vres = tl.load(vr_base + (tok % Wv)[:, None, None] * swt + ch, mask=res, other=0.0)
        v3 = tl.where((tok < nv)[:, None, None], v3, vres.to(tl.float32))
        v = tl.reshape(v3, (NB, D // PER)).to(dt)
        if IEEE:
            return acc + tl.dot(p, v, input_precision="ieee")
        return acc + tl.dot(p, v)

    @triton.jit
    def _tail_tile(
        q, m_i, l_i, acc0, acc1, acc2, acc3, start, n, nk, nv, qk_scale,
        kq_base, ks_base, kz_base, kr_base, vq_base, vs_base, vz_base, vr_base,
        skg, ssg, srt, svt, sut, swt, Wk, Wv,
        D: tl.constexpr, G: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """One tile of BN tokens from `start` (a multiple of BN and G) of the tail: tokens past the
        quantised ones come from the residual rings, tokens past `n` are masked. Every load of the
        tile is issued first (key bytes [D, BN/G, G/PER] and their per-group scales once, the value
        bytes of each sub-tile once), then PER sub-tiles, one per bit offset of the key bytes:
        sub-tile s holds the tokens at bit offset s (token = group start + byte * PER + s), so a key
        byte tile is shifted, never gathered. Values are de-quantised per bit offset t of their
        bytes too, into accumulator t (channels j * PER + t)."""
        PER: tl.constexpr = 8 // BITS
        GB: tl.constexpr = G // PER  # bytes per channel of a key group
        NG: tl.constexpr = BN // G  # key groups in the tile
        NB: tl.constexpr = BN // PER  # tokens per sub-tile
        MASK: tl.constexpr = (1 << BITS) - 1
        dt = q.dtype
        c = tl.arange(0, D)
        gl = tl.arange(0, NG)
        jb = tl.arange(0, GB)
        grp = start // G + gl
        kptr = kq_base + grp[None, :, None] * skg + c[:, None, None] * GB + jb[None, None, :]
        sptr = grp[None, :, None] * ssg + c[:, None, None]
        r = tl.arange(0, NB)
        first = start + (r // GB) * G + (r % GB) * PER  # token at bit offset 0 of each column's byte
        kok = ((start + gl * G) < nk)[None, :, None]  # nk is a multiple of G: whole groups
        kb = tl.load(kptr, mask=kok, other=0)  # [D, NG, GB]
        ks = tl.load(ks_base + sptr, mask=kok, other=0.0).to(tl.float32)  # [D, NG, 1]
        kz = tl.load(kz_base + sptr, mask=kok, other=0.0).to(tl.float32)
        vb0, vs0, vz0 = _values(vq_base, vs_base, vz_base, first, nv, svt, sut, D, GV, BITS)
        vb1, vs1, vz1 = _values(vq_base, vs_base, vz_base, first + 1, nv, svt, sut, D, GV, BITS)
        if PER == 4:
            vb2, vs2, vz2 = _values(vq_base, vs_base, vz_base, first + 2, nv, svt, sut, D, GV, BITS)
            vb3, vs3, vz3 = _values(vq_base, vs_base, vz_base, first + 3, nv, svt, sut, D, GV, BITS)
        else:
            vb2, vs2, vz2 = vb0, vs0, vz0
            vb3, vs3, vz3 = vb1, vs1, vz1
        for s in tl.static_range(PER):
            tok = first + s
            kt = tl.reshape(((kb >> (s * BITS)) & MASK).to(tl.float32) * ks + kz, (D, NB))
            inside = tok < n
            kres = tl.load(
                kr_base + (tok % Wk)[None, :] * srt + c[:, None],
                mask=((tok >= nk) & inside)[None, :],
                other=0.0,
            ).to(tl.float32)
            kt = tl.where((tok < nk)[None, :], kt, kres)
            if IEEE:
                scores = tl.dot(q, kt.to(dt), input_precision="ieee")
            else:
                scores = tl.dot(q, kt.to(dt))
            scores = tl.where(inside[None, :], scores * qk_scale, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(dt)
            m_i = m_new
            if s == 0:
                vb, vs, vz = vb0, vs0, vz0
            elif s == 1:
                vb, vs, vz = vb1, vs1, vz1
            elif s == 2:
                vb, vs, vz = vb2, vs2, vz2
            else:
                vb, vs, vz = vb3, vs3, vz3
            acc0 = _pv(
                acc0 * alpha[:, None], p, vb, vs, vz, 0, tok, n, nv, vr_base, swt, Wv, dt,
                D, GV, BITS, IEEE,
            )  # fmt: skip
            acc1 = _pv(
                acc1 * alpha[:, None], p, vb, vs, vz, 1, tok, n, nv, vr_base, swt, Wv, dt,
                D, GV, BITS, IEEE,
            )  # fmt: skip
            if PER == 4:
                acc2 = _pv(
                    acc2 * alpha[:, None], p, vb, vs, vz, 2, tok, n, nv, vr_base, swt, Wv, dt,
                    D, GV, BITS, IEEE,
                )  # fmt: skip
                acc3 = _pv(
                    acc3 * alpha[:, None], p, vb, vs, vz, 3, tok, n, nv, vr_base, swt, Wv, dt,
                    D, GV, BITS, IEEE,
                )  # fmt: skip
        return m_i, l_i, acc0, acc1, acc2, acc3

    @triton.jit
    def _ints_as_floats(x, t: tl.constexpr, sc, ze, BITS: tl.constexpr, DEQ: tl.constexpr):
        """The integers at bit offset t of the bytes `x` (uint8), de-quantised as `x' * sc + ze`.

        DEQ 1 (any dtype; the interpreter): the integer v placed at the top of the mantissa of 1.0
        (float32 1 + v / 2**BITS, by its bits), one FMA with sc = 2**BITS * scale, ze = zero - sc
        (float32; within 2**-20 scale).
        DEQ 3 (bfloat16, CUDA): v as an exact bfloat16 by inline PTX (`_unpack_asm`: 128 + v by its
        bits, minus 128), then one bfloat16 FMA (sc, ze: scale, zero).
        DEQ 4 (bfloat16, CUDA, 2 bits): `x` already unpacked by `_unpack_all`, one bfloat16 FMA."""
        MASK: tl.constexpr = (1 << BITS) - 1
        if DEQ == 1:
            TOP: tl.constexpr = 23 - BITS
            bits_ = ((x.to(tl.int32) << (TOP - t * BITS)) & (MASK << TOP)) | 0x3F800000
            return bits_.to(tl.float32, bitcast=True) * sc + ze
        elif DEQ == 3:
            return _unpack_bf16(x, t, BITS) * sc + ze
        else:
            return x * sc + ze  # x: `_unpack_all`'s integers at offset t

    @triton.jit
    def _unpack_bf16(x, t: tl.constexpr, BITS: tl.constexpr):
        """The integers at bit offset t of the bytes `x` as exact bfloat16 (`_unpack_asm`)."""
        if BITS == 2:
            if t == 0:
                asm: tl.constexpr = _ASM_2BIT_0
            elif t == 1:
                asm: tl.constexpr = _ASM_2BIT_1
            elif t == 2:
                asm: tl.constexpr = _ASM_2BIT_2
            else:
                asm: tl.constexpr = _ASM_2BIT_3
        elif t == 0:
            asm: tl.constexpr = _ASM_4BIT_0
        else:
            asm: tl.constexpr = _ASM_4BIT_1
        return tl.inline_asm_elementwise(asm, "=r,=r,r", [x], dtype=tl.bfloat16, is_pure=True, pack=4)

    @triton.jit
    def _unpack_all(x, BITS: tl.constexpr, DEQ: tl.constexpr):
        """DEQ 4: the integers at every bit offset of the bytes `x` (2 bits: `_unpack_all_asm`);
        other DEQ: `x` itself for each offset (`_ints_as_floats` unpacks)."""
        if DEQ == 4:
            u0, u1, u2, u3 = tl.inline_asm_elementwise(
                _ASM_2BIT_ALL, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
            )  # fmt: skip
        else:
            u0, u1, u2, u3 = x, x, x, x
        return u0, u1, u2, u3

    @triton.jit
    def _scales(s, z, BITS: tl.constexpr, DEQ: tl.constexpr):
        """(sc, ze) of `_ints_as_floats` from a group's scale and zero (model dtype)."""
        if DEQ == 1:
            sc = s.to(tl.float32) * (1 << BITS)
            return sc, z.to(tl.float32) - sc
        else:
            return s.to(tl.bfloat16), z.to(tl.bfloat16)

    @triton.jit
    def _value_bytes(vq_base, vs_base, vz_base, tok, svt, sut, D: tl.constexpr, GV: tl.constexpr,
                     BITS: tl.constexpr, DEQ: tl.constexpr):  # fmt: skip
        """Value bytes [NB, D/GV, GV/PER] of tokens `tok` (all quantised) and their (sc, ze)."""
        PER: tl.constexpr = 8 // BITS
        NGV: tl.constexpr = D // GV
        GVB: tl.constexpr = GV // PER
        gi = tl.arange(0, NGV)
        jv = tl.arange(0, GVB)
        vb = tl.load(vq_base + tok[:, None, None] * svt + gi[None, :, None] * GVB + jv[None, None, :])
        sptr = tok[:, None, None] * sut + gi[None, :, None]
        sc, ze = _scales(tl.load(vs_base + sptr), tl.load(vz_base + sptr), BITS, DEQ)
        return vb, sc, ze

    @triton.jit
    def _pv4(
        acc, p, vb, sc, ze, t: tl.constexpr, dt, BITS: tl.constexpr, DEQ: tl.constexpr, IEEE: tl.constexpr
    ):
        """acc [M, D/PER] (channels j * PER + t) += p [M, NB] @ the values at bit offset t of vb."""
        NB: tl.constexpr = vb.shape[0]
        v = tl.reshape(_ints_as_floats(vb, t, sc, ze, BITS, DEQ), (NB, vb.shape[1] * vb.shape[2]))
        if IEEE:
            return tl.dot(p, v.to(dt), acc, input_precision="ieee")
        return tl.dot(p, v.to(dt), acc)

    @triton.jit
    def _scores(q, kb, s: tl.constexpr, sc, ze, D: tl.constexpr, NB: tl.constexpr, BITS: tl.constexpr,
                DEQ: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        """q [M, D] @ the keys at bit offset s of the key bytes kb [D, NG, GB] -> [M, NB]."""
        kt = tl.reshape(_ints_as_floats(kb, s, sc, ze, BITS, DEQ), (D, NB)).to(q.dtype)
        if IEEE:
            return tl.dot(q, kt, input_precision="ieee")
        return tl.dot(q, kt)

    @triton.jit
    def _pv_sub(
        acc0, acc1, acc2, acc3, p, vb, sc, ze, BITS: tl.constexpr, DEQ: tl.constexpr, IEEE: tl.constexpr
    ):
        """Every accumulator t (channels j * PER + t) += p [M, NB] @ those values of one sub-tile."""
        dt = p.dtype
        v0, v1, v2, v3 = _unpack_all(vb, BITS, DEQ)
        acc0 = _pv4(acc0, p, v0, sc, ze, 0, dt, BITS, DEQ, IEEE)
        acc1 = _pv4(acc1, p, v1, sc, ze, 1, dt, BITS, DEQ, IEEE)
        if BITS == 2:
            acc2 = _pv4(acc2, p, v2, sc, ze, 2, dt, BITS, DEQ, IEEE)
            acc3 = _pv4(acc3, p, v3, sc, ze, 3, dt, BITS, DEQ, IEEE)
        return acc0, acc1, acc2, acc3

    @triton.jit
    def _fast_tile(
        q, m_i, l_i, acc0, acc1, acc2, acc3, start, qk_scale,
        kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, skg, ssg, svt, sut,
        D: tl.constexpr, G: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr,
        DEQ: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """A tile of BN tokens whose keys and values are all quantised (the bulk of a long cache):
        as `_tail_tile` without masks or rings, but all PER sub-tiles' scores first, then one max,
        one sum and one online-softmax rescale per tile, and the de-quantisation `_ints_as_floats`
        (DEQ), whose integers are never converted by int -> float instructions."""
        PER: tl.constexpr = 8 // BITS
        GB: tl.constexpr = G // PER
        NG: tl.constexpr = BN // G
        NB: tl.constexpr = BN // PER
        dt = q.dtype
        c = tl.arange(0, D)
        grp = start // G + tl.arange(0, NG)
        jb = tl.arange(0, GB)
        kb = tl.load(kq_base + grp[None, :, None] * skg + c[:, None, None] * GB + jb[None, None, :])
        sptr = grp[None, :, None] * ssg + c[:, None, None]
        ksc, kze = _scales(tl.load(ks_base + sptr), tl.load(kz_base + sptr), BITS, DEQ)
        r = tl.arange(0, NB)
        first = start + (r // GB) * G + (r % GB) * PER  # token at bit offset 0 of each column's byte
        vb0, vsc0, vze0 = _value_bytes(vq_base, vs_base, vz_base, first, svt, sut, D, GV, BITS, DEQ)
        vb1, vsc1, vze1 = _value_bytes(vq_base, vs_base, vz_base, first + 1, svt, sut, D, GV, BITS, DEQ)
        k0, k1, k2, k3 = _unpack_all(kb, BITS, DEQ)
        s0 = _scores(q, k0, 0, ksc, kze, D, NB, BITS, DEQ, IEEE)
        s1 = _scores(q, k1, 1, ksc, kze, D, NB, BITS, DEQ, IEEE)
        if PER == 4:
            vb2, vsc2, vze2 = _value_bytes(vq_base, vs_base, vz_base, first + 2, svt, sut, D, GV, BITS, DEQ)
            vb3, vsc3, vze3 = _value_bytes(vq_base, vs_base, vz_base, first + 3, svt, sut, D, GV, BITS, DEQ)
            s2 = _scores(q, k2, 2, ksc, kze, D, NB, BITS, DEQ, IEEE)
            s3 = _scores(q, k3, 3, ksc, kze, D, NB, BITS, DEQ, IEEE)
            top = tl.max(tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)), 1)  # one reduction
        else:
            top = tl.max(tl.maximum(s0, s1), 1)
        m_new = tl.maximum(m_i, top * qk_scale)  # finite: every token of the tile is inside
        alpha = tl.exp2(m_i - m_new)
        p0 = tl.exp2(s0 * qk_scale - m_new[:, None])
        p1 = tl.exp2(s1 * qk_scale - m_new[:, None])
        acc0, acc1, acc2, acc3 = _pv_sub(
            acc0 * alpha[:, None], acc1 * alpha[:, None], acc2 * alpha[:, None], acc3 * alpha[:, None],
            p0.to(dt), vb0, vsc0, vze0, BITS, DEQ, IEEE,
        )  # fmt: skip
        acc0, acc1, acc2, acc3 = _pv_sub(acc0, acc1, acc2, acc3, p1.to(dt), vb1, vsc1, vze1, BITS, DEQ, IEEE)
        if PER == 4:
            p2 = tl.exp2(s2 * qk_scale - m_new[:, None])
            p3 = tl.exp2(s3 * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum((p0 + p1) + (p2 + p3), 1)  # one reduction
            acc0, acc1, acc2, acc3 = _pv_sub(
                acc0, acc1, acc2, acc3, p2.to(dt), vb2, vsc2, vze2, BITS, DEQ, IEEE
            )
            acc0, acc1, acc2, acc3 = _pv_sub(
                acc0, acc1, acc2, acc3, p3.to(dt), vb3, vsc3, vze3, BITS, DEQ, IEEE
            )
        else:
            l_i = l_i * alpha + tl.sum(p0 + p1, 1)
        return m_new, l_i, acc0, acc1, acc2, acc3

    @triton.jit
    def _store_acc(
        OP,
        part,
        acc,
        t: tl.constexpr,
        M: tl.constexpr,
        D: tl.constexpr,
        PER: tl.constexpr,
        GROUP: tl.constexpr,
    ):
        rm = tl.arange(0, M)
        j = tl.arange(0, D // PER)
        ptr = OP + (part * M + rm)[:, None] * D + (j * PER + t)[None, :]
        tl.store(ptr, acc, mask=(rm < GROUP)[:, None])

    @triton.jit
    def _kivi_decode_split(
        Q, N, NK, NV, KQ, KS, KZ, KR, VQ, VS, VZ, VR, OP, MP, LP,
        sqb, sqh, skb, skh, skg, ssb, ssh, ssg, srb, srh, srt, svb, svh, svt, sub, suh, sut, swb, swh, swt,
        Wk, Wv,
        H: tl.constexpr, per_split, num_parts, qk_scale,
        D: tl.constexpr, G: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr,
        GROUP: tl.constexpr, M: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, DEQ: tl.constexpr,
        TAIL: tl.constexpr, TAIL_PARTS: tl.constexpr, QB: tl.constexpr,
    ):  # fmt: skip
        """Partial attention of one (row, kv head) over one part of its tokens: split program_id(1)
        of `per_split` tokens, its fast tiles (tokens below `quant_end`, whose keys and values are
        all quantised: `_fast_tile`); TAIL: the tail [quant_end, n) (residual rings, the last
        partial tile: `_tail_tile`), program_id(1) taking every TAIL_PARTS-th of its tiles into the
        last TAIL_PARTS parts. Two launches of one kernel, so the fast one is compiled without the
        tail's code (registers for more programs per SM). The fast part ends at a multiple of QB
        (BN, or the CUDA kernel's block when that kernel computes the fast part)."""
        PER: tl.constexpr = 8 // BITS
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        n = tl.load(N + bh).to(tl.int32)  # 32-bit token arithmetic; 64-bit bases
        nk = tl.load(NK + bh).to(tl.int32)
        nv = tl.load(NV + bh).to(tl.int32)
        b = b.to(tl.int64)
        h = h.to(tl.int64)
        rm = tl.arange(0, M)
        c = tl.arange(0, D)
        q = tl.load(
            Q + b * sqb + (h * GROUP + rm)[:, None] * sqh + c[None, :], mask=(rm < GROUP)[:, None], other=0.0
        )
        m_i = tl.full([M], -float("inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc0 = tl.zeros([M, D // PER], tl.float32)
        acc1 = tl.zeros([M, D // PER], tl.float32)
        acc2 = tl.zeros([M, D // PER], tl.float32)
        acc3 = tl.zeros([M, D // PER], tl.float32)
        kq_base = KQ + b * skb + h * skh
        ks_base = KS + b * ssb + h * ssh
        kz_base = KZ + b * ssb + h * ssh
        kr_base = KR + b * srb + h * srh
        vq_base = VQ + b * svb + h * svh
        vs_base = VS + b * sub + h * suh
        vz_base = VZ + b * sub + h * suh
        vr_base = VR + b * swb + h * swh
        quant_end = (tl.minimum(n, tl.minimum(nk, nv)) // QB) * QB  # the fast part's end
        lo = split * per_split
        hi = tl.minimum(lo + per_split, n)
        if TAIL:  # program_id(1) takes every TAIL_PARTS-th tile of the tail
            for start in range(quant_end + split * BN, n, BN * TAIL_PARTS):
                m_i, l_i, acc0, acc1, acc2, acc3 = _tail_tile(
                    q, m_i, l_i, acc0, acc1, acc2, acc3, start, n, nk, nv, qk_scale,
                    kq_base, ks_base, kz_base, kr_base, vq_base, vs_base, vz_base, vr_base,
                    skg, ssg, srt, svt, sut, swt, Wk, Wv, D, G, GV, BITS, BN, IEEE,
                )  # fmt: skip
            part = bh * num_parts + num_parts - TAIL_PARTS + split
        else:
            for start in range(lo, tl.minimum(hi, quant_end), BN):
                m_i, l_i, acc0, acc1, acc2, acc3 = _fast_tile(
                    q, m_i, l_i, acc0, acc1, acc2, acc3, start, qk_scale,
                    kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, skg, ssg, svt, sut,
                    D, G, GV, BITS, BN, DEQ, IEEE,
                )  # fmt: skip
            part = bh * num_parts + split
        _store_acc(OP, part, acc0, 0, M, D, PER, GROUP)
        _store_acc(OP, part, acc1, 1, M, D, PER, GROUP)
        if PER == 4:
            _store_acc(OP, part, acc2, 2, M, D, PER, GROUP)
            _store_acc(OP, part, acc3, 3, M, D, PER, GROUP)
        tl.store(MP + part * M + rm, m_i, mask=rm < GROUP)
        tl.store(LP + part * M + rm, l_i, mask=rm < GROUP)


_WORKSPACE: dict[tuple, torch.Tensor] = {}


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
    """A float32 scratch buffer reused by every call on `device` (kernels on one stream run in
    order, so a layer's split kernel never overwrites what the previous layer's merge still reads).
    A larger request replaces it (the old one is freed): see `workspace`."""
    key = (str(device),)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 20), dtype=torch.float32, device=device)
        _WORKSPACE[key] = buf
    return buf


def release_workspace() -> None:
    """Drop the scratch buffers (the next call allocates again): a process that is done with
    kivi decoding (the benchmark between its cells) gives their memory back."""
    _WORKSPACE.clear()


def workspace(device: torch.device) -> torch.Tensor | None:
    """The scratch buffer `decode_attention` uses on `device` now (None before its first call).

    A CUDA graph that captured `decode_attention` holds this buffer's address, and a later call
    that needs more replaces (and frees) it: a caller that replays such a graph keys it on this
    tensor's identity (`QuantizedKVLayer.static_buffers`), so a replaced buffer means a new capture."""
    return _WORKSPACE.get((str(device),))


DEFAULT_DEQ = 4  # the fast tiles' de-quantisation (`_ints_as_floats`; 4 bits take DEQ 3)
# the fast kernel's launch per bit width. 2 bits: the fastest at batch 75 (32K tokens, Llama-8B
# shapes) in check_kivi's sweep on an H100 (1.87 ms; 0.164 ms at batch 4, where 64-token tiles,
# 2 stages and 8 programs per SM took 0.147 ms). 4 bits: not timed since the rewrite (checked for
# correctness on the H100 with these settings), the former kernel's 64-token tiles and 4 warps
DEFAULTS = {
    2: dict(block_n=64, num_warps=2, num_stages=3, programs_per_sm=16, maxnreg=128),
    4: dict(block_n=64, num_warps=4, num_stages=2, programs_per_sm=8, maxnreg=128),
}


def default_block_n(bits: int) -> int:
    """Tokens per tile (a power of two, a multiple of the key group)."""
    return DEFAULTS[bits]["block_n"]


def decode_attention(
    query: torch.Tensor,
    store: KiviStore,
    scaling: float,
    max_tokens: int,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    programs_per_sm: int | None = None,
    deq: int | None = None,
    num_stages: int | None = None,
    maxnreg: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Fused decode attention [b, H, 1, d] (query's dtype) over the packed store.

    `max_tokens` is a host-side upper bound of `store.n` (no device sync here); `num_splits`
    overrides how many programs share one (row, kv head)'s tokens (default: enough for
    `programs_per_sm` programs per SM); `block_n` (a multiple of the key group and of
    16 * (8 // bits), a power of two), `num_warps`, `num_stages`, `deq` (`_ints_as_floats`) and
    `maxnreg` (a register cap: more programs per SM) tune the fast kernel (swept by
    `pipeline.bench.check_kivi`; defaults per bit width in `DEFAULTS`).

    `impl` chooses who computes the whole quantised blocks: "cuda" (`policies.kivi_cuda`, 2-bit
    bfloat16 stores with 32-token key groups; the default where it applies), "triton" (the fast
    tiles above), or None for the environment's KVPIPE_KIVI_DECODE, else the default. The tail
    and the merge are the Triton kernels either way; with "cuda", `block_n` is the tail's tile
    (`TAIL_BLOCK`) and the other tuning arguments but `programs_per_sm` do not apply.
    """
    if triton is None:
        raise RuntimeError("kivi decode kernel needs triton")
    b, num_heads, q_len, d = query.shape
    h = store.n.shape[1]
    group = num_heads // h
    assert q_len == 1 and num_heads == group * h
    m = max(16, triton.next_power_of_2(group))
    deq = _deq_for(query.dtype, query.device, store.bits, DEFAULT_DEQ if deq is None else deq)
    tuned = DEFAULTS[store.bits]
    use_cuda = _cuda_blocks(impl, query, store, group)
    if use_cuda:  # one warp a program, whole 128-token blocks; the tail in smaller tiles
        programs_per_sm = programs_per_sm or CUDA_PROGRAMS_PER_SM
        # the tail's tiles divide the CUDA block (a larger `block_n` is capped there)
        bn, fewest = kivi_cuda.BLOCK, CUDA_MIN_BLOCKS_PER_SPLIT
        tail_bn = min(block_n or TAIL_BLOCK, bn)
    else:
        programs_per_sm = programs_per_sm or tuned["programs_per_sm"]
        bn = tail_bn = block_n or default_block_n(store.bits)
        fewest = 1
    assert bn % store.group_size == 0 and bn & (bn - 1) == 0 and bn % tail_bn == 0
    blocks = max(1, triton.cdiv(max(max_tokens, 1), bn))
    if num_splits is None:  # enough programs to fill the SMs, each with `fewest` blocks or more
        wanted = multiprocessors(query.device, on_cpu=2) * programs_per_sm
        num_splits = max(1, min(blocks // fewest, triton.cdiv(wanted, b * h)))
    per_split = triton.cdiv(blocks, num_splits) * bn
    num_splits = triton.cdiv(blocks * bn, per_split)
    # the tail [quant_end, n) holds under one block of quantised tokens plus the rings' tokens: its
    # tiles are spread over parts of their own (one program each)
    tail_parts = triton.cdiv(bn - 1 + max(store.kres.shape[2], store.vres.shape[2]), tail_bn)
    num_parts = num_splits + tail_parts
    dev = query.device
    parts = b * h * num_parts
    ws = _workspace(dev, parts * m * (d + 2))
    o_part = ws[: parts * m * d].view(parts, m, d)
    m_part = ws[parts * m * d : parts * m * (d + 1)].view(parts, m)
    l_part = ws[parts * m * (d + 1) : parts * m * (d + 2)].view(parts, m)
    if out is None:
        out = torch.empty((b, num_heads, 1, d), dtype=query.dtype, device=dev)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1
    n, nk, nv = (x.contiguous() for x in (store.n, store.nk, store.nv))
    kq, ks, kz, kr = store.kq, store.kscale, store.kzero, store.kres
    vq, vs, vz, vr = store.vq, store.vscale, store.vzero, store.vres
    assert ks.stride() == kz.stride() and vs.stride() == vz.stride()
    for t in (kq, ks, kr, vq, vs, vr):
        assert t.stride(-1) == 1
    assert kq.stride(3) == kq.shape[4] and query.stride(-1) == 1
    args = (
        query, n, nk, nv, kq, ks, kz, kr, vq, vs, vz, vr, o_part, m_part, l_part,
        query.stride(0), query.stride(1),
        kq.stride(0), kq.stride(1), kq.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        kr.stride(0), kr.stride(1), kr.stride(2),
        vq.stride(0), vq.stride(1), vq.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2),
        vr.stride(0), vr.stride(1), vr.stride(2),
        kr.shape[2], vr.shape[2],
    )  # fmt: skip
    meta = dict(
        H=h, per_split=per_split, num_parts=num_parts, qk_scale=scaling * math.log2(math.e),
        D=d, G=store.group_size, GV=d // vs.shape[-1], BITS=store.bits, GROUP=group, M=m, BN=bn,
        IEEE=query.dtype == torch.float32, DEQ=deq,
    )  # fmt: skip
    if use_cuda:
        kivi_cuda.decode_blocks(
            query, store, o_part, m_part, l_part, per_split=per_split, num_splits=num_splits,
            num_parts=num_parts, scaling=scaling,
        )  # fmt: skip
    else:
        tune = dict(num_warps=num_warps or tuned["num_warps"], num_stages=num_stages or tuned["num_stages"])
        tune["maxnreg"] = maxnreg or tuned["maxnreg"]
        _kivi_decode_split[(b * h, num_splits)](
            *args, **meta, TAIL=False, TAIL_PARTS=tail_parts, QB=bn, **tune
        )
    _kivi_decode_split[(b * h, tail_parts)](
        *args, **dict(meta, DEQ=1, BN=tail_bn), TAIL=True, TAIL_PARTS=tail_parts, QB=bn, num_warps=4
    )  # DEQ unused
    _kivi_decode_merge[(b * h,)](
        o_part, m_part, l_part, out, out.stride(0), out.stride(1),
        H=h, num_splits=num_parts, D=d, GROUP=group, M=m,
    )  # fmt: skip
    return out


CUDA_PROGRAMS_PER_SM = 4 * kivi_cuda.MIN_WARPS  # one-warp programs: about four waves of resident ones
CUDA_MIN_BLOCKS_PER_SPLIT = 4  # small batches: fewer, longer splits (the merge walks every part)
TAIL_BLOCK = 64  # the tail's tiles when the CUDA kernel computes the whole blocks
IMPL_ENV = "KVPIPE_KIVI_DECODE"
_cuda_failed = False  # the CUDA kernel did not compile or load here: Triton from then on


def _cuda_blocks(impl: str | None, query: torch.Tensor, store: KiviStore, group: int) -> bool:
    """Whether `policies.kivi_cuda` computes the whole blocks of this call (see `decode_attention`)."""
    global _cuda_failed
    impl = impl or os.environ.get(IMPL_ENV, "").strip().lower() or "cuda"
    if impl not in ("cuda", "triton"):
        raise ValueError(f"kivi decode impl must be 'cuda' or 'triton', got {impl!r}")
    if impl == "triton" or _cuda_failed:
        return False
    d = store.kres.shape[-1]
    gv = d // store.vscale.shape[-1]
    if not (
        kivi_cuda.supported(query, d, group, store.bits, store.group_size, gv) and kivi_cuda.aligned(store)
    ):
        return False
    try:  # compile (once per shape) here, so that a failure falls back instead of breaking a step
        kivi_cuda.compiled_for(query, d, group, gv)
    except cuda_rtc.CudaRtcError as exc:
        _cuda_failed = True
        warnings.warn(f"kivi: no CUDA decode kernel here ({exc}); Triton from now on", stacklevel=3)
        return False
    return True


def _deq_for(dtype: torch.dtype, device: torch.device, bits: int, deq: int) -> int:
    """DEQ 3 and 4 de-quantise in bfloat16 (exact only for bfloat16 scales) through inline PTX
    (CUDA only): other dtypes and the interpreter take DEQ 1. DEQ 4 is for 2 bits; 4 bits take 3."""
    if deq >= 3 and (dtype != torch.bfloat16 or device.type != "cuda"):
        return 1
    return 3 if deq == 4 and bits != 2 else deq


# -- de-quantisation into a dense tensor (prefill over earlier chunks) ---------------------------

if triton is not None:

    @triton.jit
    def _dequant_key_group(
        KQ, KS, KZ, OUT, bh, gi, skb, skh, skg, ssb, ssh, ssg, sob, soh, sot,
        H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    ):  # fmt: skip
        """Key group `gi` of (row, head) `bh`: G tokens x D channels, written token-major."""
        PER: tl.constexpr = 8 // BITS
        GB: tl.constexpr = G // PER
        MASK: tl.constexpr = (1 << BITS) - 1
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        j = tl.arange(0, GB)
        c = tl.arange(0, D)
        kb = tl.load(KQ + b * skb + h * skh + gi * skg + c[None, :] * GB + j[:, None])  # [GB, D]
        s = tl.load(KS + b * ssb + h * ssh + gi * ssg + c).to(tl.float32)
        z = tl.load(KZ + b * ssb + h * ssh + gi * ssg + c).to(tl.float32)
        base = OUT + b * sob + h * soh
        for t in tl.static_range(PER):
            x = ((kb >> (t * BITS)) & MASK).to(tl.float32) * s[None, :] + z[None, :]
            tok = gi * G + j * PER + t
            tl.store(base + tok[:, None] * sot + c[None, :], x.to(OUT.dtype.element_ty))

    @triton.jit
    def _dequant_value_tile(
        VQ, VS, VZ, OUT, count, bh, ti, svb, svh, svt, sub, suh, sut, sob, soh, sot,
        H: tl.constexpr, D: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr, TB: tl.constexpr,
    ):  # fmt: skip
        """Value tokens [TB * ti, TB * (ti + 1)) (below `count`) of (row, head) `bh`, written
        token-major in channel order: each channel loads its byte (a byte serves PER neighbouring
        channels, from cache), so every store is a contiguous row. (Storing the PER bit offsets
        apart wrote every PER-th channel: strided 2-byte stores, ~115 GB/s on an H100.)"""
        PER: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        tok = ti * TB + tl.arange(0, TB)
        ok = (tok < count)[:, None]
        c = tl.arange(0, D)
        vb = tl.load(VQ + b * svb + h * svh + tok[:, None] * svt + (c // PER)[None, :], mask=ok, other=0)
        q = (vb.to(tl.int32) >> ((c % PER) * BITS)[None, :]) & MASK
        sptr = b * sub + h * suh + tok[:, None] * sut + (c // GV)[None, :]
        s = tl.load(VS + sptr, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(VZ + sptr, mask=ok, other=0.0).to(tl.float32)
        x = (q.to(tl.float32) * s + z).to(OUT.dtype.element_ty)
        tl.store(OUT + b * sob + h * soh + tok[:, None] * sot + c[None, :], x, mask=ok)

    @triton.jit
    def _dequant_kv(
        KQ, KS, KZ, KOUT, groups, skb, skh, skg, ssb, ssh, ssg, kob, koh, kot,
        VQ, VS, VZ, VOUT, count, svb, svh, svt, sub, suh, sut, vob, voh, vot,
        H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr,
        TB: tl.constexpr,
    ):  # fmt: skip
        """Program (bh, i) of one launch for both: key group i (if below `groups`) and value
        tokens [TB * i, TB * (i + 1)) (if below `count`) of (row, head) bh."""
        bh = tl.program_id(0)
        i = tl.program_id(1).to(tl.int64)
        if i < groups:
            _dequant_key_group(
                KQ, KS, KZ, KOUT, bh, i, skb, skh, skg, ssb, ssh, ssg, kob, koh, kot, H, D, G, BITS
            )  # fmt: skip
        if i * TB < count:
            _dequant_value_tile(
                VQ, VS, VZ, VOUT, count, bh, i, svb, svh, svt, sub, suh, sut, vob, voh, vot,
                H, D, GV, BITS, TB,
            )  # fmt: skip


def dequantize_into(
    kq: torch.Tensor,
    kscale: torch.Tensor,
    kzero: torch.Tensor,
    kout: torch.Tensor,
    groups: int,
    vq: torch.Tensor,
    vscale: torch.Tensor,
    vzero: torch.Tensor,
    vout: torch.Tensor,
    count: int,
    bits: int,
) -> None:
    """kout[:, :, : groups * G] = the de-quantised keys of key groups [0, groups) and
    vout[:, :, :count] = the de-quantised values of tokens [0, count) (token-major), one launch.

    kq [b, h, >= groups, d, G*bits/8] uint8, kscale/kzero [b, h, >= groups, d],
    vq [b, h, >= count, d*bits/8] uint8, vscale/vzero [b, h, >= count, d / gv], kout/vout
    [b, h, >= the tokens, d] with unit stride on their last dim."""
    b, h, _, d, gbytes = kq.shape
    tb = 32  # a key group of G = 32 tokens and 32 value tokens per program (80 registers on sm_90)
    programs = max(groups, triton.cdiv(max(count, 0), tb))
    if programs <= 0 or b * h == 0:
        return
    assert kq.stride(-1) == 1 and kq.stride(3) == gbytes and kscale.stride() == kzero.stride()
    assert kscale.stride(-1) == 1 and kout.stride(-1) == 1
    assert vq.stride(-1) == 1 and vscale.stride() == vzero.stride() and vscale.stride(-1) == 1
    assert vout.stride(-1) == 1
    _dequant_kv[(b * h, programs)](
        kq, kscale, kzero, kout, groups, kq.stride(0), kq.stride(1), kq.stride(2),
        kscale.stride(0), kscale.stride(1), kscale.stride(2), kout.stride(0), kout.stride(1), kout.stride(2),
        vq, vscale, vzero, vout, count, vq.stride(0), vq.stride(1), vq.stride(2),
        vscale.stride(0), vscale.stride(1), vscale.stride(2), vout.stride(0), vout.stride(1), vout.stride(2),
        H=h, D=d, G=gbytes * 8 // bits, GV=d // vscale.shape[-1], BITS=bits, TB=tb, num_warps=4,
    )  # fmt: skip


# -- quantisation of complete groups (flush of a layer whose (row, head)s hold equal counts) -----

if triton is not None:

    @triton.jit
    def _round_half_even(y):
        """torch.round's rounding (half to even) for non-negative floats below 2**22."""
        f = tl.floor(y + 0.5)
        return tl.where(((f - y) == 0.5) & (f * 0.5 != tl.floor(f * 0.5)), f - 1.0, f)

    @triton.jit
    def _quantize(x, lo, hi, BITS: tl.constexpr, SDT: tl.constexpr):
        """(integers as float32, scale, zero in SDT) of `x` against its group's min `lo` / max `hi`,
        as `policies.kivi.quantize_groups` computes them."""
        levels: tl.constexpr = (1 << BITS) - 1
        zero = lo.to(SDT)
        scale = tl.math.div_rn(hi - lo, tl.full(hi.shape, levels, tl.float32)).to(SDT)
        s = scale.to(tl.float32)
        s = tl.where(s > 0, s, 1.0)
        return zero, scale, s

    @triton.jit
    def _quant_key_group(
        RING, KQ, KS, KZ, first, W, bh, gi, srb, srh, srt, skb, skh, skg, ssb, ssh, ssg,
        H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    ):  # fmt: skip
        """Key group `first // G + gi` of (row, head) `bh` from the ring (token t in slot t % W):
        per channel over G tokens; packed token t of the group in byte t // PER, bit
        (t % PER) * BITS."""
        PER: tl.constexpr = 8 // BITS
        GB: tl.constexpr = G // PER
        levels: tl.constexpr = (1 << BITS) - 1
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        j = tl.arange(0, GB)
        s_ = tl.arange(0, PER)
        c = tl.arange(0, D)
        tok = first + gi * G + j[:, None] * PER + s_[None, :]  # [GB, PER]
        x = tl.load(RING + b * srb + h * srh + (tok % W)[:, :, None] * srt + c[None, None, :]).to(tl.float32)
        lo = tl.min(tl.min(x, 1), 0)  # [D]
        hi = tl.max(tl.max(x, 1), 0)
        zero, scale, s = _quantize(x, lo, hi, BITS, KS.dtype.element_ty)
        y = tl.math.div_rn(x - zero.to(tl.float32)[None, None, :], tl.broadcast_to(s[None, None, :], x.shape))
        qi = tl.minimum(tl.maximum(_round_half_even(y), 0.0), levels).to(tl.int32)
        packed = tl.sum(qi << (s_ * BITS)[None, :, None], 1)  # [GB, D]
        grp = first // G + gi
        tl.store(KQ + b * skb + h * skh + grp * skg + c[None, :] * GB + j[:, None], packed.to(tl.uint8))
        tl.store(KS + b * ssb + h * ssh + grp * ssg + c, scale)
        tl.store(KZ + b * ssb + h * ssh + grp * ssg + c, zero)

    @triton.jit
    def _quant_value_tile(
        RING, VQ, VS, VZ, first, count, W, bh, ti, srb, srh, srt, svb, svh, svt, sub, suh, sut,
        H: tl.constexpr, D: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr, TB: tl.constexpr,
    ):  # fmt: skip
        """TB value tokens [first + TB * ti, ...) (< first + count) of (row, head) `bh`: per token
        over groups of GV channels; channel c in byte c // PER, bit (c % PER) * BITS."""
        PER: tl.constexpr = 8 // BITS
        NGV: tl.constexpr = D // GV
        GVB: tl.constexpr = GV // PER
        levels: tl.constexpr = (1 << BITS) - 1
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        k = ti * TB + tl.arange(0, TB)  # [TB] token index in the batch
        ok = k < count
        tok = first + k
        gi = tl.arange(0, NGV)
        jb = tl.arange(0, GVB)
        s_ = tl.arange(0, PER)
        ch = (gi[None, :, None, None] * GVB + jb[None, None, :, None]) * PER + s_[None, None, None, :]
        ok4 = ok[:, None, None, None]
        ptr = RING + b * srb + h * srh + (tok % W)[:, None, None, None] * srt + ch
        x = tl.load(ptr, mask=ok4, other=0.0).to(tl.float32)  # [TB, NGV, GVB, PER]
        lo = tl.min(tl.min(x, 3), 2)  # [TB, NGV]
        hi = tl.max(tl.max(x, 3), 2)
        zero, scale, s = _quantize(x, lo, hi, BITS, VS.dtype.element_ty)
        y = tl.math.div_rn(
            x - zero.to(tl.float32)[:, :, None, None], tl.broadcast_to(s[:, :, None, None], x.shape)
        )
        qi = tl.minimum(tl.maximum(_round_half_even(y), 0.0), levels).to(tl.int32)
        packed = tl.sum(qi << (s_ * BITS)[None, None, None, :], 3)  # [TB, NGV, GVB]
        base = b * svb + h * svh + tok[:, None, None] * svt + gi[None, :, None] * GVB + jb[None, None, :]
        tl.store(VQ + base, packed.to(tl.uint8), mask=ok[:, None, None])
        sptr = b * sub + h * suh + tok[:, None] * sut + gi[None, :]
        tl.store(VS + sptr, scale, mask=ok[:, None])
        tl.store(VZ + sptr, zero, mask=ok[:, None])

    @triton.jit
    def _quant_kv(
        KR, KQ, KS, KZ, kfirst, groups, KW, skrb, skrh, skrt, skb, skh, skg, ssb, ssh, ssg,
        VR, VQ, VS, VZ, vfirst, count, VW, svrb, svrh, svrt, svb, svh, svt, sub, suh, sut,
        H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr,
        TB: tl.constexpr,
    ):  # fmt: skip
        """Program (bh, i) of one launch for both: key group `kfirst // G + i` (if i is below
        `groups`) and value tokens [vfirst + TB * i, ...) (if TB * i is below `count`) of (row,
        head) bh."""
        bh = tl.program_id(0)
        i = tl.program_id(1).to(tl.int64)
        if i < groups:
            _quant_key_group(
                KR, KQ, KS, KZ, kfirst, KW, bh, i, skrb, skrh, skrt, skb, skh, skg, ssb, ssh, ssg,
                H, D, G, BITS,
            )  # fmt: skip
        if i * TB < count:
            _quant_value_tile(
                VR, VQ, VS, VZ, vfirst, count, VW, bh, i, svrb, svrh, svrt, svb, svh, svt, sub, suh, sut,
                H, D, GV, BITS, TB,
            )  # fmt: skip


def quantize_from_rings(
    kring: torch.Tensor,
    kq: torch.Tensor,
    kscale: torch.Tensor,
    kzero: torch.Tensor,
    kfirst: int,
    kcount: int,
    vring: torch.Tensor,
    vq: torch.Tensor,
    vscale: torch.Tensor,
    vzero: torch.Tensor,
    vfirst: int,
    vcount: int,
    bits: int,
) -> None:
    """In one launch: quantise key tokens [kfirst, kfirst + kcount) of every (row, head)
    (multiples of G) from `kring` ([b, h, W + 1, d], token t in slot t % W: the layer's ring with
    its dump slot) into key groups kfirst // G ... of kq/kscale/kzero, and value tokens
    [vfirst, vfirst + vcount) from `vring` into vq/vscale/vzero at the same token indices."""
    b, h, kslots, d = kring.shape
    gbytes = kq.shape[-1]
    g = gbytes * 8 // bits
    tb = 32
    groups = max(kcount, 0) // g
    programs = max(groups, triton.cdiv(max(vcount, 0), tb))
    if programs <= 0 or b * h == 0:
        return
    assert kfirst % g == 0 and kcount % g == 0 and kring.stride(-1) == 1 and kq.stride(-1) == 1
    assert kq.stride(3) == gbytes and kscale.stride() == kzero.stride() and kscale.stride(-1) == 1
    assert vring.stride(-1) == 1 and vq.stride(-1) == 1 and vscale.stride() == vzero.stride()
    assert vscale.stride(-1) == 1
    _quant_kv[(b * h, programs)](
        kring, kq, kscale, kzero, kfirst, groups, kslots - 1,
        kring.stride(0), kring.stride(1), kring.stride(2), kq.stride(0), kq.stride(1), kq.stride(2),
        kscale.stride(0), kscale.stride(1), kscale.stride(2),
        vring, vq, vscale, vzero, vfirst, vcount, vring.shape[2] - 1,
        vring.stride(0), vring.stride(1), vring.stride(2), vq.stride(0), vq.stride(1), vq.stride(2),
        vscale.stride(0), vscale.stride(1), vscale.stride(2),
        H=h, D=d, G=g, GV=d // vscale.shape[-1], BITS=bits, TB=tb, num_warps=4,
    )  # fmt: skip
