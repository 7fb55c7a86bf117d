"""The attention each slot receives from a block of queries, summed over the queries (Triton).

The attention-score policies (snapkv, pyramidkv, adakv, spindlekv's deep layers) score a slot by
the softmax attention the observation window's queries give it, summed over those queries:
`signals.attention_probs(...).sum(dim=2)`. In torch that is a float32 [b, H, w, s] tensor written
by the logits GEMM, then masked, soft-maxed and summed over w: five passes over 4 * w bytes per
slot and query head, and about ten launches. Here, two passes over the keys:

1. `_stats_kernel`, grid (row x kv head, slot block): the group's query heads' logits over one
   block of keys (one key read for the whole GQA group), each query's max and sum of exponentials
   over the block's visible slots;
2. `_lse_kernel`, grid (row x kv head, query head of the group): each query's log-sum-exp, merged
   over the blocks 64 at a time (one block at a time, its chain of dependent loads was 18 us of a
   SmolLM2 layer's compression on an H100);
3. `_sums_kernel`, the grid of 1: the logits again, exp(logit - lse) summed over the queries of
   each head: the only full-size output, [b, H, s] float32.

Visibility is the cache's: query i sees slot j iff the slot's position is not EMPTY and at most the
query's; a padding query (position EMPTY) sees nothing and adds nothing, as `attention_probs` zeroes
its row. The logits are products of the stored dtype accumulated in float32 (`signals.float_logits`
does the same), so the two differ only in float32 summation order.

`window_sums_reference` is the same function in plain torch (the tests compare with it).
"""

from __future__ import annotations

import os

import torch

from pipeline.decode_kernels import next_pow2
from pipeline.kv_cache import EMPTY
from pipeline.triton_gate import import_triton, interpreting, kernel_may_run, triton_available

tl = None  # triton.language, imported by `_kernels` at first use (importing triton is slow)
_logits = None  # `_logits_fn` as a Triton function, made by `_kernels`

LOG2E = 1.4426950408889634

# Tests set this to run the kernels on CPU tensors under Triton's interpreter; the pipeline never
# does (`pipeline.triton_gate`).
CPU_INTERPRET = False


def usable(keys: torch.Tensor, queries: torch.Tensor) -> bool:
    """Whether the kernels can serve these tensors (else the caller takes the torch path).

    KVPIPE_WINDOW_KERNEL=0 turns them off (the torch path; benchmarks compare the two)."""
    if os.environ.get("KVPIPE_WINDOW_KERNEL", "1") == "0":
        return False
    if not (triton_available() and kernel_may_run(keys.device, CPU_INTERPRET)):
        return False
    d = keys.shape[-1]
    return (
        keys.dtype == queries.dtype
        and keys.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 16 <= d <= 256
        and d & (d - 1) == 0
        and queries.shape[1] % keys.shape[1] == 0
    )


# Plain functions, made Triton kernels by `_kernels` at first use (importing this module does not
# import triton); at module level because Triton's interpreter patches `tl` in their globals.
def _logits_fn(
    Q, K, QP, KP, q_base, k_base, qp_base, kp_base, sq_w, sk_s, w, s, lo, scale,
    W: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, DOT_IEEE: tl.constexpr,
):  # fmt: skip
    """One query head's window rows [W, BN] of scaled (log2) logits over slots lo..lo+BN, -inf where
    a query does not see a slot (EMPTY, -1: an empty slot or a padding query)."""
    rows = tl.arange(0, W)
    cols = lo + tl.arange(0, BN)
    dd = tl.arange(0, D)
    qpos = tl.load(QP + qp_base + rows, mask=rows < w, other=-1)
    q = tl.load(Q + q_base + rows[:, None] * sq_w + dd[None, :], mask=(rows < w)[:, None], other=0.0)
    kpos = tl.load(KP + kp_base + cols, mask=cols < s, other=-1)
    k = tl.load(K + k_base + cols[:, None].to(tl.int64) * sk_s + dd[None, :], mask=(cols < s)[:, None],
                other=0.0)  # fmt: skip
    if DOT_IEEE:
        logits = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        logits = tl.dot(q, tl.trans(k))
    seen = (kpos[None, :] != -1) & (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] != -1)
    return tl.where(seen, logits * scale, float("-inf"))


def _stats_kernel(
    Q, K, QP, KP, M, L,
    sq_b, sq_h, sq_w, sk_b, sk_h, sk_s, sqp_b, skp_b, skp_h,
    kv_heads, w, s, blocks, scale,
    G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, DOT_IEEE: tl.constexpr,
):  # fmt: skip
    """M / L [row x kv head, blocks, G * W]: each query's max logit and sum of exp2(logit - max) over
    the block's visible slots (-inf and 0 where it sees none)."""
    p = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    bi, hk = p // kv_heads, p % kv_heads
    lo = blk * BN
    rows = tl.arange(0, W)
    for g in tl.static_range(G):
        head = hk * G + g
        logits = _logits(
            Q, K, QP, KP, bi * sq_b + head * sq_h, bi * sk_b + hk * sk_h, bi * sqp_b, bi * skp_b + hk * skp_h,
            sq_w, sk_s, w, s, lo, scale, W, D, BN, DOT_IEEE,
        )  # fmt: skip
        top = tl.max(logits, 1)
        safe = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.exp2(logits - safe[:, None]), 1)
        out = (p * blocks + blk) * (G * W) + g * W + rows
        tl.store(M + out, top)
        tl.store(L + out, total)


def _lse_kernel(M, L, LSE, blocks, G: tl.constexpr, W: tl.constexpr, BB: tl.constexpr):
    """LSE [row x kv head, G * W]: each query's log2-sum-exp2 over every block, grid (row x kv head,
    query head of the group), BB blocks' stats at a time; +inf where it saw no slot (a padding
    query: exp2(logit - lse) is then 0)."""
    p = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * W + tl.arange(0, W)
    top = tl.full([W], float("-inf"), tl.float32)
    total = tl.zeros([W], tl.float32)
    for b0 in range(0, blocks, BB):
        blk = b0 + tl.arange(0, BB)
        at = (p * blocks + blk[:, None]) * (G * W) + rows[None, :]
        m = tl.load(M + at, mask=(blk < blocks)[:, None], other=float("-inf"))
        lsum = tl.load(L + at, mask=(blk < blocks)[:, None], other=0.0)
        new = tl.maximum(top, tl.max(m, 0))
        safe = tl.where(new == float("-inf"), 0.0, new)
        total = total * tl.exp2(top - safe) + tl.sum(lsum * tl.exp2(m - safe[None, :]), 0)
        top = new
    lse = tl.where(total > 0, top + tl.log2(tl.where(total > 0, total, 1.0)), float("inf"))
    tl.store(LSE + p * (G * W) + rows, lse)


def _sums_kernel(
    Q, K, QP, KP, LSE, OUT,
    sq_b, sq_h, sq_w, sk_b, sk_h, sk_s, sqp_b, skp_b, skp_h, so_b, so_h,
    kv_heads, w, s, scale,
    G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, DOT_IEEE: tl.constexpr,
):  # fmt: skip
    """OUT[b, head, slot] = sum over the head's window queries of exp2(logit - lse): the softmax
    attention the slot receives, summed over the queries."""
    p = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    bi, hk = p // kv_heads, p % kv_heads
    lo = blk * BN
    rows = tl.arange(0, W)
    cols = lo + tl.arange(0, BN)
    for g in tl.static_range(G):
        head = hk * G + g
        logits = _logits(
            Q, K, QP, KP, bi * sq_b + head * sq_h, bi * sk_b + hk * sk_h, bi * sqp_b, bi * skp_b + hk * skp_h,
            sq_w, sk_s, w, s, lo, scale, W, D, BN, DOT_IEEE,
        )  # fmt: skip
        lse = tl.load(LSE + p * (G * W) + g * W + rows)
        received = tl.sum(tl.exp2(logits - lse[:, None]), 0)
        tl.store(OUT + bi * so_b + head * so_h + cols, received, mask=cols < s)


_JIT: dict = {}


def _kernels(interpret: bool):
    """`triton.jit` the kernels (per interpreter mode: jit reads TRITON_INTERPRET itself)."""
    global tl
    if interpret not in _JIT:
        triton, tl = import_triton()
        globals()["_logits"] = triton.jit(_logits_fn)  # the kernels' helper, found in these globals
        # sizes and strides change with every prompt length and chunk: not specialized, so that a
        # batch job's many lengths do not compile a variant each (what is, the head size, is fixed)
        sizes = ["sq_b", "sk_b", "sk_h", "sqp_b", "skp_b", "skp_h", "w", "s", "blocks"]
        _JIT[interpret] = (
            triton.jit(_stats_kernel, do_not_specialize=sizes),
            triton.jit(_lse_kernel, do_not_specialize=["blocks"]),
            triton.jit(_sums_kernel, do_not_specialize=[*sizes[:-1], "so_b", "so_h"]),
        )
    return _JIT[interpret]


def block_slots(d: int, device: torch.device) -> int:
    """Slots per program: a [block, d] key tile of at most 32 KiB of bf16 on the GPU; small in tests."""
    if device.type != "cuda":
        return 16
    return 128 if d <= 128 else 64


def window_sums(
    keys: torch.Tensor,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    slot_positions: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """[b, H, s] float32: per query head, the softmax attention of `queries` each slot receives,
    summed over the queries.

    keys [b, h, s, d] (H = group * h; rows of d contiguous elements), queries [b, H, w, d],
    query_positions [b, w] (EMPTY: padding), slot_positions [b, h, s] (EMPTY: an empty slot; any
    strides). `attention_probs(layer, queries, query_positions, scaling).sum(dim=2)` for a layer of
    these keys and positions."""
    b, num_heads, w, d = queries.shape
    kv_heads, s = keys.shape[1], keys.shape[2]
    group = num_heads // kv_heads
    out = torch.empty((b, num_heads, s), dtype=torch.float32, device=keys.device)
    if b == 0 or s == 0 or w == 0:
        return out.zero_()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    qpos = query_positions.to(torch.int32).contiguous()
    kpos = slot_positions.to(torch.int32)
    if kpos.stride(-1) != 1:
        kpos = kpos.contiguous()
    W = max(16, next_pow2(w))
    BN = block_slots(d, keys.device)
    blocks = -(-s // BN)
    rows = group * W
    m = torch.empty((b * kv_heads, blocks, rows), dtype=torch.float32, device=keys.device)
    lsum = torch.empty_like(m)
    lse = torch.empty((b * kv_heads, rows), dtype=torch.float32, device=keys.device)
    scale = float(scaling) * LOG2E
    ieee = keys.dtype == torch.float32
    stats, merge, sums = _kernels(interpreting())
    strides = (
        queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        qpos.stride(0), kpos.stride(0), kpos.stride(1),
    )  # fmt: skip
    meta = dict(G=group, W=W, D=d, BN=BN, DOT_IEEE=ieee)
    stats[(b * kv_heads, blocks)](
        queries, keys, qpos, kpos, m, lsum, *strides, kv_heads, w, s, blocks, scale, **meta, num_warps=4
    )
    merge[(b * kv_heads, group)](
        m, lsum, lse, blocks, G=group, W=W, BB=64 if keys.device.type == "cuda" else 4, num_warps=4
    )
    sums[(b * kv_heads, blocks)](
        queries, keys, qpos, kpos, lse, out, *strides, out.stride(0), out.stride(1),
        kv_heads, w, s, scale, **meta, num_warps=4,
    )  # fmt: skip
    return out


def window_sums_reference(
    keys: torch.Tensor,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    slot_positions: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """`window_sums` in float64 torch, one GQA group expanded (for tests)."""
    b, num_heads, w, d = queries.shape
    group = num_heads // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    kpos = slot_positions.long().repeat_interleave(group, dim=1)  # [b, H, s]
    logits = queries.double() @ k.transpose(-1, -2) * scaling  # [b, H, w, s]
    qpos = query_positions.long()[:, None, :, None]
    seen = (kpos[:, :, None, :] != EMPTY) & (kpos[:, :, None, :] <= qpos) & (qpos != EMPTY)
    probs = logits.masked_fill(~seen, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return probs.sum(dim=2)
