"""Static-shape decode attention: one query token per row over fixed-capacity slot buffers.

A graph-captured decode step must not depend on host-side slot counts: the layer's keys and
values are its whole `SlotBuffer`s ([b, h_kv, capacity, d]), and how many slots are in use is
read on the device (`last`: a 1-element int64 tensor, the slot the new token was written to;
slots 0..last are attended, those after are spare capacity and never read). Slots whose
position is EMPTY (left padding, ragged heads) are masked when `positions` is given.

`static_decode_attention` is split-K flash-decoding in Triton: grid (b * h_kv, splits), a split
is a chunk of one (row, kv head)'s slots; each program reads its keys and values once for all
`group` query heads of the kv head (GQA folding), keeps an online softmax and writes a partial
output with its log-sum-exp; a second kernel merges the splits. The grid is sized from the
capacity (a host number fixed for the life of the buffers), so one launch configuration serves
every step; splits past `last` exit at once. `static_decode_torch` computes the same function
with torch ops (no host read either; the path where Triton cannot run), and
`static_decode_reference` in float32 one (row, head) at a time, for the tests.
"""

from __future__ import annotations

import functools

import torch

from pipeline.attention_math import EMPTY
from pipeline.triton_gate import (
    import_triton,
    interpreting,
    kernel_may_run,
    multiprocessors,
    triton_available,
)

tl = None  # triton.language, imported by `_kernels` at first use

LOG2E = 1.4426950408889634
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3

# Tests set this to run the kernel on CPU tensors under Triton's interpreter; the pipeline never
# does (`pipeline.triton_gate`).
CPU_INTERPRET = False


def usable(query: torch.Tensor) -> bool:
    """Whether the Triton kernel can serve this call (else `static_decode_torch`)."""
    if not (triton_available() and kernel_may_run(query.device, CPU_INTERPRET)):
        return False
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    d = query.shape[-1]
    return 16 <= d <= 256 and d & (d - 1) == 0


def _partial_kernel(
    Q,
    K,
    V,
    P,
    LAST,
    PO,
    PL,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_pb,
    stride_ph,
    h_kv,
    splits,
    chunk,
    scale_log2,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_EMPTY: tl.constexpr,
    IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = (bh // h_kv).to(tl.int64)  # b * stride_kb passes int32 at large batch x capacity
    kh = (bh % h_kv).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    q = tl.load(
        Q + b * stride_qb + (kh * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None],
        other=0.0,
    )
    n = tl.load(LAST).to(tl.int32) + 1  # slots in use, read on the device
    start = sp * chunk
    end = tl.minimum(start + chunk, n)
    k_ptr = K + b * stride_kb + kh * stride_kh
    v_ptr = V + b * stride_vb + kh * stride_vh
    p_ptr = P + b * stride_pb + kh * stride_ph
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        idx = n0 + offs_n
        ok = idx < end
        if HAS_EMPTY:
            pos = tl.load(p_ptr + idx, mask=ok, other=-1)
            ok = ok & (pos != -1)
        k = tl.load(k_ptr + idx[:, None] * stride_ks + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + idx[:, None] * stride_vs + offs_d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of EMPTY slots only
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0.0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (bh * splits + sp) * G + offs_g
    tl.store(PO + row[:, None] * D + offs_d[None, :], out, mask=g_ok[:, None])
    tl.store(PL + row, lse, mask=g_ok)


# The merge of the splits' partials, shared with `policies.ragged_kernels` (`reduce_kernel`):
# partial row (bh * splits + s) * G + g holds split s of query head g of (row, kv head) bh.
def _reduce_kernel(PO, PL, OUT, splits, G: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)  # = (b * h_kv + kv head) * G + g = b * H + query head
    bh = pid // G
    g = pid % G
    offs_d = tl.arange(0, D)
    # running max and denominator kept as [D] vectors (equal lanes): loop-carried tensors
    m = tl.full([D], float("-inf"), dtype=tl.float32)
    den = tl.zeros([D], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    for s in range(0, splits):
        row = (bh * splits + s) * G + g
        lse = tl.load(PL + row)
        o = tl.load(PO + row * D + offs_d)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        acc = acc * w_old + o * w
        den = den * w_old + w
        m = m_new
    out = tl.where(den > 0.0, acc / tl.where(den > 0.0, den, 1.0), 0.0)
    tl.store(OUT + pid * D + offs_d, out.to(OUT.dtype.element_ty))


@functools.lru_cache(maxsize=4)
def _kernels(interpret: bool):
    del interpret  # the cache key (jit reads TRITON_INTERPRET itself)
    global tl
    triton, tl = import_triton()
    return (
        triton.jit(_partial_kernel, do_not_specialize=["splits", "chunk"]),
        triton.jit(_reduce_kernel, do_not_specialize=["splits"]),
    )


def reduce_kernel(interpret: bool):
    """The jitted merge of split partials (`_reduce_kernel`; grid b * H, one program a query head)."""
    return _kernels(interpret)[1]


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def split_tokens(total: int, device: torch.device, block_n: int = BLOCK_N) -> int:
    """Tokens per split of a split-K decode over `total` tokens: about 8 programs per
    multiprocessor, a power of two in 2 * block_n..4096 (`policies.ragged_kernels` too)."""
    sms = multiprocessors(device, on_cpu=8)
    return min(4096, max(2 * block_n, next_pow2(-(-total // (8 * sms)))))


def split_size(rows_heads: int, capacity: int, device: torch.device) -> int:
    """Slots per split over the whole buffer (`split_tokens` of rows_heads * capacity slots)."""
    return split_tokens(rows_heads * capacity, device)


def static_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor | None,
    last: torch.Tensor,
    scaling: float,
    chunk: int | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Decode attention [b, H, d] of query [b, H, d] over slots 0..last of keys/values [b, h, cap, d].

    `last`: 1-element int64 tensor on the device (the slot of the new token); `positions`
    [b, h, cap] int32 when some slot may be EMPTY (masked), else None. keys/values may have any
    strides with unit stride on d. A (row, head) with no filled slot gets zeros.
    """
    b, num_heads, d = query.shape
    h, cap = keys.shape[1], keys.shape[2]
    group = num_heads // h
    if query.stride(-1) != 1:
        query = query.contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("keys/values need unit stride on the head dimension")
    chunk = chunk or split_size(b * h, cap, query.device)
    splits = max(1, -(-cap // chunk))
    partial_out = torch.empty((b * h, splits, group, d), dtype=torch.float32, device=query.device)
    partial_lse = torch.empty((b * h, splits, group), dtype=torch.float32, device=query.device)
    out = torch.empty((b, num_heads, d), dtype=query.dtype, device=query.device)
    mask = positions is not None
    pos = positions if mask else last  # never read without HAS_EMPTY
    partial_kernel, reduce_kernel = _kernels(interpreting())
    partial_kernel[(b * h, splits)](
        query,
        keys,
        values,
        pos,
        last,
        partial_out,
        partial_lse,
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        positions.stride(0) if mask else 0,
        positions.stride(1) if mask else 0,
        h,
        splits,
        chunk,
        scaling * LOG2E,
        G=group,
        BLOCK_G=max(16, next_pow2(group)),
        D=d,
        BLOCK_N=BLOCK_N,
        HAS_EMPTY=mask,
        IEEE=query.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    reduce_kernel[(b * num_heads,)](partial_out, partial_lse, out, splits, G=group, D=d, num_warps=1)
    return out


def static_decode_torch(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor | None,
    last: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """`static_decode_attention`'s function with torch ops over the whole capacity (no host read)."""
    b, num_heads, d = query.shape
    h, cap = keys.shape[1], keys.shape[2]
    group = num_heads // h
    valid = torch.arange(cap, device=keys.device) <= last  # [cap]
    valid = valid.expand(b, h, cap)
    if positions is not None:
        valid = valid & (positions != EMPTY)
    # spare slots hold whatever memory held: zero them, so that 0 * NaN cannot leak in
    k = torch.where(valid[..., None], keys, 0).float()
    v = torch.where(valid[..., None], values, 0).float()
    q = query.float().reshape(b, h, group, d)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, k) * scaling
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a head with no slot: zeros
    out = torch.einsum("bhgs,bhsd->bhgd", weights, v)
    return out.reshape(b, num_heads, values.shape[-1]).to(query.dtype)


def static_decode_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor | None,
    last: int,
    scaling: float,
) -> torch.Tensor:
    """The kernel's function in float32 plain torch, one (row, kv head) at a time: [b, H, d]."""
    b, num_heads, d = query.shape
    h = keys.shape[1]
    group = num_heads // h
    out = torch.zeros((b, num_heads, values.shape[-1]), dtype=torch.float32, device=query.device)
    for row in range(b):
        for head in range(h):
            keep = torch.ones(last + 1, dtype=torch.bool, device=keys.device)
            if positions is not None:
                keep = positions[row, head, : last + 1] != EMPTY
            k = keys[row, head, : last + 1][keep].float()
            v = values[row, head, : last + 1][keep].float()
            if k.shape[0] == 0:
                continue
            q = query[row, head * group : (head + 1) * group].float()
            weights = torch.softmax(q @ k.T * scaling, dim=-1)
            out[row, head * group : (head + 1) * group] = weights @ v
    return out


def static_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor | None,
    last: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The Triton kernel where it can run, else the torch form: [b, H, d]."""
    if usable(query):
        return static_decode_attention(query, keys, values, positions, last, scaling)
    return static_decode_torch(query, keys, values, positions, last, scaling)
