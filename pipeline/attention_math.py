"""Attention arithmetic shared by the cache layers: which bias a forward needs, and GQA attention.

Kept separate from `pipeline.attention` (the hook transformers calls) so that cache layers can
compute their own attention without importing the hook.

The fast paths matter on a GPU: SDPA's flash kernel takes no mask, so a forward whose slots
are all filled uses no mask at all when it decodes (every stored slot precedes the new
token), upper-left causality when it is the first forward (slots == queries), and
lower-right causality when it follows a compressed prefix (the new tokens are the last
`q` slots; every kept slot precedes them). Only caches with empty slots (left padding,
ragged heads) pay for a boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

EMPTY = -1  # position of a slot that holds no token

CAUSAL = "causal"  # attention bias: upper-left causal (queries == slots)


def position_mask(
    slot_positions: torch.Tensor, query_positions: torch.Tensor, heads_differ: bool
) -> torch.Tensor:
    """Boolean mask [b, h or 1, q, slots]: a query sees filled slots at or before its position.

    slot_positions [b, h, s] (EMPTY: no token), query_positions [b, q] (EMPTY: padding).
    `heads_differ` False promises that every head holds the same positions, so one mask
    serves all heads. A padding query is let see the new tokens of its own forward, so its
    row of attention is never empty (an all-masked row gives NaN, and NaN * 0 spreads).
    """
    pos = slot_positions if heads_differ else slot_positions[:, :1]
    q = query_positions[:, None, :, None]
    k = pos[:, :, None, :]
    mask = (k <= q) & (k != EMPTY)
    q_len, slots = query_positions.shape[-1], pos.shape[-1]
    pad_query = (query_positions == EMPTY)[:, None, :, None]
    own_forward = torch.arange(slots, device=pos.device) >= slots - q_len
    return mask | (pad_query & own_forward)


def dense_bias(q_len: int, slots: int):
    """The bias of a forward over a cache without empty slots whose new tokens are its last `q_len`."""
    if q_len == 1:
        return None  # decoding: every stored slot is at or before the new token
    if q_len == slots:
        return CAUSAL
    return causal_lower_right(q_len, slots)


# Decoding changes the slot count every step, and cuDNN's attention builds (and caches) an
# execution plan per shape: measured on an H100, that host work made decode steps several
# times slower than their kernels. The engine therefore decodes inside `decode_backends()`
# (flash without a mask, the memory-efficient kernel with one), entered once per step
# rather than per layer (13 us each on the host).
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_backends():
    """The SDPA backends of a decode step (a fresh context manager per use)."""
    return sdpa_kernel(_DECODE_BACKENDS)


def grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias, scaling: float
) -> torch.Tensor:
    """Attention for GQA without repeating keys.

    query [b, H, q, d], keys/values [b, h, s, d]; `bias` is None, `CAUSAL`, a `CausalBias`,
    or a boolean mask [b, h or 1, q, s]. Returns [b, H, q, d]. A decode query's mask is
    folded over the GQA group (a view), as the memory-efficient kernel takes no GQA.
    """
    return _attention(query, keys, values, bias, scaling, fold_masks=query.shape[2] == 1)


def _attention(query, keys, values, bias, scaling: float, fold_masks: bool) -> torch.Tensor:
    """SDPA with GQA; a per-head mask (any mask with `fold_masks`) folds query heads onto their kv head."""
    b, num_heads, q_len, d = query.shape
    kv_heads = keys.shape[1]
    gqa = num_heads != kv_heads
    if bias is None or bias is CAUSAL:
        return F.scaled_dot_product_attention(
            query, keys, values, is_causal=bias is CAUSAL, scale=scaling, enable_gqa=gqa
        )
    if isinstance(bias, CausalBias) or (bias.shape[1] == 1 and not (fold_masks and gqa)):
        # (a CausalBias is a Tensor subclass: test it first)
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=bias, scale=scaling, enable_gqa=gqa
        )
    group = num_heads // kv_heads
    folded = query.reshape(b, kv_heads, group * q_len, d)
    mask = bias[:, :, None].expand(b, kv_heads, group, q_len, bias.shape[-1])
    mask = mask.reshape(b, kv_heads, group * q_len, -1)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, num_heads, q_len, values.shape[-1])
