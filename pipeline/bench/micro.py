"""Attention micro-benchmarks at one decode shape: what kvpipe's attention path costs per layer.

For the hot-path notes: the engine's decode attention (`KVLayer.attend` on a cache without
empty slots), the mask kvpipe builds where slots are empty, the SDPA call forms with a mask
(shared mask with `enable_gqa`, or per-head mask with folded query heads), the same attention
with no mask, the `torch.cat` a layer would cost per step without spare capacity, and which
SDPA backends accept each call form. Each is compared with the bytes it must read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.bench import gpu


def _time(fn, device, reps: int) -> float:
    for _ in range(3):
        fn()
    gpu.sync(device)
    marks = gpu.Marks(device)
    marks.mark()
    for _ in range(reps):
        fn()
        marks.mark()
    return gpu.summary(marks.intervals())["median_ms"]


def _backends():
    from torch.nn.attention import SDPBackend

    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return [(n, getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def _eligible(fn) -> dict:
    """Which SDPA backends run `fn` when forced one at a time."""
    from torch.nn.attention import sdpa_kernel

    out = {}
    for name, backend in _backends():
        try:
            with sdpa_kernel([backend]):
                fn()
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - a refusal is the datum
            out[name] = "no: " + str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "no"
    return out


def attention_micro(config, device: torch.device, dtype: torch.dtype, batch: int, slots: int, bw, reps=20):
    from pipeline.attention import grouped_attention
    from pipeline.kv_cache import KVLayer

    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    q = rnd(batch, heads, 1, d)
    k = rnd(batch, kv_heads, slots, d)
    v = rnd(batch, kv_heads, slots, d)
    k_new = rnd(batch, kv_heads, 1, d)
    scale = d**-0.5
    qpos = torch.full((batch, 1), slots - 1, device=device, dtype=torch.long)

    shared = KVLayer()
    shared.keys, shared.values, shared.is_initialized = k, v, True
    shared.positions = torch.arange(slots, device=device, dtype=torch.int32).expand(batch, kv_heads, slots)
    shared.positions = shared.positions.contiguous()
    per_head = KVLayer()
    per_head.keys, per_head.values, per_head.is_initialized = k, v, True
    per_head.positions = shared.positions.clone()
    if kv_heads > 1 and slots > 1:
        per_head.positions[:, 1, 0] = -1  # one head with an empty slot: masks differ per head

    mask_shared = shared.attention_mask(qpos)  # [b, 1, 1, s]
    mask_heads = per_head.attention_mask(qpos)  # [b, h, 1, s]
    folded = q.reshape(batch, kv_heads, group, d)

    from pipeline.kv_cache import StepContext

    decode_step = StepContext(cache=None, positions=qpos, padded=False)
    calls = {
        "kvpipe_attend (decode, no empty slot: the engine's path)": lambda: shared.attend(
            q, decode_step, scale
        ),
        "kvpipe_shared_mask_gqa": lambda: grouped_attention(q, k, v, mask_shared, scale),
        "kvpipe_per_head_mask_folded": lambda: grouped_attention(q, k, v, mask_heads, scale),
        "sdpa_no_mask_gqa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
        "sdpa_no_mask_folded": lambda: F.scaled_dot_product_attention(folded, k, v, scale=scale),
    }
    kv_read = 2 * batch * kv_heads * slots * d * k.element_size()
    out = {
        "shape": {"batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": d, "slots": slots},
        "kv_bytes_per_layer": kv_read,
        "kv_read_roofline_ms": kv_read / bw * 1e3 if bw else None,
        "ms": {},
        "backends": {},
    }
    for name, fn in calls.items():
        try:
            out["ms"][name] = _time(fn, device, reps)
        except Exception as exc:  # noqa: BLE001
            out["ms"][name] = None
            out.setdefault("errors", {})[name] = str(exc).splitlines()[0][:200]
        out["backends"][name] = _eligible(fn)
    out["ms"]["mask_build_shared"] = _time(lambda: shared.attention_mask(qpos), device, reps)
    out["ms"]["mask_build_per_head"] = _time(lambda: per_head.attention_mask(qpos), device, reps)
    out["ms"]["cat_append_one_token (keys+values)"] = _time(
        lambda: (torch.cat([k, k_new], dim=-2), torch.cat([v, k_new], dim=-2)), device, reps
    )
    out["default_backend"] = _default_backend(q, k, v, mask_shared, mask_heads, folded, scale)
    return out


def _default_backend(q, k, v, mask_shared, mask_heads, folded, scale) -> dict:
    """The backend torch's dispatcher picks for each call form (a private API: best effort)."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice  # type: ignore[attr-defined]
        names = {int(val): key for key, val in SDPBackend.__members__.items()}
        kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
        mask_folded = (
            mask_heads[:, :, None].expand(-1, -1, group, -1, -1).reshape(q.shape[0], kv_heads, group, -1)
        )
        return {
            "kvpipe_shared_mask_gqa": names.get(
                int(choice(q, k, v, mask_shared, 0.0, False, scale=scale, enable_gqa=True)), "?"
            ),
            "kvpipe_per_head_mask_folded": names.get(
                int(choice(folded, k, v, mask_folded, 0.0, False, scale=scale)), "?"
            ),
            "sdpa_no_mask_gqa": names.get(
                int(choice(q, k, v, None, 0.0, False, scale=scale, enable_gqa=True)), "?"
            ),
            "sdpa_no_mask_folded": names.get(int(choice(folded, k, v, None, 0.0, False, scale=scale)), "?"),
        }
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}


def prefill_attention_micro(config, device: torch.device, dtype, q_len: int, prefix: int, bw, reps: int = 5):
    """One layer's attention for a prefill chunk after a kept prefix: kvpipe's boolean mask vs
    the lower-right causal mask (what the mask is when every slot is filled and shared by the
    heads), with each call's peak memory above its inputs."""
    from pipeline.attention import grouped_attention
    from pipeline.kv_cache import KVLayer

    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    slots = prefix + q_len
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(1, heads, q_len, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, kv_heads, slots, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, kv_heads, slots, d, device=device, dtype=dtype, generator=g)
    layer = KVLayer()
    layer.keys, layer.values, layer.is_initialized = k, v, True
    layer.positions = (
        torch.arange(slots, device=device, dtype=torch.int32).expand(1, kv_heads, slots).contiguous()
    )
    qpos = torch.arange(prefix, slots, device=device, dtype=torch.long)[None]
    scale = d**-0.5
    mask = layer.attention_mask(qpos)
    calls = {"kvpipe_bool_mask": lambda: grouped_attention(q, k, v, mask, scale)}
    try:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(q_len, slots)
        calls["causal_lower_right_gqa"] = lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=scale, enable_gqa=True
        )
        rep = heads // kv_heads
        calls["causal_lower_right_repeat_kv"] = lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=bias, scale=scale
        )
    except Exception:  # noqa: BLE001 - older torch: the comparison is simply absent
        pass
    out = {"shape": {"q_len": q_len, "prefix": prefix, "heads": heads, "kv_heads": kv_heads, "head_dim": d}}
    flops = 4 * heads * q_len * slots * d  # upper bound (no causal skipping)
    out["flops_upper"] = flops
    out["ms"], out["peak_extra_bytes"], out["backends"] = {}, {}, {}
    for name, fn in calls.items():
        try:
            gpu.cleanup(device)
            base = gpu.allocated_bytes(device)
            gpu.reset_peak(device)
            out["ms"][name] = _time(fn, device, reps)
            peak = gpu.peak_bytes(device)
            out["peak_extra_bytes"][name] = None if peak is None else peak - base
        except Exception as exc:  # noqa: BLE001
            out["ms"][name] = None
            out.setdefault("errors", {})[name] = (
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            )
        gpu.cleanup(device)
        out["backends"][name] = _eligible(fn)
    return out
