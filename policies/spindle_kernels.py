"""Decode attention straight over SpindleKV's storage (Triton flash-decoding), and its float32 reference.

A compressed `SpindleLayer` holds, per (row, kv head), a book of vectors (`kbook`/`vbook`
[b, hk, C, d]) and per exposed head e (kv head in codebook mode, query head in evicted mode)
and token an index into it (`rk`, `rv` [b, e, s]); codebook layers add a magnitude per token
(`mk`, `mv`) and, with `rope_theta`, keys stored before RoPE and re-rotated by the token's
position (`pos` [b, e, s]). Token t of exposed head e has key
    rope(kbook[kv(e), rk[e, t]] * mk[e, t], pos[e, t])    (magnitude 1, no RoPE when absent)
and value vbook[kv(e), rv[e, t]] * mv[e, t]; the first `n[e]` tokens are stored.

`spindle_decode` computes one query per head over that, without building dense keys/values:
each program takes a range of one exposed head's tokens, gathers the book rows by index,
scales, rotates in registers, and keeps a running softmax (split over tokens, then a reduce).
Since RoPE is linear, rope(u * m) = m * rope(u): the key magnitude scales the score and the
value magnitude the probability, so no [tokens, d] product is formed.

Two kernels: `_shared_kernel` when several query heads read one index row (codebook layers
with GQA: the group's queries are one small matrix, the gathered keys are used once for all
of them), `_per_head_kernel` when each query head has its own index row (evicted layers, and
codebook layers without GQA).
"""

from __future__ import annotations

import math
import os

import torch

from pipeline.triton_gate import import_triton, interpreting, kernel_may_run, multiprocessors

triton, tl = import_triton()
HAVE_TRITON = triton is not None

LOG2E = 1.4426950408889634


def kernel_available(device: torch.device) -> bool:
    """Triton kernels run here (`pipeline.triton_gate`): a CUDA device, or CPU tensors under the
    interpreter when a test opts in (`CPU_INTERPRET = True`) and the interpreter took effect.

    KVPIPE_SPINDLE_KERNEL=0 turns the kernel off (the exact path over dense views).
    """
    if not HAVE_TRITON or os.environ.get("KVPIPE_SPINDLE_KERNEL", "1") == "0":
        return False
    return kernel_may_run(device, CPU_INTERPRET) and (device.type == "cuda" or interpreter_works())


CPU_INTERPRET = False


def interpreter_works() -> bool:
    """TRITON_INTERPRET=1 took effect: it must be set before triton is first imported in the process."""
    global _INTERPRETER_WORKS
    if _INTERPRETER_WORKS is None:
        _INTERPRETER_WORKS = False
        if HAVE_TRITON and interpreting():
            try:
                x = torch.ones(16)
                _probe_kernel[(1,)](x, N=16)
                _INTERPRETER_WORKS = bool(x.eq(0).all())
            except Exception:  # noqa: BLE001 - triton's own jit functions were built for the GPU
                pass
    return _INTERPRETER_WORKS


_INTERPRETER_WORKS: bool | None = None


ROPE_TABLE_POSITIONS = (
    1 << 20
)  # positions the decode tables cover (larger ones clamp: keep it above contexts)
_ROPE_TABLES: dict = {}


def rope_tables(d: int, theta: float, device, positions: int = ROPE_TABLE_POSITIONS) -> torch.Tensor:
    """float32 [128 + 2 * hrows, d/2]: cos(lo f), sin(lo f) for lo < 64, then cos(64 hi f), sin(64 hi f)
    for hi < hrows (angles in float64); the decode kernels rotate position 64 hi + lo by angle addition."""
    key = (d, float(theta), str(device), positions)
    t = _ROPE_TABLES.get(key)
    if t is None:
        f = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
        lo = torch.arange(64, dtype=torch.float64, device=device)[:, None] * f
        hi = torch.arange((positions + 63) // 64, dtype=torch.float64, device=device)[:, None] * 64 * f
        t = torch.cat([lo.cos(), lo.sin(), hi.cos(), hi.sin()]).float().contiguous()
        _ROPE_TABLES[key] = t
    return t


def inv_freq(d: int, theta: float, device) -> torch.Tensor:
    """RoPE frequencies [d/2] as `policies.spindlekv.rope` forms them (float64, then float32)."""
    return (1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))).float().to(device)


# -- the reference -----------------------------------------------------------------------------
def reference_decode(
    query: torch.Tensor,
    kbook: torch.Tensor,
    vbook: torch.Tensor,
    rk: torch.Tensor,
    rv: torch.Tensor | None,
    mk: torch.Tensor | None,
    mv: torch.Tensor | None,
    pos: torch.Tensor | None,
    n: torch.Tensor,
    scaling: float,
    rope_theta: float | None,
) -> torch.Tensor:
    """The fused computation in float32 with dense intermediates: query [b, H, d] -> [b, H, d]."""
    b, num_heads, d = query.shape
    hk = kbook.shape[1]
    e, s = rk.shape[1], rk.shape[2]
    kv_of_e = torch.arange(e, device=query.device) * hk // e  # exposed head -> kv head

    def rows(book, idx, mag):
        book_e = book.float()[:, kv_of_e]  # [b, e, C, d]
        ix = idx.long().clamp(min=0, max=book.shape[2] - 1)
        out = torch.gather(book_e, 2, ix[..., None].expand(b, e, s, d))
        return out if mag is None else out * mag.float()[..., None]

    keys = rows(kbook, rk, mk)
    values = rows(vbook, rk if rv is None else rv, mv)
    if rope_theta is not None:
        inv64 = 1.0 / (rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=query.device) / d))
        ang = pos.clamp(min=0).double()[..., None] * inv64  # as `policies.spindlekv.rope` forms them
        cos, sin = ang.cos().float(), ang.sin().float()
        k1, k2 = keys[..., : d // 2], keys[..., d // 2 :]
        keys = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    live = torch.arange(s, device=query.device) < n[..., None]  # [b, e, s]
    group = num_heads // e
    if group > 1:  # codebook layers with GQA: one token row serves the group's query heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        live = live.repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhsd->bhs", query.float() * scaling, keys).masked_fill(~live, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a head with no token attends to nothing
    return torch.einsum("bhs,bhsd->bhd", probs, values)


# -- the kernels -------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _probe_kernel(X, N: tl.constexpr):
        tl.store(X + tl.arange(0, N), tl.zeros([N], tl.float32))

    @triton.jit
    def _cos_sin(ang, FAST: tl.constexpr):
        """cos and sin of float32 angles; FAST: reduce to [-pi, pi] (Cody-Waite, 2 pi = 6.28125 + lo,
        exact products for |k| < 2**15) and use the multi-function unit (`cos/sin.approx.f32`,
        abs error ~1e-6 there) instead of libdevice's many-instruction sinf/cosf."""
        if FAST:
            k = tl.floor(ang * 0.15915494309189535 + 0.5)
            r = tl.fma(k, -6.28125, ang)
            r = tl.fma(k, -0.0019353071795864769, r)
            c = tl.inline_asm_elementwise(
                "cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1
            )
            s = tl.inline_asm_elementwise(
                "sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            c = tl.cos(ang)
            s = tl.sin(ang)
        return c, s

    @triton.jit
    def _table_cos_sin(T, p, dh, HALF: tl.constexpr, HROWS):
        """cos/sin of position p [n] times the frequencies from the tables of `rope_tables`:
        p = 64 hi + lo, cos(a + b) = cos a cos b - sin a sin b (float64-made tables, float32 sums)."""
        pi = tl.maximum(p, 0)
        hi = tl.minimum(pi >> 6, HROWS - 1).to(tl.int64)
        lo = (pi & 63).to(tl.int64)
        cl = tl.load(T + lo[:, None] * HALF + dh[None, :])
        sl = tl.load(T + (64 + lo)[:, None] * HALF + dh[None, :])
        ch = tl.load(T + (128 + hi)[:, None] * HALF + dh[None, :])
        sh = tl.load(T + (128 + HROWS + hi)[:, None] * HALF + dh[None, :])
        return ch * cl - sh * sl, sh * cl + ch * sl

    @triton.jit
    def _rotated(k1, k2, p, INV, inv, dh, HALF: tl.constexpr, HROWS, TABLE: tl.constexpr, FAST: tl.constexpr):
        """Key halves k1, k2 [n, HALF] rotated by their positions p [n] (rotate-half RoPE): cos/sin
        from the tables at INV (TABLE, `_table_cos_sin`) or of the angles p * inv (`_cos_sin`)."""
        if TABLE:
            c, s_ = _table_cos_sin(INV, p, dh, HALF, HROWS)
        else:
            ang = tl.maximum(p.to(tl.float32), 0.0)[:, None] * inv[None, :]
            c, s_ = _cos_sin(ang, FAST)
        return k1 * c - k2 * s_, k2 * c + k1 * s_

    @triton.jit
    def _fold_entry(cos, entry, valid, best, arg):
        """Fold a block's cosines into each lane's running (largest cosine, lowest entry reaching it):
        best / arg [BLOCK_N] (or a whole [GP, BLOCK_N] score tile), so a block costs no reduction
        across the program's threads (measured 2.5% faster than reducing every block: fused 4.80 ->
        4.67 ms, batch 109, 32K, H200); `_lanes_best` (`_tile_row_best`) reduces them once after the
        last block to the pair `best_match` gives (the largest cosine, the lowest entry among the
        lanes reaching it)."""
        cos = tl.where(valid, cos, -2.0)
        upd = (cos > best) | ((cos == best) & (entry < arg) & valid)
        return tl.where(upd, cos, best), tl.where(upd, entry, arg)

    @triton.jit
    def _lanes_best(best, arg):
        bm = tl.max(best, 0)
        return bm, tl.min(tl.where(best == bm, arg, 2147483647), 0)

    @triton.jit
    def _tile_row_best(best, arg, g, r: tl.constexpr):
        """`_lanes_best` of row r of [GP, N] tiles of running bests (`_fold_entry` on a whole tile)."""
        on = g[:, None] == r
        bm = tl.max(tl.max(tl.where(on, best, -3.0), 1), 0)
        return bm, tl.min(tl.min(tl.where(on & (best == bm), arg, 2147483647), 1), 0)

    @triton.jit
    def _mma_query(qrow, xk, g, dd, G: tl.constexpr, MATCH: tl.constexpr):
        """The query tile [GP, D] in the storage dtype: the group's G queries (rows < G; the scale is
        applied to the scores in float32), with MATCH the new key `xk` as row G, zeros below."""
        if MATCH:
            ptr = tl.where((g < G)[:, None], qrow[:, None] + dd[None, :], xk + dd[None, :])
            return tl.load(ptr, mask=(g <= G)[:, None], other=0.0)
        return tl.load(qrow[:, None] + dd[None, :], mask=(g < G)[:, None], other=0.0)

    @triton.jit
    def _shared_kernel(
        Q, KB, VB, RK, RV, MK, MV, POS, N, INV, PM, PL, PACC, XK, XV, RX, BEST, ARG,
        sq_b, sq_h, skb_b, skb_h, skb_c, svb_b, svb_h, svb_c,
        srk_b, srk_h, srv_b, srv_h, smk_b, smk_h, smv_b, smv_h, sp_b, sp_h, sn_b, sn_h,
        E, SPLITS, PSTRIDE, chunk, qscale, HROWS,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_MAG: tl.constexpr, HAS_ROPE: tl.constexpr, DOT_IEEE: tl.constexpr, FAST_TRIG: tl.constexpr,
        TABLE: tl.constexpr, MATCH: tl.constexpr, MMA: tl.constexpr, UNION: tl.constexpr,
    ):  # fmt: skip
        """One (row, kv head, token range): the G query heads of the kv head against its tokens.

        UNION (evicted layers): the tokens are the book rows themselves, in order, and RK holds each
        row's member bits (bit g: query head G * kv + g keeps it), so a row kept by several query
        heads is read once for all of them; a head skips the rows without its bit.

        MATCH: also the best book entry for a new key XK / value XV ([b, E, D], 1/norm RX [b, E, 2])
        among the entries these tokens read (every live entry is read by some token), as (cosine,
        entry) per split into BEST / ARG [b, E, 2, SPLITS]: the decode append's match, without a
        second pass over the books.

        MMA (half-precision storage, no RoPE): the gathered rows stay in the storage dtype and feed
        the tensor cores whole: scores are one product of the query tile (`_mma_query`) with the key
        rows, and P @ V another. With MATCH the new key is row G of the query tile and the new value
        row G + 1 of a tile of its own whose product with the value rows accumulates into the same
        scores, so rows G and G + 1 hold the raw dot products of the match (half x half products are
        exact in float32: times 1/|x| the float32 cosine up to summation order); the running bests
        are folded on the whole tile (`_fold_entry`; `_tile_row_best` reads the two rows after the
        last block: measured 4.66 -> 4.35 ms against folding extracted rows, batch 109, 32K,
        H200), and the two rows are zeroed like the padding rows before the softmax. Otherwise
        keys are float32 halves (rotated in registers with RoPE) and the match is element-wise
        float32 sums."""
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        split = tl.program_id(1)
        bi = (pid // E).to(tl.int64)
        ei = (pid % E).to(tl.int64)
        length = tl.load(N + bi * sn_b + ei * sn_h).to(tl.int32)
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        g = tl.arange(0, GP)
        gmask = g < G
        dh = tl.arange(0, HALF)
        dd = tl.arange(0, D)
        qrow = Q + bi * sq_b + (ei * G + g) * sq_h
        xrow = (bi * E + ei) * D
        if MMA:  # [GP, D] in the storage dtype; with MATCH the new key is row G (a free padding row)
            qt = _mma_query(qrow, XK + xrow, g, dd, G, MATCH)
            if MATCH:  # the new value as row G + 1 of a tile of its own (see above)
                xvt = tl.load(XV + xrow + g[:, None] * 0 + dd[None, :], mask=(g == G + 1)[:, None], other=0.0)
        else:
            q1 = tl.load(qrow[:, None] + dh[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
            q1 = q1 * qscale
            q2 = tl.load(qrow[:, None] + HALF + dh[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
            q2 = q2 * qscale
        if HAS_ROPE and not TABLE:
            inv = tl.load(INV + dh)
        else:
            inv = tl.zeros([HALF], tl.float32)  # (never read: tables, or no RoPE)
        if MATCH:
            if not MMA:
                xk1 = tl.load(XK + xrow + dh).to(tl.float32)
                xk2 = tl.load(XK + xrow + HALF + dh).to(tl.float32)
                xv = tl.load(XV + xrow + dd).to(tl.float32)
            rxk = tl.load(RX + (bi * E + ei) * 2)
            rxv = tl.load(RX + (bi * E + ei) * 2 + 1)
            if MMA:  # running bests on the score tile: row G keys, row G + 1 values
                best_t = tl.full([GP, BLOCK_N], -2.0, tl.float32)
                arg_t = tl.full([GP, BLOCK_N], 2147483647, tl.int32)
                rx_t = tl.where(g == G, rxk, rxv)
            else:
                best_k = tl.full([BLOCK_N], -2.0, tl.float32)
                arg_k = tl.full([BLOCK_N], 2147483647, tl.int32)
                best_v = best_k
                arg_v = arg_k
        m = tl.full([GP], float("-inf"), tl.float32)
        l_sum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        rk_row = RK + bi * srk_b + ei * srk_h
        rv_row = RV + bi * srv_b + ei * srv_h
        kb_head = KB + bi * skb_b + ei * skb_h
        vb_head = VB + bi * svb_b + ei * svb_h
        for t0 in range(start, end, BLOCK_N):
            offs = t0 + tl.arange(0, BLOCK_N)
            valid = offs < end
            if UNION:
                ik = offs.to(tl.int64)
                bits = tl.load(rk_row + offs, mask=valid, other=0).to(tl.int32)
                seen = valid[None, :] & (((bits[None, :] >> g[:, None]) & 1) != 0)
            else:
                ik = tl.load(rk_row + offs, mask=valid, other=0).to(tl.int64)
            krow = kb_head + ik * skb_c
            if UNION:
                iv = ik
            else:
                iv = tl.load(rv_row + offs, mask=valid, other=0).to(tl.int64)
            if MMA:
                k = tl.load(krow[:, None] + dd[None, :], mask=valid[:, None], other=0.0)
                sc = tl.dot(qt, tl.trans(k))
                if MATCH:
                    v = tl.load(vb_head + iv[:, None] * svb_c + dd[None, :], mask=valid[:, None], other=0.0)
                    sc = tl.dot(xvt, tl.trans(v), sc)
                    ent = tl.where((g == G)[:, None], ik.to(tl.int32)[None, :], iv.to(tl.int32)[None, :])
                    best_t, arg_t = _fold_entry(sc * rx_t[:, None], ent, valid[None, :], best_t, arg_t)
                    sc = tl.where((g < G)[:, None], sc, 0.0)
                sc = sc * qscale
            else:
                k1 = tl.load(krow[:, None] + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
                k2 = tl.load(krow[:, None] + HALF + dh[None, :], mask=valid[:, None], other=0.0)
                k2 = k2.to(tl.float32)
                if MATCH:  # against the stored (un-rotated) rows
                    ck = (tl.sum(k1 * xk1[None, :], 1) + tl.sum(k2 * xk2[None, :], 1)) * rxk
                    best_k, arg_k = _fold_entry(ck, ik.to(tl.int32), valid, best_k, arg_k)
                if HAS_ROPE:
                    p = tl.load(POS + bi * sp_b + ei * sp_h + offs, mask=valid, other=0)
                    k1, k2 = _rotated(k1, k2, p, INV, inv, dh, HALF, HROWS, TABLE, FAST_TRIG)
                if DOT_IEEE:
                    sc = tl.dot(q1, tl.trans(k1), input_precision="ieee")
                    sc += tl.dot(q2, tl.trans(k2), input_precision="ieee")
                else:
                    sc = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
            if HAS_MAG:
                mkt = tl.load(MK + bi * smk_b + ei * smk_h + offs, mask=valid, other=0.0).to(tl.float32)
                sc = sc * mkt[None, :]
            if UNION:
                sc = tl.where(seen, sc, float("-inf"))
            else:
                sc = tl.where(valid[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            if UNION:  # a head may see no row of a block yet: -inf - -inf would be NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_ref = m_new
            alpha = tl.exp2(m - m_ref)
            pr = tl.exp2(sc - m_ref[:, None])
            l_sum = l_sum * alpha + tl.sum(pr, 1)
            if not (MMA and MATCH):  # (loaded above for the match)
                v = tl.load(vb_head + iv[:, None] * svb_c + dd[None, :], mask=valid[:, None], other=0.0)
            if not MMA:
                v = v.to(tl.float32)
                if MATCH:
                    cv = tl.sum(v * xv[None, :], 1) * rxv
                    best_v, arg_v = _fold_entry(cv, iv.to(tl.int32), valid, best_v, arg_v)
            if HAS_MAG:
                mvt = tl.load(MV + bi * smv_b + ei * smv_h + offs, mask=valid, other=0.0).to(tl.float32)
                pr = pr * mvt[None, :]
            if MMA:  # probabilities rounded to the storage dtype, as flash attention does
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            elif DOT_IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr, v)
            m = m_new
        h = ei * G + g
        part = (bi * (E * G) + h) * PSTRIDE + split
        tl.store(PM + part, m, mask=gmask)
        tl.store(PL + part, l_sum, mask=gmask)
        tl.store(PACC + part[:, None] * D + dd[None, :], acc, mask=gmask[:, None])
        if MATCH and MMA:
            best_k, arg_k = _tile_row_best(best_t, arg_t, g, G)
            best_v, arg_v = _tile_row_best(best_t, arg_t, g, G + 1)
        elif MATCH:
            best_k, arg_k = _lanes_best(best_k, arg_k)
            best_v, arg_v = _lanes_best(best_v, arg_v)
        if MATCH:
            at = (bi * E + ei) * 2 * SPLITS + split
            tl.store(BEST + at, best_k)
            tl.store(ARG + at, arg_k)
            tl.store(BEST + at + SPLITS, best_v)
            tl.store(ARG + at + SPLITS, arg_v)

    @triton.jit
    def _per_head_kernel(
        Q, KB, VB, RK, RV, MK, MV, POS, N, INV, PM, PL, PACC,
        sq_b, sq_h, skb_b, skb_h, skb_c, svb_b, svb_h, svb_c,
        srk_b, srk_h, srv_b, srv_h, smk_b, smk_h, smv_b, smv_h, sp_b, sp_h, sn_b, sn_h,
        H, SPLITS, chunk, qscale, HROWS,
        G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_MAG: tl.constexpr, HAS_ROPE: tl.constexpr, FAST_TRIG: tl.constexpr, TABLE: tl.constexpr,
    ):  # fmt: skip
        """One (row, query head, token range): the head's own index row into its kv head's book."""
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        split = tl.program_id(1)
        bi = (pid // H).to(tl.int64)
        hi = (pid % H).to(tl.int64)
        kv = hi // G
        length = tl.load(N + bi * sn_b + hi * sn_h).to(tl.int32)
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        dh = tl.arange(0, HALF)
        dd = tl.arange(0, D)
        qrow = Q + bi * sq_b + hi * sq_h
        q1 = tl.load(qrow + dh).to(tl.float32) * qscale
        q2 = tl.load(qrow + HALF + dh).to(tl.float32) * qscale
        if HAS_ROPE and not TABLE:
            inv = tl.load(INV + dh)
        else:
            inv = tl.zeros([HALF], tl.float32)  # (never read: tables, or no RoPE)
        m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
        l_sum = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
        acc = tl.zeros([D], tl.float32)
        rk_row = RK + bi * srk_b + hi * srk_h
        rv_row = RV + bi * srv_b + hi * srv_h
        kb_head = KB + bi * skb_b + kv * skb_h
        vb_head = VB + bi * svb_b + kv * svb_h
        for t0 in range(start, end, BLOCK_N):
            offs = t0 + tl.arange(0, BLOCK_N)
            valid = offs < end
            ik = tl.load(rk_row + offs, mask=valid, other=0).to(tl.int64)
            krow = kb_head + ik * skb_c
            k1 = tl.load(krow[:, None] + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            k2 = tl.load(krow[:, None] + HALF + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            if HAS_ROPE:
                p = tl.load(POS + bi * sp_b + hi * sp_h + offs, mask=valid, other=0)
                k1, k2 = _rotated(k1, k2, p, INV, inv, dh, HALF, HROWS, TABLE, FAST_TRIG)
            sc = tl.sum(k1 * q1[None, :], 1) + tl.sum(k2 * q2[None, :], 1)
            if HAS_MAG:
                sc = sc * tl.load(MK + bi * smk_b + hi * smk_h + offs, mask=valid, other=0.0).to(tl.float32)
            sc = tl.where(valid, sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 0))
            alpha = tl.exp2(m - m_new)
            pr = tl.exp2(sc - m_new)
            l_sum = l_sum * alpha + tl.sum(pr, 0)
            iv = tl.load(rv_row + offs, mask=valid, other=0).to(tl.int64)
            v = tl.load(vb_head + iv[:, None] * svb_c + dd[None, :], mask=valid[:, None], other=0.0)
            if HAS_MAG:
                pr = pr * tl.load(MV + bi * smv_b + hi * smv_h + offs, mask=valid, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(pr[:, None] * v.to(tl.float32), 0)
            m = m_new
        part = (bi * H + hi) * SPLITS + split
        tl.store(PM + part, m)
        tl.store(PL + part, l_sum)
        tl.store(PACC + part * D + dd, acc)

    @triton.jit
    def _reduce_kernel(PM, PL, PACC, OUT, so_b, so_h, H, SPLITS, D: tl.constexpr, SP: tl.constexpr):
        """Combine one (row, query head)'s split partials: out = sum w_i acc_i / sum w_i l_i."""
        pid = tl.program_id(0)
        bi = pid // H
        hi = pid % H
        sp = tl.arange(0, SP)
        smask = sp < SPLITS
        dd = tl.arange(0, D)
        base = pid.to(tl.int64) * SPLITS
        pm = tl.load(PM + base + sp, mask=smask, other=float("-inf"))
        pl = tl.load(PL + base + sp, mask=smask, other=0.0)
        mx = tl.max(pm, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # no token at all: zeros, not NaN
        w = tl.exp2(pm - mx)
        den = tl.sum(w * pl, 0)
        acc = tl.load(PACC + (base + sp)[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)
        num = tl.sum(w[:, None] * acc, 0)
        out = num / tl.where(den > 0, den, 1.0)
        tl.store(OUT + bi.to(tl.int64) * so_b + hi * so_h + dd, out.to(OUT.dtype.element_ty))


_FAST_TRIG_OK = True  # cleared if the inline PTX for cos/sin.approx fails to compile


def plan_splits(
    programs: int, slots: int, block_n: int, device: torch.device, waves: int = 4, min_blocks: int = 1
):
    """(splits, chunk): enough programs for `waves` per multiprocessor, chunks a multiple of block_n
    (of at least `min_blocks` blocks where there are that many)."""
    blocks = max(1, math.ceil(slots / block_n))
    enough = math.ceil(waves * multiprocessors(device, on_cpu=2) / max(programs, 1))
    splits = max(1, min(blocks, math.ceil(blocks / min_blocks), enough))
    chunk = math.ceil(blocks / splits) * block_n
    return math.ceil(max(slots, 1) / chunk), chunk


def spindle_decode(
    query: torch.Tensor,
    kbook: torch.Tensor,
    vbook: torch.Tensor,
    rk: torch.Tensor,
    rv: torch.Tensor | None,
    mk: torch.Tensor | None,
    mv: torch.Tensor | None,
    pos: torch.Tensor | None,
    n: torch.Tensor,
    scaling: float,
    rope_theta: float | None,
    splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    out: torch.Tensor | None = None,
    fast_trig: bool | None = None,
    rope_mode: str | None = None,
    num_stages: int | None = None,
    mma: bool | None = None,
) -> torch.Tensor:
    """Attention of one query per head (query [b, H, d]) over the stored tokens; returns [b, H, d].

    Arguments as `reference_decode`. The exposed head count e (rk.shape[1]) is the kv head count
    (one index row per kv head, shared by its G query heads) or the query head count (one per
    query head, into kv head h // G). Books and per-token tensors may be views with any strides
    over their first three dims; their last dim must be contiguous. `out` ([b, H, d], query's
    dtype, last dim contiguous) receives the result when given. `rope_mode` picks how keys are
    rotated: "table" (default: cos/sin of 64 hi + lo from two small float64-made tables by angle
    addition, no trig per element), "fast" (the multi-function unit's cos/sin after range reduction
    of float32 angles) or "libdevice" (float32 angles, libdevice cos/sin); `fast_trig` True/False is
    the older spelling of "fast"/"libdevice". `mma`: the shared kernel's tensor-core path (see
    `mma_path`) when it applies (None, the default), never (False: the float32 path, for checks), or
    always (True: an error where it does not apply). `splits`, `block_n`, `num_warps`, `num_stages`
    override the launch's defaults.
    """
    if rope_mode is None:
        rope_mode = "table" if fast_trig is None else ("fast" if fast_trig else "libdevice")
    part = _partials(
        query, kbook, vbook, rk, rv, mk, mv, pos, n, scaling, rope_theta,
        splits=splits, block_n=block_n, num_warps=num_warps, rope_mode=rope_mode, num_stages=num_stages,
        mma=mma,
    )  # fmt: skip
    return reduce_partials(part, query.dtype, out)


def union_decode(
    query: torch.Tensor,
    kbook: torch.Tensor,
    vbook: torch.Tensor,
    member: torch.Tensor,
    n: torch.Tensor,
    scaling: float,
    out: torch.Tensor | None = None,
    **launch,
) -> torch.Tensor:
    """An evicted layer's decode attention read once per kv head (GQA): query [b, H, d] -> [b, H, d].

    The layer keeps per kv head the union of its query heads' tokens as book rows (kbook, vbook
    [b, hk, C, d], the first n [b, hk] live) and per query head indices into them. Reading each query
    head's rows through its indices reads a row kept by several heads several times; here each book
    row is read once for the group and member [b, hk, C] (an integer type wide enough for G bits;
    see `member_bits`) says which heads keep it: query head G * kv + g attends over the live rows
    with bit g set, which are exactly the rows its indices name (no head names a row twice).
    `launch`: splits, block_n, num_warps, num_stages, mma as for `spindle_decode`."""
    part = _partials(
        query, kbook, vbook, member, None, None, None, None, n, scaling, None, union=True, **launch
    )  # fmt: skip
    return reduce_partials(part, query.dtype, out)


def member_dtype(group: int) -> torch.dtype | None:
    """The narrowest integer type holding `group` member bits (None past 31: no union kernel)."""
    for dtype, bits in ((torch.uint8, 8), (torch.int16, 15), (torch.int32, 31)):
        if group <= bits:
            return dtype
    return None


def member_bits(index: torch.Tensor, n: torch.Tensor, rows: int, group: int) -> torch.Tensor:
    """Member bits [b, hk, rows] (`member_dtype(group)`) from per-query-head indices index [b, H, s]
    into the kv heads' book rows (the first n [b, H] live; query head h belongs to kv head h // G):
    bit g of row c is set when query head G * kv + g indexes c. Each head names a row at most once."""
    b, num_heads, s = index.shape
    hk = num_heads // group
    live = torch.arange(s, device=index.device) < n[..., None]
    at = torch.where(live, index.long(), rows).reshape(b, hk, group * s)  # dead slots: a spare column
    bit = (1 << torch.arange(group, device=index.device)).repeat(hk)  # query head h: 1 << (h % G)
    add = bit[None, :, None].expand(b, num_heads, s).reshape(b, hk, group * s)
    bits = torch.zeros((b, hk, rows + 1), dtype=torch.int64, device=index.device)
    bits.scatter_add_(2, at, add)  # distinct bits per row: the sum is their OR
    return bits[..., :rows].to(member_dtype(group))


def spindle_decode_match(
    query, kbook, vbook, rk, rv, mk, mv, pos, n, scaling, rope_theta, xk, xv, rx, **launch
) -> tuple[Partials, torch.Tensor, torch.Tensor]:
    """A codebook layer's decode attention over its stored tokens, and the decode append's match in
    the same pass (GQA codebook layers: rk.shape[1] == kbook.shape[1] < query heads).

    xk, xv [b, hk, d] (the new key, un-rotated when the book is, and value), rx [b, hk, 2] float32
    (their 1 / norms). Returns (partials with one free split slot, the last, for the caller's new
    token; best [b, hk, 2] float32, the largest cosine of key / value with a live book entry, -2
    when none; arg [b, hk, 2] int64, the lowest entry reaching it, 0 when none): what `best_match`
    gives for one token, up to the summation order of the cosine. On the tensor-core path
    (`mma_path`) xk and xv are read in the storage dtype (the decode append's are). `launch`:
    splits, block_n, num_warps, num_stages, mma as for `spindle_decode`."""
    part = match_partials(
        query, kbook, vbook, rk, rv, mk, mv, pos, n, scaling, rope_theta, xk, xv, rx, **launch
    )
    best, arg = part.best, part.arg  # [b, hk, 2, splits]
    top = best.max(dim=-1).values
    first = torch.where(best == top[..., None], arg, torch.full_like(arg, 2**31 - 1)).min(dim=-1).values
    return part, top, torch.where(top > -2.0, first, torch.zeros_like(first)).long()


def match_partials(
    query, kbook, vbook, rk, rv, mk, mv, pos, n, scaling, rope_theta, xk, xv, rx, **launch
) -> Partials:
    """`spindle_decode_match`'s one launch: the partials, and the match per split in best / arg
    [b, hk, 2, splits] (what a decode step's append reads: `spindle_append.matched_append`)."""
    return _partials(
        query, kbook, vbook, rk, rv, mk, mv, pos, n, scaling, rope_theta, match=(xk, xv, rx), **launch
    )  # fmt: skip


class Partials:
    """Split-K partial results of `_partials`: running max, sum and output per (row, head, split)."""

    def __init__(self, pm, pl, pacc, best=None, arg=None) -> None:
        self.pm, self.pl, self.pacc, self.best, self.arg = pm, pl, pacc, best, arg


def reduce_partials(part: Partials, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Combine the split partials into the attention output [b, H, d] (`dtype`, or into `out`)."""
    b, num_heads, slots, d = part.pacc.shape
    if out is None:
        out = torch.empty((b, num_heads, d), dtype=dtype, device=part.pacc.device)
    _reduce_kernel[(b * num_heads,)](
        part.pm, part.pl, part.pacc, out, out.stride(0), out.stride(1), num_heads, slots,
        D=d, SP=triton.next_power_of_2(slots), num_warps=4,
    )  # fmt: skip
    return out


def mma_path(dtype: torch.dtype, rope_theta: float | None) -> bool:
    """The shared kernel (GQA codebook layers) takes its tensor-core path: half-precision storage
    (query and books alike) and keys stored as attended (no RoPE re-rotation in the kernel)."""
    return rope_theta is None and dtype in (torch.bfloat16, torch.float16)


# The shared kernel's launch on its tensor-core path (Llama-8B decode shapes: G = 4 of GP = 16 rows,
# D = 128, bf16), the fastest of `check_spindle_decode --sweep` on an H200 (code 4c16208, batch 109,
# 32K tokens, 14.86 GB read; attention alone / with the fused match, ms):
#   block_n 128, 4 warps, 2 stages, >= 32 programs per SM (5 splits):  3.49 / 4.86   <- chosen
#   block_n 128, 4 warps, 2 stages, 4 per SM (1 split):                3.95 / 5.56
#   block_n 64, 4 warps, 2 stages, 32 per SM:                           4.06 / 6.73
#   block_n 64, 4 warps, 3 stages, 32 per SM (the reasoned guess):      5.15 / 6.36
#   block_n 128, 8 warps, 3 stages:                                     9.09 / 10.40
# the float32 path: 5.88 / 16.83; the separate match (best_match on both books) 3.00 more.
# Splits keep 8 blocks or more (their partials stay < 1% of what they read).
MMA_BLOCK_N, MMA_WARPS, MMA_STAGES, MMA_WAVES, MMA_MIN_BLOCKS = 128, 4, 2, 32, 8
# At SmolLM2's decode shapes (G = 3, D = 64) the check's sweep (`--shapes smollm2 --sweep --batches
# 683`, whose tokens read their entries in random order) favoured 64-token blocks and 3 stages for the
# fused match (5.20 vs 5.80 ms), but in the model, whose codebooks of random weights are read nearly in
# order, the launch above is much faster (`profile_decode --model smollm2 --batch 683`, 30 layers:
# 44.65 ms a step against 52.29 at 64 / 3 and 55.80 at 64 / 2): one launch serves both shapes.


def _partials(
    query, kbook, vbook, rk, rv, mk, mv, pos, n, scaling, rope_theta,
    splits=None, block_n=None, num_warps=None, rope_mode="table", match=None, num_stages=None, mma=None,
    union=False,
) -> Partials:  # fmt: skip
    """Launch the split kernel (see `spindle_decode`); with `match`, the fused match and a free slot;
    with `union`, rk holds member bits over the book rows (see `union_decode`)."""
    if not HAVE_TRITON:
        raise RuntimeError("spindle_decode needs triton")
    b, num_heads, d = query.shape
    hk, e, s = kbook.shape[1], rk.shape[1], rk.shape[2]
    if d % 2 or d & (d - 1) or num_heads % hk or e not in (hk, num_heads):
        raise ValueError(f"unsupported shapes: d={d}, heads={num_heads}, kv heads={hk}, exposed={e}")
    if union and not (e == hk < num_heads and rv is None and mk is None and rope_theta is None):
        raise ValueError("the union kernel reads one member row per kv head (GQA), plain book rows")
    for t in (query, kbook, vbook):
        if t.stride(-1) != 1:
            raise ValueError("the last dim of query and books must be contiguous")
    group = num_heads // hk
    rv = rk if rv is None else rv
    has_mag = mk is not None
    has_rope = rope_theta is not None
    mk_, mv_ = (mk, mv) if has_mag else (rk, rk)  # placeholders, never read
    pos_ = pos if has_rope else rk
    if rope_mode not in ("table", "fast", "libdevice"):
        raise ValueError(f"rope_mode {rope_mode!r}")
    table = has_rope and rope_mode == "table"
    hrows = 1
    if table:
        inv = rope_tables(d, rope_theta, query.device)
        hrows = (inv.shape[0] - 128) // 2
    else:
        inv = inv_freq(d, rope_theta, query.device) if has_rope else None
    shared = e == hk and group > 1
    if match is not None and not shared:
        raise ValueError("the fused match serves GQA codebook layers (one index row per kv head)")
    same = kbook.dtype == vbook.dtype == query.dtype
    use_mma = shared and mma is not False and same and mma_path(query.dtype, rope_theta)
    if mma and not use_mma:
        raise ValueError("the tensor-core path serves GQA codebook layers, half-precision storage, no RoPE")
    if block_n is None and use_mma:
        block_n = MMA_BLOCK_N
    elif block_n is None:  # the float32 paths': tuned on an H100 at Llama-8B shapes (check_spindle)
        block_n = 32 if shared else 64
    programs = b * e
    if splits is None and use_mma:
        splits, chunk = plan_splits(programs, s, block_n, query.device, MMA_WAVES, MMA_MIN_BLOCKS)
    elif splits is None:
        splits, chunk = plan_splits(programs, s, block_n, query.device, waves=4 if shared else 2)
    else:
        chunk = math.ceil(math.ceil(max(s, 1) / splits) / block_n) * block_n
    dev = query.device
    slots = splits + (match is not None)  # the free slot: the caller's new token
    pm = torch.empty((b, num_heads, slots), dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    if inv is None:
        inv = pm  # a placeholder, never read without RoPE
    pacc = torch.empty((b, num_heads, slots, d), dtype=torch.float32, device=dev)
    best = arg = None
    if match is not None:
        xk, xv, rx = match
        if use_mma:  # the new key is a row of the query tile: one dtype
            xk, xv = xk.to(query.dtype), xv.to(query.dtype)
        xk, xv, rx = xk.contiguous(), xv.contiguous(), rx.float().contiguous()
        best = torch.empty((b, hk, 2, splits), dtype=torch.float32, device=dev)
        arg = torch.empty((b, hk, 2, splits), dtype=torch.int32, device=dev)
    else:
        xk = xv = rx = best_ = arg_ = pm  # placeholders, never read
    qscale = scaling * LOG2E
    args = (
        query, kbook, vbook, rk, rv, mk_, mv_, pos_, n, inv, pm, pl, pacc,
        query.stride(0), query.stride(1),
        kbook.stride(0), kbook.stride(1), kbook.stride(2),
        vbook.stride(0), vbook.stride(1), vbook.stride(2),
        rk.stride(0), rk.stride(1), rv.stride(0), rv.stride(1),
        mk_.stride(0), mk_.stride(1), mv_.stride(0), mv_.stride(1),
        pos_.stride(0), pos_.stride(1), n.stride(0), n.stride(1),
    )  # fmt: skip
    for t in (rk, rv, mk_, mv_, pos_):
        if t.stride(2) != 1:
            raise ValueError("per-token tensors must be contiguous along tokens")
    global _FAST_TRIG_OK
    fast_trig = has_rope and rope_mode == "fast" and dev.type == "cuda" and _FAST_TRIG_OK
    if match is not None:
        best_, arg_ = best, arg
    if num_stages is None and use_mma:
        num_stages = MMA_STAGES
    stages = {} if num_stages is None else {"num_stages": num_stages}  # else triton's default

    def launch(fast: bool) -> None:
        if shared:  # GP >= 16 rows (the smallest MMA); the fused match's new key and value take rows G, G + 1
            gp = max(16, triton.next_power_of_2(group + 2 * (use_mma and match is not None)))  # + xk, xv
            _shared_kernel[(programs, splits)](
                *args[:13], xk, xv, rx, best_, arg_, *args[13:], e, splits, slots, chunk, qscale, hrows,
                G=group, GP=gp, D=d, BLOCK_N=block_n, HAS_MAG=has_mag, HAS_ROPE=has_rope,
                DOT_IEEE=query.dtype == torch.float32 and dev.type == "cuda", FAST_TRIG=fast, TABLE=table,
                MATCH=match is not None, MMA=use_mma, UNION=union, **stages,
                num_warps=num_warps or (MMA_WARPS if use_mma else 4),
            )  # fmt: skip
        else:
            _per_head_kernel[(programs, splits)](
                *args, num_heads, splits, chunk, qscale, hrows,
                G=group, D=d, BLOCK_N=block_n, HAS_MAG=has_mag, HAS_ROPE=has_rope, FAST_TRIG=fast,
                TABLE=table, num_warps=num_warps or 4, **stages,
            )  # fmt: skip

    if fast_trig:
        try:
            launch(True)
        except Exception:  # noqa: BLE001 - the inline PTX did not compile here: libdevice from now on
            _FAST_TRIG_OK = False
            launch(False)
    else:
        launch(False)
    return Partials(pm, pl, pacc, best, arg)


# -- prefill / append: similarity counts and best matches (codebook layers) ----------------------
# Cosine of tokens x_i, y_j is computed as (x_i . y_j) * rx_i * ry_j (rx = 1 / |x|, or 1 for unit
# rows): products of bf16 inputs are exact in float32, so tensor cores give the float32 cosine up to
# the accumulation order (the exact path, `unit @ unit.T` in float32, differs by ~1e-7).
if HAVE_TRITON:

    @triton.jit
    def _tile_rows(base, r_base, idx, n, stride, dd):
        """Rows idx of one sequence and their scales; zero rows of scale 0 past n."""
        ok = idx < n
        x = tl.load(base + idx[:, None].to(tl.int64) * stride + dd[None, :], mask=ok[:, None], other=0.0)
        return x, tl.load(r_base + idx, mask=ok, other=0.0)

    @triton.jit
    def _dot_t(x, y, DOT_IEEE: tl.constexpr):
        """x @ y.T, float32 products of float32 inputs where DOT_IEEE."""
        if DOT_IEEE:
            return tl.dot(x, tl.trans(y), input_precision="ieee")
        return tl.dot(x, tl.trans(y))

    @triton.jit
    def _count_kernel(
        X, Y, RX, RY, NX, NY, YOK, CNT,
        sx_p, sx_t, sy_p, sy_t, srx_p, sry_p, syok_p, scnt_p, theta,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, SKIP_DIAG: tl.constexpr,
        HAS_YOK: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):  # fmt: skip
        """CNT[p, i] = #{j < NY[p]: cos(x_i, y_j) > theta} (j != i with SKIP_DIAG, j < i with CAUSAL,
        YOK[p, j] with HAS_YOK) for i < NX[p]."""
        p = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1)
        nx = tl.load(NX + p).to(tl.int32)
        ny = tl.load(NY + p).to(tl.int32)
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < nx
        dd = tl.arange(0, D)
        x, rx = _tile_rows(X + p * sx_p, RX + p * srx_p, rows, nx, sx_t, dd)
        cnt = tl.zeros([BM], tl.int32)
        hi = ny
        if CAUSAL:
            hi = tl.minimum(ny, pid_m * BM + BM)
        if pid_m * BM < nx:
            for j0 in range(0, hi, BN):
                cols = j0 + tl.arange(0, BN)
                cmask = cols < ny
                y, ry = _tile_rows(Y + p * sy_p, RY + p * sry_p, cols, ny, sy_t, dd)
                s = _dot_t(x, y, DOT_IEEE) * rx[:, None] * ry[None, :]
                hit = (s > theta) & cmask[None, :]
                if HAS_YOK:
                    ok = tl.load(YOK + p * syok_p + cols, mask=cmask, other=0)
                    hit = hit & (ok != 0)[None, :]
                if SKIP_DIAG:
                    hit = hit & (rows[:, None] != cols[None, :])
                if CAUSAL:
                    hit = hit & (cols[None, :] < rows[:, None])
                cnt += tl.sum(hit.to(tl.int32), 1)
        tl.store(CNT + p * scnt_p + rows, cnt, mask=rmask)

    @triton.jit
    def _self_count_kernel(
        X, R, N, CNT, sx_p, sx_t, sr_p, scnt_p, theta, tiles,
        D: tl.constexpr, B: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):  # fmt: skip
        """CNT[p, i] += #{j != i, j < N[p]: cos(x_i, x_j) > theta} for i < N[p] (CNT zeroed first).

        The similarity is symmetric, so each pair of row tiles (I, J > I) is multiplied once: its
        row sums count for I's tokens (kept in registers), its column sums for J's (atomic adds).
        Program k takes row tiles k and tiles - 1 - k, whose products together number tiles + 1
        (balanced). Rows past N[p] load as zero vectors of scale 0: their cosine, 0, is never
        above theta (the caller keeps theta >= 0), so no tile but the loads needs a mask."""
        p = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        n = tl.load(N + p).to(tl.int32)
        used = tl.cdiv(n, B)  # this sequence's row tiles
        dd = tl.arange(0, D)
        x_base, r_base, c_base = X + p * sx_p, R + p * sr_p, CNT + p * scnt_p
        for half in tl.static_range(2):
            tile = k + half * (tiles - 1 - 2 * k)
            if (tile < used) & ((half == 0) | (tile != k)):
                rows = tile * B + tl.arange(0, B)
                x, rx = _tile_rows(x_base, r_base, rows, n, sx_t, dd)
                s = _dot_t(x, x, DOT_IEEE) * rx[:, None] * rx[None, :]
                cnt = tl.sum(((s > theta) & (rows[:, None] != rows[None, :])).to(tl.int32), 1)
                for j0 in range((tile + 1) * B, used * B, B):
                    cols = j0 + tl.arange(0, B)
                    y, ry = _tile_rows(x_base, r_base, cols, n, sx_t, dd)
                    hit = (_dot_t(x, y, DOT_IEEE) * rx[:, None] * ry[None, :] > theta).to(tl.int32)
                    cnt += tl.sum(hit, 1)
                    tl.atomic_add(c_base + cols, tl.sum(hit, 0), mask=cols < n, sem="relaxed")
                tl.atomic_add(c_base + rows, cnt, mask=rows < n, sem="relaxed")

    @triton.jit
    def _match_kernel(
        X, RX, B, NX, NB, BEST, ARG,
        sx_p, sx_t, srx_p, sb_p, sb_t, sbest_p, QB, chunk,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):  # fmt: skip
        """Over entries [split * chunk, +chunk) of book B[p] (first NB[p] live): per token i < NX[p] the
        largest cos(x_i, b_j) (b unit rows) and its first index; -2 and 0 when no entry is live."""
        p = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1)
        split = tl.program_id(2)
        nx = tl.load(NX + p).to(tl.int32)
        nb = tl.load(NB + p).to(tl.int32)
        rows = pid_m * BM + tl.arange(0, BM)
        dd = tl.arange(0, D)
        best = tl.full([BM], -2.0, tl.float32)
        arg = tl.zeros([BM], tl.int32)
        start = split * chunk
        end = tl.minimum(start + chunk, nb)
        if pid_m * BM < nx:
            x, rx = _tile_rows(X + p * sx_p, RX + p * srx_p, rows, nx, sx_t, dd)
            for j0 in range(start, end, BN):
                cols = j0 + tl.arange(0, BN)
                cmask = cols < end
                b = tl.load(
                    B + p * sb_p + cols[:, None].to(tl.int64) * sb_t + dd[None, :],
                    mask=cmask[:, None],
                    other=0.0,
                )
                s = tl.where(cmask[None, :], _dot_t(x, b, DOT_IEEE) * rx[:, None], -2.0)
                bm = tl.max(s, 1)
                am = tl.min(tl.where(s == bm[:, None], cols[None, :], 2147483647), 1)
                upd = bm > best
                best = tl.where(upd, bm, best)
                arg = tl.where(upd, am, arg)
        out = p * sbest_p + split * QB + rows
        tl.store(BEST + out, best, mask=rows < QB)
        tl.store(ARG + out, arg, mask=rows < QB)


def _dot_ieee(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cuda"


def pair_counts(
    x: torch.Tensor,
    y: torch.Tensor,
    rx: torch.Tensor,
    ry: torch.Tensor,
    nx: torch.Tensor,
    ny: torch.Tensor,
    theta: float,
    causal: bool = False,
    skip_diag: bool = False,
    y_ok: torch.Tensor | None = None,
) -> torch.Tensor:
    """[P, n] int32: per row i < nx[p] of x ([P, n, d]) the number of rows j < ny[p] of y ([P, m, d])
    with (x_i . y_j) rx_i ry_j > theta (see `_count_kernel` for causal / skip_diag / y_ok)."""
    P, n, d = x.shape
    cnt = torch.zeros((P, n), dtype=torch.int32, device=x.device)
    if P == 0 or n == 0 or y.shape[1] == 0:
        return cnt
    bm, bn = (64, 64) if x.device.type == "cuda" else (16, 16)
    ok = y_ok.to(torch.int8) if y_ok is not None else cnt
    rx, ry = rx.float().contiguous(), ry.float().contiguous()
    ok = ok.contiguous()
    _count_kernel[(P, triton.cdiv(n, bm))](
        x, y, rx, ry, nx.contiguous(), ny.contiguous(), ok, cnt,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), rx.stride(0), ry.stride(0), ok.stride(0),
        cnt.stride(0), float(theta),
        D=d, BM=bm, BN=bn, CAUSAL=causal, SKIP_DIAG=skip_diag, HAS_YOK=y_ok is not None,
        DOT_IEEE=_dot_ieee(x), num_warps=4,
    )  # fmt: skip
    return cnt


SELF_COUNT_LAUNCH = (128, 4, 2)  # (tile, warps, stages) on the GPU: 3.84 ms at 8 x 32K x 128 on an H200


def self_pair_counts(x: torch.Tensor, r: torch.Tensor, n: torch.Tensor, theta: float) -> torch.Tensor:
    """`pair_counts(x, x, r, r, n, n, theta, skip_diag=True)` with each pair multiplied once (half
    the products; theta >= 0)."""
    P, m, d = x.shape
    assert theta >= 0, "the symmetric count leaves rows past the length unmasked: theta must be >= 0"
    cnt = torch.zeros((P, m), dtype=torch.int32, device=x.device)
    if P == 0 or m == 0:
        return cnt
    tile, warps, stages = SELF_COUNT_LAUNCH if x.device.type == "cuda" else (16, 4, 1)
    tiles = triton.cdiv(m, tile)
    r = r.float().contiguous()
    _self_count_kernel[(P, triton.cdiv(tiles, 2))](
        x, r, n.contiguous(), cnt, x.stride(0), x.stride(1), r.stride(0), cnt.stride(0), float(theta), tiles,
        D=d, B=tile, DOT_IEEE=_dot_ieee(x), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return cnt


def best_match(
    x: torch.Tensor, rx: torch.Tensor, book: torch.Tensor, nx: torch.Tensor, nb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token i < nx[p] of x ([P, q, d], scale rx [P, q]): the largest cosine with the first nb[p]
    rows of `book` ([P, C, d], unit rows) and the first index reaching it ([P, q] float32, int64);
    -2 and 0 where no entry is live. Last dims contiguous."""
    P, q, d = x.shape
    C = book.shape[1]
    dev = x.device
    if P == 0 or q == 0 or C == 0:
        return torch.full((P, q), -2.0, device=dev), torch.zeros((P, q), dtype=torch.int64, device=dev)
    bm = 16 if q <= 16 or dev.type != "cuda" else 64
    bn = 64 if dev.type == "cuda" else 16
    qblocks = triton.cdiv(q, bm)
    splits, chunk = plan_splits(P * qblocks, C, bn, dev, waves=4)
    qb = qblocks * bm
    best = torch.empty((P, splits, qb), dtype=torch.float32, device=dev)
    arg = torch.empty((P, splits, qb), dtype=torch.int32, device=dev)
    rx = rx.float().contiguous()
    _match_kernel[(P, qblocks, splits)](
        x, rx, book, nx.contiguous(), nb.contiguous(), best, arg,
        x.stride(0), x.stride(1), rx.stride(0), book.stride(0), book.stride(1), best.stride(0), qb, chunk,
        D=d, BM=bm, BN=bn, DOT_IEEE=_dot_ieee(x), num_warps=4,
    )  # fmt: skip
    best, arg = best[..., :q], arg[..., :q]
    top = best.argmax(dim=1, keepdim=True)  # first split reaching the max: the lowest entries
    return best.gather(1, top)[:, 0], arg.gather(1, top)[:, 0].long()
