"""The attention function kvpipe registers with transformers' `AttentionInterface`.

The model calls it in every decoder layer, after the cache has stored the new keys/values.
The cache layer computes the attention over its own storage (`KVLayer.attend`: masked by its
slot positions only where slots are empty, so rows of different lengths and heads that kept
different tokens attend correctly, and by SDPA's flash kernel where they are not; storage
forms attend over their own form), and, when the engine asks for it, the policy gets this
layer's queries and compresses the layer right after it was used.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline.attention_math import grouped_attention  # noqa: F401 - re-exported for callers
from pipeline.kv_cache import CompressedCache, StepContext

ATTN_NAME = "kvpipe"
CTX_KWARG = "kvpipe_step"  # the keyword the engine passes to model(...); transformers forwards it here


def kvpipe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: StepContext | None = kwargs.get(CTX_KWARG)
    if step is None:
        raise RuntimeError(f"attn_implementation={ATTN_NAME!r} needs the {CTX_KWARG}= keyword on model(...)")
    cache: CompressedCache = step.cache
    layer = cache.layers[module.layer_idx]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = layer.attend(query, step, scaling)  # over the layer's own storage (key/value are in it)
    if step.compress and cache.policy is not None:
        cache.policy.compress_layer(layer, query, step, module.layer_idx, len(cache.layers), scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `attn_implementation="kvpipe"` available (idempotent)."""
    AttentionInterface.register(ATTN_NAME, kvpipe_attention)
    # The engine passes a ready 4D mask, so transformers never builds one; the mask function
    # is registered only so that the name is valid wherever transformers looks it up.
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
