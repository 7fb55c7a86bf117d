"""KIVI 2-bit decode attention over whole quantised blocks: a CUDA C++ kernel (tensor-core fragments).

The Triton kernel (`policies.kivi_kernels`) reached about 1 TB/s over the packed bytes: Triton
builds every matrix-product operand through shared memory or register shuffles, so per token and
channel it spent ~5 instructions, a third of them moving registers. This kernel de-quantises
straight into the registers where `mma.sync.m16n8k16` wants its operands: ~2.2 instructions per
token and channel. One warp is one program.

One warp takes one (row, kv head, split) and walks its blocks of 128 tokens whose keys and
values are all quantised (the tail: residual rings, a partial block, stays with the Triton tail
kernel; the Triton merge kernel combines the splits, so the partial outputs have its layout).
Notation: lane = 4 * g + t (g = lane / 4, t = lane % 4, as in the PTX fragment tables).

- Scores are computed transposed, S^T [16 tokens x 8 heads] = K [16 x 16 channels] Q^T: the
  query heads of the kv head (GROUP <= 8) are the n axis, so the query fragment is loaded once.
  Row rho of m-tile mt is block token 16 * (rho % 8) + 2 * mt + rho / 8: lane g's rows are tokens
  16g .. 16g + 15, which are bytes 4 (g % 2) .. 4 (g % 2) + 3 of key group g / 2 (a key byte
  packs 4 consecutive tokens of one channel): one 32-bit word per channel gives a lane every key
  it needs for the block, and one scale pair serves all of them.
- Probabilities go from the score fragment (rows tokens, cols heads) to the value product's B
  operand (k tokens, n heads) by one `movmatrix.trans` per 8 x 8 half.
- Outputs are computed transposed too, O^T [16 channels x 8 heads] += V^T [16 x 16 tokens] P^T:
  lane g holds channels (D / 8) g .. (D / 8) (g + 1) - 1, i.e. D / 32 consecutive bytes of each
  token's packed value (a value byte packs 4 consecutive channels), and lane t the 32 tokens
  32t .. 32t + 31 of the block (k index 2t, 2t+1, 2t+8, 2t+9 of m-tile mt are tokens 32t + 2mt,
  32t + 16 + 2mt, +1, +1).
- De-quantisation, x = s v + z: a byte permute pairs the two halves an operand register needs
  (two channels of a key token, or one channel of two value tokens); one shift (shared by two
  fields) and one LOP3 put a 2-bit integer v into a bfloat16 mantissa under exponent 2 (4 + v or
  4 + v / 4, exact); one packed FMA gives s v (s e - 4 s, or 4 s e - 16 s: exact for v <= 2,
  within 3 s / 512 for v = 3). The zero points never meet the integers: they are matrix products
  of their own, beta [key group, head] = Z_k Q^T (added to the scores of the group's tokens) and
  gamma [value group, head] += Z_v^T P^T (added to the outputs of the group's channels), a few
  extra `mma`s per block instead of one more instruction per token and channel, and more exact
  than rounding s v + z (the reference's float32 de-quantisation, against which the GPU checks
  measure 4e-3 relative error, the Triton kernel's 3e-3).
- Memory: each warp stages its next block in shared memory with `cp.async` (no registers hold
  data in flight, so 12 warps fit an SM at 168 registers): the keys are copied during the value
  product of the block before, the values during the key product of their own block. Value rows
  and key scale rows are padded so that the lanes of one load hit distinct banks.
- The online softmax keeps one maximum per head per block (three shuffles) and per-lane partial
  sums, reduced once at the end.

Figures (H200, Llama-8B shapes, 32K tokens, one layer, `python -m pipeline.bench.check_kivi
--quick`): batch 150 1.41 ms (2.7 TB/s over the packed bytes and scales; copy bandwidth 4.2 TB/s),
batch 75 0.73 ms, against 3.85 / 1.94 ms for the Triton kernel in the same run. Versions measured
on the way (same machine, batch 150): registers only, loads issued just before use, 1.87 ms
(latency-bound: IPC ~1.7); registers software-pipelined (229 registers, 8 warps per SM) 2.21 ms;
shared-memory staging 1.41 ms with the zero-point products and two-field shifts (2282
instructions per block per lane, from 2715).

The kernel is compiled at first use by NVRTC (`pipeline.cuda_rtc`) for the device's architecture
(sm_80 or newer: bfloat16 `mma.sync`, `movmatrix`, `cp.async`), per head_dim (64 or 128), GQA
group and value group.
"""

from __future__ import annotations

import functools
import math

import torch

from pipeline import cuda_rtc

BLOCK = 128  # tokens a warp takes per iteration (every key group and value token quantised)

# The CUDA source. HEAD_DIM, GROUP (query heads per kv head, <= 8), GV (value channels per
# scale) and MIN_WARPS (launch bound: warps per SM the register budget must allow) are defined
# at compile time.
SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

#define D HEAD_DIM
#define KSTEPS (D / 16)        /* 16-channel steps of the key product */
#define CTILES (D / 16)        /* 16-channel m-tiles of the value product */
#define CPL (D / 8)            /* value channels a lane holds */
#define FULL 0xffffffffu
/* strides within a (row, kv head), fixed by the store's layout (checked by the caller) */
#define SKG (D * 8)            /* key group: D channels x 8 bytes */
#define SSG D                  /* key scales / zeros of a group */
#define SVT (D / 4)            /* value token: D 2-bit channels */
#define SUT (D / GV)           /* value scales / zeros of a token */
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

__device__ __forceinline__ u32 bfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ u32 transpose8x8(u32 x) {
    u32 d;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(x));
    return d;
}

__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* read-only loads (the non-coherent cache path); the compiler folds constant offsets into them */
__device__ __forceinline__ u32 load_u32(const void* p) { return __ldg((const unsigned int*)p); }
__device__ __forceinline__ u32 load_u16(const void* p) { return __ldg((const unsigned short*)p); }

__device__ __forceinline__ void store_f32x4(float* p, float a, float b, float c, float d) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

__device__ __forceinline__ void mma_bf16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* The 2-bit integer v at field s (bits 2s, 2s+1) of byte jb of each 16-bit half of y, as a
   bfloat16 under exponent 2 (0x4080) in that half: fields s = 0, 2 land in mantissa bits 3-4
   (the number 4 + v / 4), fields 1, 3 in bits 5-6 (4 + v), so that one shift serves two fields
   (y << 3, y >> 1, y >> 5, y >> 9). jb and s are compile-time constants once the loops are
   unrolled; `low` / `high` are the masks of bits 3-4 / 5-6 of both halves, `four` 0x40804080. */
__device__ __forceinline__ u32 int2_as_bf16(u32 y, int jb, int s, u32 low, u32 high, u32 four) {
    const int sh = 8 * jb + 4 * (s >> 1) - 3;
    const u32 x = sh >= 0 ? (y >> (unsigned)sh) : (y << (unsigned)(-sh));
    u32 d;  /* (x & mask) | four in one LOP3: the constants come in registers (two immediates
               would take two instructions) */
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "r"(s & 1 ? high : low), "r"(four));
    return d;
}

/* Byte pairs of two words: lo = [a.b0, a.b1, b.b0, b.b1], hi = [a.b2, a.b3, b.b2, b.b3]: byte jb
   of each half of lo (hi) is byte jb (jb + 2) of a in the low half and of b in the high half. */
__device__ __forceinline__ u32 pair_lo(u32 a, u32 b) { return prmt(a, b, 0x5410u); }
__device__ __forceinline__ u32 pair_hi(u32 a, u32 b) { return prmt(a, b, 0x7632u); }

#define NEG4 0xC080C080u   /* bfloat16 -4.0, both halves */
#define NEG0 0x80008000u   /* bfloat16 -0.0, both halves */

#define FOUR 0x40804080u  /* bfloat16 4.0, both halves */
#define NEG16 0xC180C180u  /* bfloat16 -16.0, both halves */

/* s v from e = 4 + v (odd fields): s e - 4 s; from e = 4 + v / 4 (even fields): 4 s e - 16 s.
   Exact for v <= 2, within 3 s / 512 for v = 3 (the zero points are added by their own matrix
   products, see the module docstring). A scale pair's four factors, each exact: */
struct Scale {
    u32 s, m4s, s4, m16s;
};
__device__ __forceinline__ Scale scale_of(u32 s) {
    return Scale{s, bfma2(s, NEG4, NEG0), bfma2(s, FOUR, NEG0), bfma2(s, NEG16, NEG0)};
}
__device__ __forceinline__ u32 scaled(u32 e, const Scale& k, int field) {
    return field & 1 ? bfma2(e, k.s, k.m4s) : bfma2(e, k.s4, k.m16s);
}

/* acc += A B with A de-quantised from packed pairs: fields f, f + 1 of byte jb of u0 (rows of the
   first k-half, scale pair k0) and of u1 (the second k-half, k1) are A's four registers; B is
   `b`. The key product (A = keys, B = the query) and the value product (A = values, B = the
   probabilities) both take this form. */
__device__ __forceinline__ void mma_packed(float* acc, u32 u0, u32 u1, int jb, int f, const Scale& k0,
                                           const Scale& k1, const u32* b, u32 low, u32 high, u32 four) {
    const u32 a0 = scaled(int2_as_bf16(u0, jb, f, low, high, four), k0, f);
    const u32 a1 = scaled(int2_as_bf16(u0, jb, f + 1, low, high, four), k0, f + 1);
    const u32 a2 = scaled(int2_as_bf16(u1, jb, f, low, high, four), k1, f);
    const u32 a3 = scaled(int2_as_bf16(u1, jb, f + 1, low, high, four), k1, f + 1);
    mma_bf16(acc, a0, a1, a2, a3, b[0], b[1]);
}

/* -- staging a block in shared memory ------------------------------------------------------
   Each warp stages its next block's bytes with cp.async (no registers hold data in flight): the
   keys are copied while the value product of the block before runs, the values while the key
   product of their own block runs. Per warp: K payload (4 groups x D channels x 8 bytes), K
   scales and zeros (a row of D per group), V payload (128 tokens x D / 4 bytes), V scales and
   zeros (D / GV per token). Rows are padded where the lanes of one load would otherwise hit one
   bank: a key scale row by 16 bytes (the 4 groups of a load then take 4 banks each), and every
   32 value tokens by one token's row (a load's lanes read tokens 32 apart). */
#define VROW SVT                     /* bytes of one token's packed value */
#define SCB ((D / GV) * 2)           /* bytes of one token's value scales */
#define KSROW (2 * D + 16)           /* a key group's scales, padded */
#define KPAY (4 * D * 8)
#define KSC (4 * KSROW)
#define VPAY (132 * VROW)            /* 128 tokens and 4 pad rows */
#define VSC (132 * SCB)
#define OFF_KS KPAY
#define OFF_KZ (OFF_KS + KSC)
#define OFF_VP (OFF_KZ + KSC)
#define OFF_VS (OFF_VP + VPAY)
#define OFF_VZ (OFF_VS + VSC)
#define STAGE_BYTES (OFF_VZ + VSC)

__device__ __forceinline__ void cp_async(u32 dst, const void* src, int bytes) {
    if (bytes == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
    else if (bytes == 8)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(dst), "l"(src) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
/* wait until at most one group (the newest) is in flight, then make every lane's copies visible */
__device__ __forceinline__ void cp_wait_all_but_newest() {
    asm volatile("cp.async.wait_group 1;" ::: "memory");
    __syncwarp();
}

/* this warp's copies of one block's keys (kq at the block's first group, ks / kz at its scales) */
__device__ __forceinline__ void stage_keys(u32 base, int lane, const u8* kq, const u16* ks, const u16* kz) {
#pragma unroll
    for (int j = 0; j < KPAY / 16 / 32; ++j) {
        const int i = lane + 32 * j;
        cp_async(base + 16 * i, kq + 16 * i, 16);
    }
#pragma unroll
    for (int j = 0; j < 4 * 2 * D / 16 / 32; ++j) {
        const int i = lane + 32 * j, row = i / (2 * D / 16), col = i % (2 * D / 16);
        cp_async(base + OFF_KS + row * KSROW + 16 * col, (const u8*)ks + 16 * i, 16);
        cp_async(base + OFF_KZ + row * KSROW + 16 * col, (const u8*)kz + 16 * i, 16);
    }
}

/* this warp's copies of one block's values (vq / vs / vz at the block's first token) */
__device__ __forceinline__ void stage_values(u32 base, int lane, const u8* vq, const u16* vs, const u16* vz) {
#pragma unroll
    for (int j = 0; j < 128 * VROW / 16 / 32; ++j) {
        const int i = lane + 32 * j, tok = i / (VROW / 16), col = i % (VROW / 16);
        cp_async(base + OFF_VP + VROW * (tok + (tok >> 5)) + 16 * col, vq + 16 * i, 16);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int tok = lane + 32 * j;
        cp_async(base + OFF_VS + SCB * (tok + (tok >> 5)), (const u8*)vs + SCB * tok, SCB);
        cp_async(base + OFF_VZ + SCB * (tok + (tok >> 5)), (const u8*)vz + SCB * tok, SCB);
    }
}

__device__ __forceinline__ u32 lds32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ u32 lds16(u32 addr) {
    unsigned short v;
    asm volatile("ld.shared.b16 %0, [%1];" : "=h"(v) : "r"(addr) : "memory");
    return (u32)v;
}

extern "C" __global__ void __launch_bounds__(32, MIN_WARPS) kivi2_decode_blocks(
    const u16* __restrict__ Q, const i64* __restrict__ N, const i64* __restrict__ NK,
    const i64* __restrict__ NV, const u8* __restrict__ KQ, const u16* __restrict__ KS,
    const u16* __restrict__ KZ, const u8* __restrict__ VQ, const u16* __restrict__ VS,
    const u16* __restrict__ VZ, float* __restrict__ OP, float* __restrict__ MP,
    float* __restrict__ LP, int H, int sqb, int sqh, int skb, int skh, int ssb, int ssh, int svb,
    int svh, int sub, int suh, int per_split, int num_parts, int rows, double qk_scale_d)
{
    const int lane = threadIdx.x;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, split = blockIdx.y;
    const i64 b = bh / H, h = bh % H;
    const int n = (int)N[bh];
    const int quant_end = min(n, min((int)NK[bh], (int)NV[bh])) / 128 * 128;
    const int lo = split * per_split;
    const int hi = min(lo + per_split, quant_end);
    const float qs = (float)qk_scale_d;
    /* LOP3 operands held in registers: the compiler cannot fold them into immediates (opaque asm) */
    u32 low, high, four;
    asm volatile("mov.b32 %0, 0x00180018;" : "=r"(low));
    asm volatile("mov.b32 %0, 0x00600060;" : "=r"(high));
    asm volatile("mov.b32 %0, 0x40804080;" : "=r"(four));

    /* the query as the B operand of the key product: head g, channels 16kk + 2t (+1), +8 (+9) */
    u32 qf[KSTEPS][2];
    const u16* qrow = Q + b * sqb + (h * GROUP + g) * (i64)sqh;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        qf[kk][0] = g < GROUP ? *(const u32*)(qrow + 16 * kk + 2 * t) : 0u;
        qf[kk][1] = g < GROUP ? *(const u32*)(qrow + 16 * kk + 2 * t + 8) : 0u;
    }
    /* this warp's pointers at the split's first block, advanced by one block per iteration */
    const u8* kq = KQ + b * skb + h * skh + (i64)(lo / 32) * SKG;
    const u16* ks = KS + b * ssb + h * ssh + (i64)(lo / 32) * SSG;
    const u16* kz = KZ + b * ssb + h * ssh + (i64)(lo / 32) * SSG;
    const u8* vq = VQ + b * svb + h * svh + (i64)lo * SVT;
    const u16* vs = VS + b * sub + h * suh + (i64)lo * SUT;
    const u16* vz = VZ + b * sub + h * suh + (i64)lo * SUT;
    extern __shared__ __align__(16) unsigned char stage[];
    const u32 base = (u32)__cvta_generic_to_shared(stage);
    /* this lane's reads within a staged block: key words of group g / 2, channel 2t, bytes
       4 (g % 2)..; value bytes (D / 32) g.. of tokens 32t + 2mt + {0, 16, 1, 17} and the scale of
       their channel group CPL g / GV */
    const u32 kword = base + (g >> 1) * (D * 8) + 16 * t + 4 * (g & 1);
    const u32 kscale = base + OFF_KS + (g >> 1) * KSROW + 4 * t;
    /* tokens 32t + j sit in padded row 33t + j */
    const u32 vword = base + OFF_VP + VROW * 33 * t + (D / 32) * g;
    const u32 vscale = base + OFF_VS + SCB * 33 * t + 2 * ((CPL * g) / GV);
    const u32 kzero = base + OFF_KZ + g * KSROW + 4 * t;  /* lanes g < 4: key group g's zeros */
    const u32 vzero = base + OFF_VZ + SCB * 33 * t + 2 * g;  /* lanes g < D / GV: group g's */

    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;  /* heads 2t, 2t+1 */
    float o[CTILES][4], gamma[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ct = 0; ct < CTILES; ++ct) o[ct][0] = o[ct][1] = o[ct][2] = o[ct][3] = 0.f;

    if (lo < hi) {
        stage_keys(base, lane, kq, ks, kz);
        cp_commit();
        stage_values(base, lane, vq, vs, vz);
        cp_commit();
    }
    for (int start = lo; start < hi; start += 128) {
        cp_wait_all_but_newest();  /* this block's keys (its values may still be in flight) */
        float s[8][4], beta[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int mt = 0; mt < 8; ++mt) s[mt][0] = s[mt][1] = s[mt][2] = s[mt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const u32 w = kword + 16 * kk * 8, sc = kscale + 16 * kk * 2;
            const u32 w0 = lds32(w), w1 = lds32(w + 8), w2 = lds32(w + 64), w3 = lds32(w + 72);
            const u32 s0 = lds32(sc), s1 = lds32(sc + 16);
            const Scale k0 = scale_of(s0), k1 = scale_of(s1);
            /* beta [key group g, head] += zero points x query: rows are the block's 4 groups */
            const u32 zr = kzero + 16 * kk * 2;
            const u32 r0 = g < 4 ? lds32(zr) : 0u, r1 = g < 4 ? lds32(zr + 16) : 0u;
            mma_bf16(beta, r0, 0u, r1, 0u, qf[kk][0], qf[kk][1]);
            const u32 y0[2] = {pair_lo(w0, w1), pair_hi(w0, w1)};
            const u32 y1[2] = {pair_lo(w2, w3), pair_hi(w2, w3)};
#pragma unroll
            for (int mt = 0; mt < 8; ++mt) {
                const int byte = mt >> 1, jb = byte & 1, f = 2 * (mt & 1);
                mma_packed(s[mt], y0[byte >> 1], y1[byte >> 1], jb, f, k0, k1, qf[kk], low, high, four);
            }
        }
        /* every lane is done with this block's keys: the next block's go into their place */
        __syncwarp();
        kq += 4 * SKG;
        ks += 4 * SSG;
        kz += 4 * SSG;
        if (start + 128 < hi) stage_keys(base, lane, kq, ks, kz);
        cp_commit();
        /* this lane's tokens are in key group g / 2: their zero-point term, from the lane that
           holds that group's row of beta */
        const int kgroup_lane = (g >> 1) * 4 + t;
        const float ba = __shfl_sync(FULL, beta[0], kgroup_lane);
        const float bb = __shfl_sync(FULL, beta[1], kgroup_lane);
        /* online softmax: one maximum per head over the block's 128 tokens */
        float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
        for (int mt = 0; mt < 8; ++mt) {
            mx_a = fmaxf(mx_a, fmaxf(s[mt][0], s[mt][2]));
            mx_b = fmaxf(mx_b, fmaxf(s[mt][1], s[mt][3]));
        }
        mx_a += ba;
        mx_b += bb;
#pragma unroll
        for (int x = 4; x < 32; x <<= 1) {
            mx_a = fmaxf(mx_a, __shfl_xor_sync(FULL, mx_a, x));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(FULL, mx_b, x));
        }
        const float mn_a = fmaxf(m_a, mx_a * qs), mn_b = fmaxf(m_b, mx_b * qs);
        const float al_a = exp2_approx(m_a - mn_a), al_b = exp2_approx(m_b - mn_b);
        m_a = mn_a;
        m_b = mn_b;
        l_a *= al_a;
        l_b *= al_b;
#pragma unroll
        for (int ct = 0; ct < CTILES; ++ct) {
            o[ct][0] *= al_a;
            o[ct][2] *= al_a;
            o[ct][1] *= al_b;
            o[ct][3] *= al_b;
        }
        gamma[0] *= al_a;
        gamma[1] *= al_b;
        const float ca = fmaf(ba, qs, -mn_a), cb = fmaf(bb, qs, -mn_b);  /* (s + beta) qs - m */
        u32 pb[8][2];
#pragma unroll
        for (int mt = 0; mt < 8; ++mt) {
            const float p0 = exp2_approx(fmaf(s[mt][0], qs, ca));
            const float p1 = exp2_approx(fmaf(s[mt][1], qs, cb));
            const float p2 = exp2_approx(fmaf(s[mt][2], qs, ca));
            const float p3 = exp2_approx(fmaf(s[mt][3], qs, cb));
            l_a += p0 + p2;
            l_b += p1 + p3;
            pb[mt][0] = transpose8x8(pack_bf16(p0, p1));
            pb[mt][1] = transpose8x8(pack_bf16(p2, p3));
        }
        cp_wait_all_but_newest();  /* this block's values (the next block's keys may be in flight) */
        /* values: k-step mt is the score m-tile mt; its tokens for this lane: T0, T0 + 16 (k 2t,
           2t+1) and T0 + 1, T0 + 17 (k 2t+8, 2t+9), T0 = 32t + 2mt */
#pragma unroll
        for (int mt = 0; mt < 8; ++mt) {
            u32 word[4], sc[4], ze[4];
            const int offs[4] = {0, 16, 1, 17};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = 2 * mt + offs[i];  /* + 33t: in the lane's addresses */
                word[i] = D == 128 ? lds32(vword + VROW * row) : lds16(vword + VROW * row);
                sc[i] = lds16(vscale + SCB * row);
                ze[i] = g < D / GV ? lds16(vzero + SCB * row) : 0u;
            }
            const u32 sa = sc[0] | (sc[1] << 16), sb = sc[2] | (sc[3] << 16);
            const Scale ka = scale_of(sa), kb = scale_of(sb);
            /* gamma [value group g, head] += zero points x probabilities */
            mma_bf16(gamma, ze[0] | (ze[1] << 16), 0u, ze[2] | (ze[3] << 16), 0u, pb[mt][0], pb[mt][1]);
            const u32 ya[2] = {pair_lo(word[0], word[1]), pair_hi(word[0], word[1])};
            const u32 yb[2] = {pair_lo(word[2], word[3]), pair_hi(word[2], word[3])};
#pragma unroll
            for (int ct = 0; ct < CTILES; ++ct) {
                const int byte = ct >> 1, jb = byte & 1, f = 2 * (ct & 1);
                mma_packed(o[ct], ya[byte >> 1], yb[byte >> 1], jb, f, ka, kb, pb[mt], low, high, four);
            }
        }
        /* every lane is done with this block's values: the next block's go into their place */
        __syncwarp();
        vq += 128 * SVT;
        vs += 128 * SUT;
        vz += 128 * SUT;
        if (start + 128 < hi) stage_values(base, lane, vq, vs, vz);
        cp_commit();
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    /* the value zero points' term of this lane's channel group */
    const int vgroup_lane = ((CPL * g) / GV) * 4 + t;
    const float ga = __shfl_sync(FULL, gamma[0], vgroup_lane);
    const float gb = __shfl_sync(FULL, gamma[1], vgroup_lane);
#pragma unroll
    for (int ct = 0; ct < CTILES; ++ct) {
        o[ct][0] += ga;
        o[ct][2] += ga;
        o[ct][1] += gb;
        o[ct][3] += gb;
    }
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) {
        l_a += __shfl_xor_sync(FULL, l_a, x);
        l_b += __shfl_xor_sync(FULL, l_b, x);
    }
    /* partial output: lane (g, t) holds channels CPL g + 2ct (+1) of heads 2t, 2t+1 */
    const i64 part = (i64)bh * num_parts + split;
    float* op = OP + part * rows * D + CPL * g;
    const int ha = 2 * t, hb = 2 * t + 1;
#pragma unroll
    for (int ct = 0; ct < CTILES; ct += 2) {
        if (ha < GROUP)
            store_f32x4(op + ha * D + 2 * ct, o[ct][0], o[ct][2], o[ct + 1][0], o[ct + 1][2]);
        if (hb < GROUP)
            store_f32x4(op + hb * D + 2 * ct, o[ct][1], o[ct][3], o[ct + 1][1], o[ct + 1][3]);
    }
    if (g == 0) {
        if (ha < GROUP) {
            MP[part * rows + ha] = m_a;
            LP[part * rows + ha] = l_a;
        }
        if (hb < GROUP) {
            MP[part * rows + hb] = m_b;
            LP[part * rows + hb] = l_b;
        }
    }
}
"""

KERNEL = "kivi2_decode_blocks"
MIN_WARPS = 12  # register budget: warps per SM the launch bound asks room for (12: 168 each)


def supported(
    query: torch.Tensor, head_dim: int, group: int, bits: int, key_group: int, value_group: int
) -> bool:
    """Shapes and dtypes this kernel serves (else the Triton kernel does)."""
    return (
        query.is_cuda
        and query.dtype == torch.bfloat16
        and bits == 2
        and key_group == 32
        and head_dim in (64, 128)
        and value_group % (head_dim // 8) == 0  # a lane's channels share one value scale
        and head_dim % value_group == 0
        and 1 <= group <= 8
        and cuda_rtc.available(query.device)
    )


@functools.cache
def _compiled(device_index: int, head_dim: int, group: int, value_group: int, options: tuple):
    (min_warps,) = options
    defines = dict(HEAD_DIM=head_dim, GROUP=group, GV=value_group, MIN_WARPS=min_warps)
    return cuda_rtc.compile_kernel(SOURCE, KERNEL, device_index, defines)


def compiled_for(query: torch.Tensor, head_dim: int, group: int, value_group: int):
    """The kernel for these shapes on the query's device with the module's options (MIN_WARPS,
    read now), compiled at its first call."""
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    return _compiled(index, head_dim, group, value_group, (MIN_WARPS,))


def stage_bytes(head_dim: int, value_group: int) -> int:
    """Shared memory a warp stages one block in (SOURCE's STAGE_BYTES)."""
    vrow, scb = head_dim // 4, head_dim // value_group * 2
    return 4 * head_dim * 8 + 2 * 4 * (2 * head_dim + 16) + 132 * vrow + 2 * 132 * scb


def aligned(store) -> bool:
    """The store's tensors start and step (per row and kv head) where the kernel's asynchronous
    copies need them: 16 bytes for keys and value bytes, one token's scales for value scales."""
    scb = store.vscale.shape[-1] * store.vscale.element_size()

    def ok(t: torch.Tensor, unit: int) -> bool:
        steps = (t.stride(0) * t.element_size(), t.stride(1) * t.element_size())
        return t.data_ptr() % unit == 0 and all(x % unit == 0 for x in steps)

    return (
        all(ok(t, 16) for t in (store.kq, store.kscale, store.kzero, store.vq))
        and ok(store.vscale, scb)
        and ok(store.vzero, scb)
    )


def decode_blocks(
    query: torch.Tensor,
    store,
    o_part: torch.Tensor,
    m_part: torch.Tensor,
    l_part: torch.Tensor,
    *,
    per_split: int,
    num_splits: int,
    num_parts: int,
    scaling: float,
) -> None:
    """Partial attention of every (row, kv head, split) over its whole quantised blocks of 128
    tokens into parts [bh * num_parts + split] of o_part [parts, rows, d], m_part / l_part
    [parts, rows] (float32; the layout of `kivi_kernels`' merge kernel). `per_split` is a multiple
    of 128; splits that hold no whole block write an empty part (m = -inf, l = 0)."""
    b, num_heads, _, d = query.shape
    h = store.n.shape[1]
    group = num_heads // h
    gv = d // store.vscale.shape[-1]
    assert per_split % BLOCK == 0 and query.stride(-1) == 1
    kq, ks, kz, vq, vs, vz = store.kq, store.kscale, store.kzero, store.vq, store.vscale, store.vzero
    assert kq.stride(-1) == 1 and kq.stride(3) == kq.shape[4] == 8
    assert ks.stride() == kz.stride() and vs.stride() == vz.stride() and ks.stride(-1) == vs.stride(-1) == 1
    assert kq.stride(2) == d * 8 and ks.stride(2) == d and vq.stride(2) == d // 4 and vs.stride(2) == d // gv
    assert vq.stride(-1) == 1 and o_part.is_contiguous() and m_part.is_contiguous() and l_part.is_contiguous()
    kernel = compiled_for(query, d, group, gv)
    args = [
        query, store.n, store.nk, store.nv, kq, ks, kz, vq, vs, vz, o_part, m_part, l_part,
        h, query.stride(0), query.stride(1),
        kq.stride(0), kq.stride(1), ks.stride(0), ks.stride(1),
        vq.stride(0), vq.stride(1), vs.stride(0), vs.stride(1),
        per_split, num_parts, o_part.shape[1], float(scaling * math.log2(math.e)),
    ]  # fmt: skip
    for x in args[:10]:
        assert x.is_cuda and x.device == query.device
    assert store.n.dtype == store.nk.dtype == store.nv.dtype == torch.int64
    with torch.cuda.device(query.device):
        kernel(grid=(b * h, num_splits, 1), block=(32, 1, 1), args=args, shared_mem=stage_bytes(d, gv))
