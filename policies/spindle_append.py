"""A SpindleKV decode token's writes in one launch each (Triton), for its two layer kinds.

At a large batch a decode step is a few long kernels and many tiny ones, and each tiny one costs a
few microseconds whatever it does. Written with torch ops, storing one token was about twenty
kernels per evicted layer (each buffer a scatter with its own index and mask) and about sixty per
codebook layer (the match's reduction over the splits, the entry decisions, four scatters, the new
token's softmax term), about 2000 kernels in a Llama-8B step. Each kernel here does one layer's
token in one launch, one program per (row, kv head): `profile_decode --layers 32 --batch 109
--policies spindlekv` on an H200, 43.01 -> 39.78 ms a step. They store exactly what the torch writes
stored (`SpindleLayer._decode_write`, still the path without the kernels; the codebook layer's
writes after the fused match are the reference in `tests/test_spindle_append.py`): a padding row's
token (position EMPTY) lands in each buffer's trash slot (its last) and its counts do not advance.

- `evicted_append`: an eviction layer's token: a new book row per kv head (key, value, member bits
  "every query head"), each query head's index of it and position, the counts.
- `matched_append`: a codebook layer's token after the fused match (`spindle_kernels._partials`
  with `match`): per book, the best entry over the splits; the token joins it when its cosine
  exceeds theta and opens an entry (its unit direction) otherwise; its index, magnitude and
  position; the counts; and its own softmax term in the partials' free slot.
"""

from __future__ import annotations

import torch

from pipeline.attention_math import EMPTY
from pipeline.triton_gate import import_triton

triton, tl = import_triton()

if triton is not None:

    @triton.jit
    def _program_token(POS, spos_b, HK, empty):
        """This program's (row, kv head), the row's token position and whether it is a token (not padding)."""
        pid = tl.program_id(0)
        bi = (pid // HK).to(tl.int64)
        pos = tl.load(POS + bi * spos_b)
        return bi, (pid % HK).to(tl.int64), pos, pos != empty

    @triton.jit
    def _evicted_kernel(
        K, V, POS, KB, VB, MB, RK, P, NB, NE, VBN,
        sk_b, sk_h, sv_b, sv_h, spos_b,
        skb_b, skb_h, skb_c, svb_b, svb_h, svb_c, smb_b, smb_h, srk_b, srk_h, sp_b, sp_h,
        snb_b, snb_h, sne_b, sne_h, svbn_b, svbn_h,
        HK, book_trash, token_trash, all_bits, empty,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, HAS_MB: tl.constexpr, SEP_VBN: tl.constexpr,
    ):  # fmt: skip
        bi, kv, pos, valid = _program_token(POS, spos_b, HK, empty)
        add = valid.to(tl.int64)
        count = tl.load(NB + bi * snb_b + kv * snb_h)
        row = tl.where(valid, count, book_trash)
        dd = tl.arange(0, D)
        tl.store(KB + bi * skb_b + kv * skb_h + row * skb_c + dd, tl.load(K + bi * sk_b + kv * sk_h + dd))
        tl.store(VB + bi * svb_b + kv * svb_h + row * svb_c + dd, tl.load(V + bi * sv_b + kv * sv_h + dd))
        if HAS_MB:
            tl.store(MB + bi * smb_b + kv * smb_h + row, all_bits)
        g = tl.arange(0, GP)
        gm = g < G
        head = kv * G + g
        n = tl.load(NE + bi * sne_b + head * sne_h, mask=gm, other=0)
        slot = tl.where(valid, n, token_trash)
        tl.store(RK + bi * srk_b + head * srk_h + slot, count + g * 0, mask=gm)  # each head indexes the row
        tl.store(P + bi * sp_b + head * sp_h + slot, pos.to(tl.int32) + g * 0, mask=gm)
        tl.store(NE + bi * sne_b + head * sne_h, n + add, mask=gm)
        tl.store(NB + bi * snb_b + kv * snb_h, count + add)
        if SEP_VBN:
            tl.store(VBN + bi * svbn_b + kv * svbn_h, count + add)

    @triton.jit
    def _book_token(
        BEST, ARG, at, SPLITS, SP: tl.constexpr, x, mag, valid, theta,
        CNT, cnt_at, BOOK, book_head, sbook_c, book_trash, R, M, tok_at, dd,
    ):  # fmt: skip
        """One book's part of `matched_append`: the entry decision and the writes; returns the token's
        stored vector (its entry times its stored magnitude, float32)."""
        s = tl.arange(0, SP)
        best = tl.load(BEST + at + s, mask=s < SPLITS, other=-3.0)
        top = tl.max(best, 0)
        first = tl.min(tl.where(best == top, tl.load(ARG + at + s, mask=s < SPLITS, other=0), 2147483647), 0)
        arg = tl.where(top > -2.0, first, 0).to(tl.int64)
        opens = valid & (top <= theta)
        count = tl.load(CNT + cnt_at)
        entry = tl.where(opens, count, arg)
        unit = (x / tl.maximum(mag, 1e-12)).to(BOOK.dtype.element_ty)
        tl.store(BOOK + book_head + tl.where(opens, count, book_trash) * sbook_c + dd, unit)
        tl.store(R + tok_at, entry)
        tl.store(M + tok_at, mag)
        tl.store(CNT + cnt_at, count + opens.to(tl.int64))
        joined = tl.load(BOOK + book_head + arg * sbook_c + dd).to(tl.float32)
        return tl.where(opens, unit.to(tl.float32), joined) * tl.load(M + tok_at).to(tl.float32)  # as stored

    @triton.jit
    def _matched_kernel(
        XK, XV, MAG, POS, Q, BEST, ARG, KB, VB, RK, RV, MK, MV, P, NK, NV, NE, PM, PL, PACC,
        sx_b, sx_h, sv_b, sv_h, spos_b, sq_b, sq_h,
        skb_b, skb_h, skb_c, svb_b, svb_h, svb_c, sr_b, sr_h, srv_b, srv_h, sm_b, sm_h, smv_b, smv_h,
        sp_b, sp_h, snk_b, snk_h, snv_b, snv_h, sne_b, sne_h,
        HK, SPLITS, SLOTS, book_trash_k, book_trash_v, token_trash, theta_k, theta_v, qscale, empty,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
    ):  # fmt: skip
        bi, kv, pos, valid = _program_token(POS, spos_b, HK, empty)
        n = tl.load(NE + bi * sne_b + kv * sne_h)
        slot = tl.where(valid, n, token_trash)
        dd = tl.arange(0, D)
        at = (bi * HK + kv) * 2 * SPLITS
        mag_at = (bi * HK + kv) * 2
        xk = tl.load(XK + bi * sx_b + kv * sx_h + dd).to(tl.float32)
        xv = tl.load(XV + bi * sv_b + kv * sv_h + dd).to(tl.float32)
        key = _book_token(
            BEST, ARG, at, SPLITS, SP, xk, tl.load(MAG + mag_at), valid, theta_k,
            NK, bi * snk_b + kv * snk_h, KB, bi * skb_b + kv * skb_h, skb_c, book_trash_k,
            RK, MK, bi * sr_b + kv * sr_h + slot, dd,
        )  # fmt: skip
        value = _book_token(
            BEST, ARG, at + SPLITS, SPLITS, SP, xv, tl.load(MAG + mag_at + 1), valid, theta_v,
            NV, bi * snv_b + kv * snv_h, VB, bi * svb_b + kv * svb_h, svb_c, book_trash_v,
            RV, MV, bi * srv_b + kv * srv_h + slot, dd,
        )  # fmt: skip
        tl.store(P + bi * sp_b + kv * sp_h + slot, pos.to(tl.int32))
        tl.store(NE + bi * sne_b + kv * sne_h, n + valid.to(tl.int64))
        # the token's own softmax term: the partials' last slot of each of the kv head's query heads
        g = tl.arange(0, GP)
        gm = g < G
        head = kv * G + g
        q = tl.load(Q + bi * sq_b + head[:, None] * sq_h + dd[None, :], mask=gm[:, None], other=0.0)
        score = tl.sum(q.to(tl.float32) * qscale * key[None, :], 1)
        part = (bi * HK * G + head) * SLOTS + SLOTS - 1
        tl.store(PM + part, tl.where(valid, score, float("-inf")), mask=gm)
        tl.store(PL + part, valid.to(tl.float32) + g * 0.0, mask=gm)
        tl.store(
            PACC + part[:, None] * D + dd[None, :], value[None, :] * valid.to(tl.float32), mask=gm[:, None]
        )


def _inner(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim (a kernel reads rows)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def evicted_append(bufs: dict, kbook_n, vbook_n, n, keys, values, positions) -> None:
    """Store one decode token per row in an eviction layer's buffers, as `SpindleLayer._decode_write`
    does: keys/values [b, hk, 1, d], positions [b, 1]; bufs holds kbook, vbook [b, hk, C, d], rk
    and _pos [b, e, N] and, for GQA, mb [b, hk, C] (else None); kbook_n [b, hk] and n [b, e] (int64)
    advance in place, vbook_n too when it is another tensor."""
    b, hk, _, d = keys.shape
    e = n.shape[1]
    group = e // hk
    k, v = _inner(keys[:, :, 0]), _inner(values[:, :, 0])
    kb, vb, rk, pos_buf, mb = bufs["kbook"], bufs["vbook"], bufs["rk"], bufs["_pos"], bufs.get("mb")
    mb_ = mb if mb is not None else kbook_n
    sep = vbook_n is not kbook_n
    vbn = vbook_n if sep else kbook_n
    _evicted_kernel[(b * hk,)](
        k, v, positions, kb, vb, mb_, rk, pos_buf, kbook_n, n, vbn,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), positions.stride(0),
        kb.stride(0), kb.stride(1), kb.stride(2), vb.stride(0), vb.stride(1), vb.stride(2),
        mb_.stride(0), mb_.stride(1), rk.stride(0), rk.stride(1), pos_buf.stride(0), pos_buf.stride(1),
        kbook_n.stride(0), kbook_n.stride(1), n.stride(0), n.stride(1), vbn.stride(0), vbn.stride(1),
        hk, kb.shape[2] - 1, rk.shape[2] - 1, (1 << group) - 1, EMPTY,
        G=group, GP=max(2, triton.next_power_of_2(group)), D=d, HAS_MB=mb is not None, SEP_VBN=sep,
        num_warps=1,
    )  # fmt: skip


def matched_append(
    bufs: dict, counts: tuple, n, x: tuple, mag, positions, query, part, thetas, scaling
) -> None:
    """Store one decode token per row in a codebook layer's buffers after the fused match, and its
    softmax term, as `SpindleLayer._write_matched` and `_new_token_term` do (no RoPE: the fused
    match's tensor-core path). bufs: kbook, vbook [b, hk, C, d], rk, rv, mk, mv, _pos [b, hk, N];
    counts (kbook_n, vbook_n) and n [b, hk] (int64) advance in place; x (key, value) [b, hk, d];
    mag [b, hk, 2] float32 (their norms); positions [b, 1]; query [b, H, 1, d]; part: the fused
    match's `Partials` (best, arg [b, hk, 2, splits]; the free slot, the last, is written);
    thetas (theta_k, theta_v)."""
    from policies.spindle_kernels import LOG2E

    b, hk, d = x[0].shape
    group = query.shape[1] // hk
    xk, xv = _inner(x[0]), _inner(x[1])
    q = _inner(query[:, :, 0])
    kb, vb, pos_buf = bufs["kbook"], bufs["vbook"], bufs["_pos"]
    rk, rv, mk, mv = bufs["rk"], bufs["rv"], bufs["mk"], bufs["mv"]
    nk, nv = counts
    splits, slots = part.best.shape[-1], part.pm.shape[-1]
    mag = mag.float().contiguous()
    _matched_kernel[(b * hk,)](
        xk, xv, mag, positions, q, part.best, part.arg, kb, vb, rk, rv, mk, mv, pos_buf, nk, nv, n,
        part.pm, part.pl, part.pacc,
        xk.stride(0), xk.stride(1), xv.stride(0), xv.stride(1), positions.stride(0), q.stride(0), q.stride(1),
        kb.stride(0), kb.stride(1), kb.stride(2), vb.stride(0), vb.stride(1), vb.stride(2),
        rk.stride(0), rk.stride(1), rv.stride(0), rv.stride(1), mk.stride(0), mk.stride(1),
        mv.stride(0), mv.stride(1), pos_buf.stride(0), pos_buf.stride(1),
        nk.stride(0), nk.stride(1), nv.stride(0), nv.stride(1), n.stride(0), n.stride(1),
        hk, splits, slots, kb.shape[2] - 1, vb.shape[2] - 1, rk.shape[2] - 1,
        float(thetas[0]), float(thetas[1]), scaling * LOG2E, EMPTY,
        G=group, GP=max(2, triton.next_power_of_2(group)), D=d, SP=max(2, triton.next_power_of_2(splits)),
        num_warps=1,
    )  # fmt: skip
