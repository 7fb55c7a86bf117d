"""The attention function kvpipe registers with transformers' `AttentionInterface`.

The model calls it in every decoder layer, after the cache has stored the new keys/values.
It masks with the cache layer's own slot positions (so rows of different lengths and heads
that kept different tokens attend correctly), and, when the engine asks for it, hands the
policy this layer's queries and compresses the layer right after it was used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline.kv_cache import CompressedCache, StepContext

ATTN_NAME = "kvpipe"
CTX_KWARG = "kvpipe_step"  # the keyword the engine passes to model(...); transformers forwards it here


def grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention for GQA without repeating keys: query heads are folded onto their kv head.

    query [b, H, q, d], keys/values [b, h, s, d], mask [b, h or 1, q, s] -> [b, H, q, d].
    """
    b, num_heads, q_len, d = query.shape
    kv_heads = keys.shape[1]
    if mask.shape[1] == 1:  # one mask for every head: sdpa's own GQA broadcasts it
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=num_heads != kv_heads
        )
    group = num_heads // kv_heads
    folded = query.reshape(b, kv_heads, group * q_len, d)
    mask = mask[:, :, None].expand(b, mask.shape[1], group, q_len, mask.shape[-1])
    mask = mask.reshape(b, mask.shape[1], group * q_len, -1)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, num_heads, q_len, values.shape[-1])


def kvpipe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: StepContext | None = kwargs.get(CTX_KWARG)
    if step is None:
        raise RuntimeError(f"attn_implementation={ATTN_NAME!r} needs the {CTX_KWARG}= keyword on model(...)")
    cache: CompressedCache = step.cache
    layer = cache.layers[module.layer_idx]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = layer.attention_mask(step.positions)
    out = grouped_attention(query, key, value, mask, scaling)
    if step.compress and cache.policy is not None:
        cache.policy.compress_layer(layer, query, step, module.layer_idx, len(cache.layers), scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `attn_implementation="kvpipe"` available (idempotent)."""
    AttentionInterface.register(ATTN_NAME, kvpipe_attention)
    # The engine passes a ready 4D mask, so transformers never builds one; the mask function
    # is registered only so that the name is valid wherever transformers looks it up.
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
