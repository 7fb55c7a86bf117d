"""Signals the attention-based eviction policies share, computed from the hook's queries.

Everything here is pure tensor code over one cache layer: the attention probabilities of a
block of queries over the layer's stored slots (softmax over the filled slots a query may
see, with the cache's own mask, so causality inside the window and empty slots are exact),
GQA-group aggregation, SnapKV-style pooling in position order, the observation window, and
the tensor-parallel reductions a head-aggregating policy needs.

Shapes: queries [b, H, q, d] (H query heads), keys [b, h, s, d] (h kv heads, s slots),
query positions [b, q] (EMPTY for padding), slot positions [b, h, s] (EMPTY for empty slots).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.kv_cache import EMPTY, KVLayer
from policies import window_kernels

# A score above any attention-derived score: tokens that must be kept (the observation window,
# the newest token). Adding the position orders them (newest first) should a budget be smaller
# than the window; float32 holds these integers exactly up to 2**24 - 2**22 positions.
KEEP_BASE = float(2**22)


@functools.lru_cache(maxsize=16)
def later_mask(n: int, device: torch.device) -> torch.Tensor:
    """[n, n] True above the diagonal (for queries over their own slots: the later ones, hidden),
    made once per size and device rather than per layer."""
    return torch.ones((n, n), dtype=torch.bool, device=device).triu_(1)


@functools.lru_cache(maxsize=8)
def _half_gemm_to_float(device: torch.device) -> bool:
    """Whether this torch runs a half-precision bmm with a float32 result (`out_dtype`) here."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones((1, 2, 8), dtype=torch.bfloat16, device=device)
        return torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def float_logits(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [b, h, m, d] times keys [b, h, s, d] transposed: [b, h, m, s] float32.

    On the GPU, half-precision inputs go through the tensor cores with a float32 result: products
    of bfloat16 / float16 numbers are exact in float32, so this differs from the float32 GEMM of the
    widened inputs only in summation order, and it skips that GEMM's float32 copy of the keys (on
    SmolLM2 shapes at 32K the copy and the float32 GEMM were ~75 us of a layer's compression)."""
    b, h, m, d = q.shape
    s = keys.shape[2]
    if q.dtype == keys.dtype and q.dtype in (torch.bfloat16, torch.float16) and _half_gemm_to_float(q.device):
        k_t = keys.reshape(b * h, s, d).transpose(1, 2)
        return torch.bmm(q.reshape(b * h, m, d), k_t, out_dtype=torch.float32).view(b, h, m, s)
    return torch.matmul(q.float(), keys.float().transpose(-1, -2))


def attention_probs(
    layer: KVLayer,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    upto: int | None = None,
    newest: bool = False,
) -> torch.Tensor:
    """Attention probabilities [b, H, q, s] (float32) of `queries` over the layer's slots.

    Each query attends to the filled slots at or before its position (the layer's own mask),
    exactly as the model's attention did. Rows of padding queries (EMPTY) are all zero.
    `upto` limits the computation to the first `upto` slots (the caller guarantees that the
    others are invisible to these queries); the result then has `upto` slots.
    `newest` promises that the queries are the tokens of the last q of those slots, none of them
    padding (earlier slots may be empty): the mask is then lower-right causal, plus the empty
    slots when the layer has some (`has_empty`), built without comparing positions (the same mask).
    """
    keys = layer.keys if upto is None else layer.keys[:, :, :upto]
    b, num_heads, q_len, d = queries.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = num_heads // kv_heads
    # a GQA group's queries side by side ([b, h, g*q, d]): one GEMM per kv head, no copy of the
    # keys expanded over the group (a broadcast matmul materialises it: 4x the float32 keys)
    q = queries.reshape(b, kv_heads, group * q_len, d)
    logits = float_logits(q, keys).mul_(scaling)
    logits = logits.reshape(b, kv_heads, group, q_len, slots)
    if newest:
        # slot j is visible to query i iff j <= slots - q_len + i (positions increase with slots):
        # every filled slot before the last q_len is visible, so only those and the empty ones
        # need a mask
        if q_len > 1:
            logits[..., slots - q_len :].masked_fill_(later_mask(q_len, logits.device), float("-inf"))
        if layer.has_empty:
            empty = layer.positions[..., :slots] == EMPTY  # [b, h, s]
            logits.masked_fill_(empty[:, :, None, None, :], float("-inf"))
        return logits.softmax(dim=-1).reshape(b, num_heads, q_len, slots)
    valid = query_positions != EMPTY  # [b, q]
    mask = layer.attention_mask(query_positions)  # [b, h or 1, q, s]
    if upto is not None:
        mask = mask[..., :upto]
    mask = mask | ~valid[:, None, :, None]  # padding queries see everything (no NaN), then zeroed
    # (-inf written where the mask hides a slot: the same logits as adding a 0 / -inf bias)
    probs = logits.masked_fill_(~mask[:, :, None], float("-inf")).softmax(dim=-1)
    probs.mul_(valid[:, None, None, :, None].to(probs.dtype))
    return probs.reshape(b, num_heads, q_len, slots)


# Queries a `received_attention` call may hand the fused kernels (a query tile of at most this many
# rows per head; an observation window is 32 by default). Longer blocks take the torch path.
FUSED_QUERIES = 64
# The fused kernels serve calls whose float32 probabilities ([b, H, q, s]) would take at least this
# many bytes. Below it their three launches' host time outweighs what they save: on an H100
# (`python -m pipeline.bench.check_window`, wall time with the host's launches) SmolLM2 shapes at
# 32K (38 MB) took 0.229 ms fused vs 0.163 ms in torch, Llama-8B shapes at 8K (34 MB) 0.242 vs 0.228,
# at 32K (134 MB) 0.330 vs 0.457; above it they also spare the probabilities' memory peak.
FUSED_MIN_BYTES = 64 << 20


def received_attention(
    layer: KVLayer,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    newest: bool = False,
) -> torch.Tensor:
    """The attention each slot receives from `queries`, summed over them: [b, H, s] float32.

    `attention_probs(...).sum(dim=2)`; where the Triton kernels run (`window_kernels`) and the
    probabilities would be large (`FUSED_MIN_BYTES`), two passes over the keys instead, with no
    [b, H, q, s] probabilities in memory (the same function up to float32 summation order)."""
    b, heads, q_len = queries.shape[:3]
    positions = layer.positions  # (sized first: a compressed layer's `keys` may be a view it builds)
    if q_len <= FUSED_QUERIES and b * heads * q_len * positions.shape[-1] * 4 >= FUSED_MIN_BYTES:
        keys = layer.keys
        if window_kernels.usable(keys, queries):
            return window_kernels.window_sums(keys, queries, query_positions, positions, scaling)
    return attention_probs(layer, queries, query_positions, scaling, newest=newest).sum(dim=2)


def summed_attention(
    layer: KVLayer,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    block: int = 256,
    uptos: list[int] | None = None,
    newest: bool = False,
) -> torch.Tensor:
    """Attention each slot received, summed over all (valid) queries: [b, H, s] float32.

    Queries are taken `block` at a time so memory stays [b, H, block, s]; each block only
    computes over the slots up to the last one it can see (causality halves the work): 1 + that
    slot per block, `uptos` when the host knows them (`visible_slots`), else read from the device.
    `newest`: what `attention_probs` promises with it (for the whole forward); a block whose
    visible slots end at its own last query then needs no positions (nor, the last block, a read).
    """
    b, num_heads, q_len, _ = queries.shape
    slots = layer.keys.shape[2]
    total = queries.new_zeros((b, num_heads, slots), dtype=torch.float32)
    for i, lo in enumerate(range(0, q_len, block)):
        qpos = query_positions[:, lo : lo + block]
        own = slots - q_len + min(lo + block, q_len)  # 1 + the block's last query's slot
        if uptos is not None:
            upto = uptos[i]
        elif newest and own == slots:  # the last block sees every slot
            upto = slots
        else:
            upto = _last_seen_slot(layer.positions, qpos) + 1
        block_newest = newest and upto == own
        part = attention_probs(
            layer, queries[:, :, lo : lo + block], qpos, scaling, upto=upto, newest=block_newest
        )
        total[..., :upto] += part.sum(dim=2)
    return total


def _last_seen_slot(slot_positions: torch.Tensor, query_positions: torch.Tensor) -> int:
    """The last slot any of the queries can see (0 if none), read from the device."""
    newest = int(query_positions.max())
    seen = ((slot_positions != EMPTY) & (slot_positions <= newest)).any(dim=0).any(dim=0)  # [s]
    return int(seen.nonzero().max()) if bool(seen.any()) else 0


def visible_slots(valid: list[int], seen: list[int], q_len: int, slots: int, block: int) -> list[int]:
    """`summed_attention`'s upto per query block, from the host: what `_last_seen_slot` reads.

    The forward's q_len tokens are the layer's last slots; row r's are its last valid[r] columns,
    at consecutive positions ending at seen[r] - 1 (left padding). A block's newest query is the
    largest position in its last column; the last slot seen is then the last column some row
    fills with a position up to it (earlier slots hold older tokens)."""
    first = [q_len - v for v in valid]  # each row's first column
    uptos = []
    for lo in range(0, q_len, block):
        last = min(lo + block, q_len) - 1
        starts = [s - q_len for s in seen]  # row r's token in column c is at starts[r] + c
        newest = max((st + last for f, st in zip(first, starts) if f <= last), default=None)
        if newest is None:  # padding only: no slot is seen
            uptos.append(1)
            continue
        col = max(min(q_len - 1, newest - st) for f, st in zip(first, starts) if newest - st >= f)
        uptos.append(slots - q_len + col + 1)
    return uptos


def group_mean(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, H, ...] -> [b, kv_heads, ...]: mean over the query heads that share each kv head."""
    b, num_heads = per_query_head.shape[:2]
    grouped = per_query_head.reshape(b, kv_heads, num_heads // kv_heads, *per_query_head.shape[2:])
    return grouped.mean(dim=2)


def check_observation_params(window: int, kernel: int, pooling: str) -> None:
    """Validate the SnapKV-style observation parameters a policy exposes."""
    if window < 1:
        raise ValueError("window must be >= 1")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError("kernel must be an odd number >= 1")
    if pooling not in ("avg", "max"):
        raise ValueError("pooling must be 'avg' or 'max'")


def window_size(query_positions: torch.Tensor, window: int) -> int:
    """Observation window for this forward: the last min(window, q) queries."""
    return max(1, min(window, query_positions.shape[-1]))


def in_window(slot_positions: torch.Tensor, window_query_positions: torch.Tensor) -> torch.Tensor:
    """[b, h, s] True for the slots of the window's (valid) query tokens.

    The window queries are the newest tokens of each row, so a slot is in the window when its
    position is at or after the row's first valid window query position.
    """
    big = torch.iinfo(torch.int32).max
    wq = window_query_positions
    start = torch.where(wq != EMPTY, wq, big).min(dim=-1).values  # [b]
    return (slot_positions != EMPTY) & (slot_positions >= start[:, None, None])


def _pool_rows(x: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """1-D "avg" or "max" pooling of each (row, head)'s slots ([b, h, s]), zero padding at the ends."""
    b, h, s = x.shape
    flat = x.reshape(b * h, 1, s)
    if kind == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(b, h, s)


def pool_in_position_order(
    scores: torch.Tensor,
    slot_positions: torch.Tensor,
    kernel: int,
    kind: str,
    ordered: bool = False,
    full: bool = False,
):
    """SnapKV's 1-D pooling ([b, h, s]) over each (row, head)'s filled slots in position order.

    Filled slots are gathered to the front in position order (empty slots after them score 0),
    so a row's result does not depend on left padding or on holes left by an earlier
    compression: it equals pooling the row's own token sequence with zero padding at the ends,
    as the reference does (avg_pool1d, padding kernel // 2, count_include_pad).

    `ordered` True promises that each (row, head)'s filled slots already hold increasing
    positions (what every `KVLayer` keeps: prefill and decode append in position order, and
    eviction keeps slots in position order): the filled slots are then moved to the front by
    a cumulative count instead of a sort (the same permutation). `full` True (with `ordered`)
    promises that no slot is empty: the slots are then pooled where they are.
    """
    if kernel <= 1:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {kernel}")
    if kind not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {kind!r}")
    if ordered and full:
        return _pool_rows(scores, kernel, kind)
    filled = slot_positions != EMPTY
    if ordered:
        # slot i goes to place (filled slots before it) if filled, else after every filled slot
        before = filled.cumsum(dim=-1)
        empty_before = torch.arange(1, filled.shape[-1] + 1, device=filled.device) - before
        dest = torch.where(filled, before - 1, before[..., -1:] + empty_before - 1)
        compact = torch.empty_like(scores).scatter_(2, dest, scores.masked_fill(~filled, 0.0))
        order = None
    else:
        key = torch.where(filled, slot_positions.to(torch.int64), torch.iinfo(torch.int64).max)
        order = key.argsort(dim=-1, stable=True)
        compact = torch.gather(scores.masked_fill(~filled, 0.0), 2, order)
    pooled = _pool_rows(compact, kernel, kind)
    if order is None:
        out = torch.gather(pooled, 2, dest)
    else:
        out = torch.empty_like(compact)
        out.scatter_(2, order, pooled)
    return out.masked_fill(~filled, 0.0)


def snapkv_scores(
    layer: KVLayer,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    window: int,
    kernel: int,
    pooling: str,
    newest: bool = False,
) -> torch.Tensor:
    """SnapKV's score [b, h, s]: window attention summed over the window queries, averaged over
    each GQA group, pooled over the prefix; the window's own slots score KEEP_BASE + position.

    The layer's filled slots must hold increasing positions per (row, head), as every
    `KVLayer` keeps them (the pooling relies on it instead of sorting). `newest`: the queries
    are this forward's, just appended to the layer (its last slots), and none is padding
    (`not step.padded`)."""
    args = (layer, queries, query_positions, scaling, window, kernel, pooling, newest)
    return _snapkv(*args, window_mask=False)[0]


def snapkv_scores_and_window(
    layer: KVLayer,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    window: int,
    kernel: int,
    pooling: str,
    newest: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`snapkv_scores` and the [b, h, s] mask of the window's own slots (`in_window`)."""
    args = (layer, queries, query_positions, scaling, window, kernel, pooling, newest)
    return _snapkv(*args, window_mask=True)


def _snapkv(layer, queries, query_positions, scaling, window, kernel, pooling, newest, window_mask):
    w = window_size(query_positions, window)
    wq, wpos = queries[:, :, -w:], query_positions[:, -w:]
    positions = layer.positions
    # this forward's tokens are the layer's last slots: masks and the window need no positions
    probs = received_attention(layer, wq, wpos, scaling, newest=newest)  # [b, H, s]
    scores = group_mean(probs, layer.keys.shape[1])
    full = not layer.has_empty
    if newest:  # the window's slots are the last w: written in place, without a mask
        s = positions.shape[-1]
        scores[..., s - w :] = 0.0  # the reference pools the prefix columns only
        scores = pool_in_position_order(scores, positions, kernel, pooling, ordered=True, full=full)
        torch.add(positions[..., s - w :].float(), KEEP_BASE, out=scores[..., s - w :])
        return scores, _last_slots(positions, w) if window_mask else None
    window_slots = in_window(positions, wpos)
    scores = scores.masked_fill_(window_slots, 0.0)  # the reference pools the prefix columns only
    scores = pool_in_position_order(scores, positions, kernel, pooling, ordered=True, full=full)
    keep = KEEP_BASE + positions.float()
    return torch.where(window_slots, keep, scores), window_slots


def _last_slots(positions: torch.Tensor, w: int) -> torch.Tensor:
    """[b, h, s] True for the last `w` slots."""
    b, h, s = positions.shape
    return (torch.arange(s, device=positions.device) >= s - w).expand(b, h, s)


# -- selection without ties ---------------------------------------------------------------------
# -- tensor parallelism -------------------------------------------------------------------------
def tp_world(group=None) -> tuple[int, int]:
    """(rank, world size) of the tensor-parallel group; (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` over the tensor-parallel group (a no-op on one process)."""
    _, world = tp_world(group)
    if world > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_heads(local: torch.Tensor, fill: float = float("-inf"), group=None) -> tuple[torch.Tensor, int]:
    """Every rank's heads of `local` ([b, h_local, s]) side by side: ([b, h_local * world, s], offset).

    Heads are split over ranks in contiguous, equal slices (rank r holds heads r*h_local ...),
    as tensor parallelism shards attention. Ranks may hold different slot counts: shorter ones
    are padded with `fill`. `offset` is this rank's first head in the result.
    """
    rank, world = tp_world(group)
    if world == 1:
        return local, 0
    b, h, s = local.shape
    s_max = torch.tensor([s], device=local.device)
    dist.all_reduce(s_max, op=dist.ReduceOp.MAX, group=group)
    s_max = int(s_max.item())
    # All-reduce a zero tensor in which each rank wrote its own slice (gloo and NCCL both sum
    # exactly when only one rank contributes a non-zero). Infinities become the float extremes
    # so they never meet a sum; slots a rank does not have get `fill`.
    finfo = torch.finfo(local.dtype)
    values = local.new_zeros((b, h * world, s_max))
    present = torch.zeros((b, h * world, s_max), dtype=torch.int32, device=local.device)
    values[:, rank * h : (rank + 1) * h, :s] = torch.nan_to_num(local, posinf=finfo.max, neginf=finfo.min)
    present[:, rank * h : (rank + 1) * h, :s] = 1
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(present, op=dist.ReduceOp.SUM, group=group)
    return torch.where(present == 1, values, torch.full_like(values, fill)), rank * h
