"""`python -m pipeline.bench.check_window`: the fused window-attention sums on the GPU, beside torch.

    python -m pipeline.bench.check_window [--contexts 8192,32768] [--window 32] [--reps 50]

For Llama-8B and SmolLM2 shapes (bf16, one row), the attention the last `window` queries give each
slot, summed over the queries, as the attention-score policies need it:
- torch: `signals.attention_probs(...).sum(dim=2)` (float32 logits GEMM, mask, softmax, sum);
- fused: `window_kernels.window_sums` (two passes over the keys, `signals.received_attention`).

Correctness: max and relative error of each against the float64 reference (fresh random inputs,
the fused output poisoned with NaN first: every element must be written), and whether the two
choose the same top quarter of slots. Timing: CUDA events, median of `reps` after a warm-up;
the floor is two reads of the keys over the copy bandwidth measured in the same run. A table is
printed last.
"""

from __future__ import annotations

import argparse

import torch

from pipeline.bench.check_graphs import _events_ms
from pipeline.bench.settings import MODEL_SHAPES
from pipeline.kv_cache import KVLayer
from policies import window_kernels as wk
from policies.signals import attention_probs


def _median_ms(fn, reps: int) -> float:
    """Median CUDA-event time of `fn` after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    return _events_ms(fn, reps)


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB bf16 device copy."""
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def check(shape: str, context: int, window: int, reps: int, bandwidth: float) -> dict:
    c = MODEL_SHAPES[shape]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or c["hidden_size"] // heads
    g = torch.Generator(device="cuda").manual_seed(context)
    keys = torch.randn(1, kv_heads, context, d, device="cuda", dtype=torch.bfloat16, generator=g)
    queries = torch.randn(1, heads, window, d, device="cuda", dtype=torch.bfloat16, generator=g)
    positions = torch.arange(context, device="cuda")[None]
    layer = KVLayer()
    layer.append(keys, keys, positions)
    layer.note_padding(False)
    qpos, slots = positions[:, -window:], layer.positions
    scaling = d**-0.5

    def torch_path():
        return attention_probs(layer, queries, qpos, scaling, newest=True).sum(dim=2)

    def fused():
        return wk.window_sums(keys, queries, qpos, slots, scaling)

    ref = wk.window_sums_reference(keys, queries, qpos, slots, scaling)
    out = {"shape": shape, "context": context, "window": window}
    results = {}
    for name, fn in (("torch", torch_path), ("fused", fused)):
        got = fn()
        if name == "fused":  # every element written: poison a fresh output
            got.fill_(float("nan"))
            got = fn()
        results[name] = got
        err = (got.double() - ref).norm() / ref.norm()
        out[f"{name}_rel_err"] = float(err)
        out[f"{name}_nan"] = bool(got.isnan().any())
        out[f"{name}_ms"] = _median_ms(fn, reps)
    k = context // 4
    top = [set(r.sum(1)[0].topk(k).indices.tolist()) for r in (results["torch"], results["fused"])]
    out["same_top_quarter"] = len(top[0] & top[1]) / k
    out["floor_ms"] = 2 * keys.numel() * keys.element_size() / bandwidth * 1e3
    out["speedup"] = out["torch_ms"] / out["fused_ms"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("check_window needs a CUDA device")
    bandwidth = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = [
        check(shape, int(n), args.window, args.reps, bandwidth)
        for shape in ("llama8b", "smollm2")
        for n in args.contexts.split(",")
    ]
    print(
        "| shape | ctx | torch ms | fused ms | torch / fused | floor ms | rel err torch / fused "
        "| top 1/4 equal | NaN |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['context']} | {r['torch_ms']:.3f} | {r['fused_ms']:.3f} "
            f"| {r['speedup']:.2f}x "
            f"| {r['floor_ms']:.3f} | {r['torch_rel_err']:.1e} / {r['fused_rel_err']:.1e} "
            f"| {r['same_top_quarter']:.4f} | {r['torch_nan'] or r['fused_nan']} |"
        )


if __name__ == "__main__":
    main()
