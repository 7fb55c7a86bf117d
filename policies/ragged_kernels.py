"""Decode attention over a ragged per-head KV store (AdaKV's `RaggedKVLayer`), without padding.

The store: compressed tokens flattened ([N, d] keys and values), each (row, kv head)'s segment
back to back in (row, head) order, located by `seg_offsets` / `seg_lens` ([b * h]); plus a
dense tail ([b, h, t, d], possibly a strided view of a buffer with spare capacity) holding
the tokens appended since the last compression. A decode query (one per row) sees every
stored token, so no causal mask is needed; tail slots may be EMPTY only when a padded batch
wrote them, and `tail_positions` masks those.

`ragged_decode_attention` is flash-decoding in Triton: grid (b * h, splits); a split is a
chunk of one (row, head)'s segment or of its tail. Each program reads its chunk's keys and
values once for all `group` query heads of that kv head (GQA), keeps an online softmax, and
writes a partial output and its log-sum-exp; a second kernel merges the splits. Splits past
a segment's end exit at once, so the grid is sized from host numbers cached at compression
(the longest segment), never from a device read. In a static (CUDA-graph) decode step the
tail's length is read on the device too (`tail_used`) and its splits cover its capacity.

`ragged_decode_reference` computes the same function in float32 with plain torch, one
(row, head) at a time: the kernel's tests and the GPU check compare with it.
"""

from __future__ import annotations

import functools

import torch

from pipeline.decode_kernels import next_pow2, reduce_kernel, split_tokens
from pipeline.kv_cache import EMPTY
from pipeline.triton_gate import import_triton, interpreting, kernel_may_run, triton_available

tl = None  # triton.language, imported by `_kernels` at first use (importing triton is slow)

LOG2E = 1.4426950408889634
BLOCK_N = 64  # tokens per inner tile
NUM_WARPS = 4
NUM_STAGES = 3


# Tests set this to run the decode kernel on CPU tensors under Triton's interpreter; the
# pipeline never does (`pipeline.triton_gate`).
CPU_INTERPRET = False


def usable(query: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernel can serve this call (else the caller takes its exact torch path)."""
    return usable_on(query.device, query.dtype, head_dim)


def usable_on(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel can serve queries of `dtype` on `device` at this head size."""
    if not (triton_available() and kernel_may_run(device, CPU_INTERPRET)):
        return False
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


# The kernels are plain functions here, made Triton kernels by `_kernels` at first use, so
# that importing this module does not import triton. They live at module level because
# Triton's interpreter patches `tl` in the function's globals. (The interpreter needs
# TRITON_INTERPRET=1 before triton is first imported: triton.language's own helpers are
# jit functions made when it is.)
def _partial_kernel(
    Q,
    FK,
    FV,
    OFF,
    LEN,
    TK,
    TV,
    TP,
    TUSED,
    PO,
    PL,
    stride_qb,
    stride_qh,
    stride_tkb,
    stride_tkh,
    stride_tvb,
    stride_tvh,
    stride_tpb,
    stride_tph,
    h_kv,
    tail_len,
    flat_splits,
    total_splits,
    chunk,
    scale_log2,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_MASK: tl.constexpr,
    DEVICE_TAIL: tl.constexpr,
    IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    if DEVICE_TAIL:  # a static step: the tail's length is the slot just written + 1, on the device
        tail_len = (tl.load(TUSED) + 1).to(tl.int32)
    sp = tl.program_id(1)
    b = (bh // h_kv).to(tl.int64)  # tail strides of a long uncompressed prompt pass int32
    kh = bh % h_kv
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    q = tl.load(
        Q + b * stride_qb + (kh * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    # this split is a chunk of the (row, head)'s flat segment, or of its dense tail; both have
    # rows of D contiguous elements, so one loop serves both (one pipelined loop, no branch)
    is_flat = sp < flat_splits
    seg_len = tl.load(LEN + bh)
    base = tl.load(OFF + bh)  # int64
    start_f = sp * chunk
    start_t = (sp - flat_splits) * chunk
    start = tl.where(is_flat, start_f, start_t)
    end = tl.where(is_flat, tl.minimum(start_f + chunk, seg_len), tl.minimum(start_t + chunk, tail_len))
    k_ptr = tl.where(is_flat, FK + base * D, TK + b * stride_tkb + kh * stride_tkh)
    v_ptr = tl.where(is_flat, FV + base * D, TV + b * stride_tvb + kh * stride_tvh)
    p_ptr = TP + b * stride_tpb + kh * stride_tph
    tail_end = tl.where(is_flat, 0, end)  # tail positions to read: none in a flat split
    for n0 in range(start, end, BLOCK_N):
        idx = n0 + offs_n
        ok = idx < end
        if TAIL_MASK:
            pos = tl.load(p_ptr + idx, mask=idx < tail_end, other=-1)
            ok = ok & ((pos != -1) | (idx >= tail_end))
        k = tl.load(k_ptr + idx[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + idx[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of EMPTY tail slots only
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
    row = (bh * total_splits + sp) * G + offs_g
    tl.store(PO + row[:, None] * D + offs_d[None, :], out, mask=g_ok[:, None])
    tl.store(PL + row, lse, mask=g_ok)


@functools.lru_cache(maxsize=4)
def _kernels(interpret: bool):
    """`triton.jit` the kernels (per interpreter mode: jit reads TRITON_INTERPRET itself); the merge
    of the splits is `pipeline.decode_kernels`' (the same partial layout)."""
    global tl
    triton, tl = import_triton()
    # per-step values (the tail grows by one token a step): not specialized, so that a tail of
    # 1 or of a multiple of 16 tokens does not compile another variant in the middle of decoding
    varying = ["tail_len", "flat_splits", "total_splits", "chunk"]
    return (
        triton.jit(_partial_kernel, do_not_specialize=varying),
        reduce_kernel(interpret),
    )


def split_size(total_tokens: int, device: torch.device) -> int:
    """Tokens per split: about 8 splits per multiprocessor over the whole store, 128..4096."""
    return split_tokens(total_tokens, device, BLOCK_N)


def ragged_decode_attention(
    query: torch.Tensor,
    flat_keys: torch.Tensor,
    flat_values: torch.Tensor,
    seg_offsets: torch.Tensor,
    seg_lens: torch.Tensor,
    max_seg: int,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_positions: torch.Tensor | None,
    scaling: float,
    chunk: int | None = None,
    out: torch.Tensor | None = None,
    tail_used: torch.Tensor | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Decode attention [b, H, d] of query [b, H, d] over a ragged store plus its dense tail.

    flat_keys/values [N, d] contiguous; seg_offsets [b * h] int64 (exclusive cumsum of
    seg_lens); seg_lens [b * h] int32; `max_seg` the longest segment (a host int cached at
    compression: it sizes the grid without a device read); tail_keys/values [b, h, t, d] with
    any strides; tail_positions [b, h, t] when some tail slot may be EMPTY (masked), else
    None. H = group * h. A (row, head) with no token at all gets zeros. `chunk`: tokens per
    split (default `split_size`); `out` [b, H, d] to write into; `tail_used` (a static decode
    step, `RaggedKVLayer.attend_static`): a 1-element int64 device tensor, the last tail slot
    in use, with the tail tensors spanning their whole capacity (t); the rest tune the launch.
    """
    b, num_heads, d = query.shape
    h, t = tail_keys.shape[1], tail_keys.shape[2]
    group = num_heads // h
    if query.stride(-1) != 1:
        query = query.contiguous()
    if tail_keys.stride(-1) != 1 or tail_keys.stride(-2) != d:  # rows of d contiguous elements
        tail_keys = tail_keys.contiguous()
    if tail_values.stride(-1) != 1 or tail_values.stride(-2) != d:
        tail_values = tail_values.contiguous()
    if tail_positions is not None and tail_positions.stride(-1) != 1:
        tail_positions = tail_positions.contiguous()
    if not (flat_keys.is_contiguous() and flat_values.is_contiguous()):
        raise ValueError("flat keys/values must be contiguous")
    total = flat_keys.shape[0] + b * h * t
    chunk = chunk or split_size(total, query.device)
    flat_splits = -(-max_seg // chunk)
    tail_splits = -(-t // chunk)
    splits = max(1, flat_splits + tail_splits)
    partial_out = torch.empty((b * h, splits, group, d), dtype=torch.float32, device=query.device)
    partial_lse = torch.empty((b * h, splits, group), dtype=torch.float32, device=query.device)
    if out is None:
        out = torch.empty((b, num_heads, d), dtype=query.dtype, device=query.device)
    mask = tail_positions is not None
    tp = tail_positions if mask else seg_lens  # any int tensor: never read without TAIL_MASK
    device_tail = tail_used is not None
    tu = tail_used if device_tail else seg_lens  # likewise, never read without DEVICE_TAIL
    partial_kernel, reduce_kernel = _kernels(interpreting())
    partial_kernel[(b * h, splits)](
        query,
        flat_keys,
        flat_values,
        seg_offsets,
        seg_lens,
        tail_keys,
        tail_values,
        tp,
        tu,
        partial_out,
        partial_lse,
        query.stride(0),
        query.stride(1),
        tail_keys.stride(0),
        tail_keys.stride(1),
        tail_values.stride(0),
        tail_values.stride(1),
        tail_positions.stride(0) if mask else 0,
        tail_positions.stride(1) if mask else 0,
        h,
        t,
        flat_splits,
        splits,
        chunk,
        scaling * LOG2E,
        G=group,
        BLOCK_G=max(16, next_pow2(group)),
        D=d,
        BLOCK_N=block_n,
        TAIL_MASK=mask,
        DEVICE_TAIL=device_tail,
        IEEE=query.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    reduce_kernel[(b * num_heads,)](partial_out, partial_lse, out, splits, G=group, D=d, num_warps=1)
    return out


def ragged_decode_reference(
    query: torch.Tensor,
    flat_keys: torch.Tensor,
    flat_values: torch.Tensor,
    seg_lens: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_positions: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """The kernel's function in float32 plain torch, one (row, kv head) at a time: [b, H, d].

    seg_lens [b, h] (or [b * h]); segments lie back to back in (row, head) order.
    """
    b, num_heads, d = query.shape
    h = tail_keys.shape[1]
    group = num_heads // h
    lens = seg_lens.reshape(-1).tolist()
    out = torch.zeros((b, num_heads, tail_values.shape[-1]), dtype=torch.float32, device=query.device)
    start = 0
    for i, n in enumerate(lens):
        row, head = divmod(i, h)
        keys = [flat_keys[start : start + n].float()]
        values = [flat_values[start : start + n].float()]
        start += n
        keep = slice(None)
        if tail_positions is not None:
            keep = tail_positions[row, head] != EMPTY
        keys.append(tail_keys[row, head][keep].float())
        values.append(tail_values[row, head][keep].float())
        k, v = torch.cat(keys), torch.cat(values)
        if k.shape[0] == 0:
            continue
        q = query[row, head * group : (head + 1) * group].float()  # [group, d]
        weights = torch.softmax(q @ k.T * scaling, dim=-1)
        out[row, head * group : (head + 1) * group] = weights @ v
    return out


# -- prefill: a chunk of queries over the ragged store plus the chunk itself ------------------------
# A prefill chunk's queries see every compressed token (they all precede the chunk) and the
# chunk's own tokens causally. No padded copy of the store and no [b, h, q, s] mask is built:
# each (row, kv head)'s flat segment and its tail become one sequence of flash attention's
# variable-length mode (flash does GQA natively: the group's query heads over one kv head),
# with lower-right causality (flash aligns the causal diagonal bottom-right when q < k).


def prefill_usable(query: torch.Tensor) -> bool:
    """Whether `ragged_prefill_attention` with the flash op can serve this call (CUDA, fp16/bf16)."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    d = query.shape[-1]
    return d % 8 == 0 and d <= 256 and torch.cuda.get_device_capability(query.device)[0] >= 8


def flash_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scaling: float):
    """(out, lse) of flash attention (`aten._flash_attention_forward`): q [tokens, H, d] and k/v
    [tokens, h, d] with cumulative lengths (varlen), or [b, s, heads, d] without (cu_* None).
    lse is natural-log: [H, total_q] or [b, H, q] (older builds: [n, H, max_q] for varlen);
    a query over no key gets out 0 and lse +inf."""
    res = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scaling
    )
    return res[0], res[1]


def flash_forward_reference(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scaling: float):
    """`flash_forward`'s function in float32 plain torch (tests on CPU): same shapes, same empty rules."""
    if cu_q is None:  # dense [b, s, heads, d]: every batch entry is one sequence
        b, sq, hq, d = q.shape
        sk = k.shape[1]
        cu_q = torch.arange(0, (b + 1) * sq, sq, device=q.device)
        cu_k = torch.arange(0, (b + 1) * sk, sk, device=q.device)
        out, lse = flash_forward_reference(
            q.reshape(b * sq, hq, d), k.reshape(b * sk, -1, d), v.reshape(b * sk, -1, v.shape[-1]),
            cu_q, cu_k, max_q, max_k, causal, scaling,
        )  # fmt: skip
        return out.reshape(b, sq, hq, -1), lse.reshape(hq, b, sq).transpose(0, 1)
    hq, hk = q.shape[1], k.shape[1]
    out = torch.zeros((q.shape[0], hq, v.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.full((hq, q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if k1 == k0 or q1 == q0:
            continue
        qi = q[q0:q1].float().transpose(0, 1)  # [H, n, d]
        ki = k[k0:k1].float().transpose(0, 1).repeat_interleave(hq // hk, 0)
        vi = v[k0:k1].float().transpose(0, 1).repeat_interleave(hq // hk, 0)
        logits = qi @ ki.transpose(-1, -2) * scaling  # [H, n, m]
        if causal:  # lower-right: query j sees keys up to m - n + j
            n, m = logits.shape[-2:]
            allowed = (
                torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + m - n
            )
            logits = logits.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(logits, -1)  # [H, n]
        seen = torch.isfinite(row_lse)
        probs = torch.exp(logits - torch.where(seen, row_lse, 0.0)[..., None]).nan_to_num(0.0)
        out[q0:q1] = (probs @ vi).transpose(0, 1)
        lse[:, q0:q1] = torch.where(seen, row_lse, float("inf"))
    return out.to(q.dtype), lse


def ragged_prefill_attention(
    query: torch.Tensor,
    flat_keys: torch.Tensor,
    flat_values: torch.Tensor,
    seg_cu: torch.Tensor,
    max_seg: int,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    scaling: float,
    attn=None,
) -> torch.Tensor:
    """Attention [b, H, q, d] of a prefill chunk's queries [b, H, q, d] over a ragged store plus
    its dense tail (no EMPTY slot, no padding query; the chunk is the tail's last q tokens).

    flat_keys/values [N, d] (segments back to back in (row, kv head) order); seg_cu [b*h + 1]
    int32 cumulative segment lengths; `max_seg` the longest segment (host int, > 0);
    tail_keys/values [b, h, t, d] (t >= q; any strides with unit stride on d). `attn`: the
    attention function (default `flash_forward`; tests pass `flash_forward_reference`). The
    result is a [b, q, H, d]-contiguous tensor seen as [b, H, q, d] (the attention hook's
    transpose back is then free).

    Each (row, kv head)'s segment and tail are copied next to each other and attended by one
    varlen flash call, lower-right causal per sequence. (An earlier form read the store in place
    and merged a separate tail call by log-sum-exps: 2.79 vs 2.59 ms and 0.221 vs 0.143 GiB at
    b=1, 32K on the H100, so it was removed.)
    """
    attn = attn or flash_forward
    b, num_heads, q_len, d = query.shape
    h, t = tail_keys.shape[1], tail_keys.shape[2]
    g = num_heads // h
    dv = tail_values.shape[-1]
    n = flat_keys.shape[0]
    dev = query.device
    # sequence i = (row, kv head) i: its segment, then its tail (t tokens); cumulative lengths
    # shift by t per earlier sequence. No device read: every size is a host number.
    seqs = torch.arange(b * h + 1, dtype=torch.int32, device=dev)
    cu_k = seg_cu + seqs * t
    token = torch.arange(n, dtype=torch.int32, device=dev)
    seq_of_token = torch.searchsorted(seg_cu[1:], token, right=True)  # [N]
    store_rows = token.to(torch.int64) + seq_of_token * t
    tail_rows = ((cu_k[1:] - t).to(torch.int64)[:, None] + torch.arange(t, device=dev)).reshape(-1)
    packed = []
    for flat, tail, width in ((flat_keys, tail_keys, d), (flat_values, tail_values, dv)):
        out = flat.new_empty((n + b * h * t, 1, width))
        out.view(-1, width).index_copy_(0, store_rows, flat).index_copy_(
            0, tail_rows, tail.reshape(-1, width)
        )
        packed.append(out)
    # the queries of sequence i are entries i*q .. (i+1)*q of the varlen batch, g heads each
    q_seg = query.reshape(b, h, g, q_len, d).transpose(2, 3).reshape(b * h * q_len, g, d)
    cu_q = seqs * q_len
    out, _ = attn(q_seg, packed[0], packed[1], cu_q, cu_k, q_len, max_seg + t, True, scaling)
    out = out.reshape(b, h, q_len, g, dv).transpose(1, 2)  # [b, q, h, g, dv]
    return out.reshape(b, q_len, num_heads, dv).contiguous().transpose(1, 2)
