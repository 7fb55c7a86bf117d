"""Where a decode step's time goes: the CUDA kernels of a few kvpipe decode steps, by policy.

    python -m pipeline.bench.profile_decode [--model llama8b|smollm2] [--layers 8] [--context 32768]
        [--batch 8] [--policies full,streaming_llm,snapkv] [--ratio 0.25] [--no-hf]

A development tool beside `kvpipe bench`: it builds the random model of the named shapes
(fewer layers by default, so that it starts fast; every layer does the same work), prefills
one row, tiles it to the batch, and prints the top kernels of the profiled decode steps and
the step time, for each policy, plus transformers' own decode for the full cache.
"""

from __future__ import annotations

import argparse
import time

import torch


def _top_kernels(prof, limit: int) -> list[tuple[str, float, int]]:
    rows = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if cuda_us and evt.key and not evt.key.startswith(("ProfilerStep", "aten::")):
            rows.append((evt.key[:90], cuda_us / 1e3, evt.count))
    return sorted(rows, key=lambda r: -r[1])[:limit]


def _kernel_ms(prof) -> float:
    """Summed device time of every kernel the profile saw (ms)."""
    total = 0.0
    for evt in prof.key_averages():
        if evt.key and not evt.key.startswith(("ProfilerStep", "aten::")):
            total += getattr(evt, "self_device_time_total", 0) or 0
    return total / 1e3


def main(argv=None) -> None:
    from pipeline.bench import gpu, measure
    from pipeline.bench.settings import BenchSettings
    from policies import Budget, make_policy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama8b", choices=["llama8b", "smollm2"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--policies", default="full,streaming_llm,snapkv")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' own decode")
    args = ap.parse_args(argv)

    gpu.prefer_expandable_segments()
    device = gpu.resolve_device("auto")
    dtype = torch.bfloat16 if gpu.is_cuda(device) else torch.float32
    settings = BenchSettings(model=args.model, contexts=(args.context,))
    bm = measure.build_model(settings, device, dtype, layers=args.layers)
    ids = measure.random_ids(bm, 1, args.context, 0)
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for name in args.policies.split(","):
            policy = make_policy(name)
            gen = measure.make_generator(bm, policy, Budget(ratio=args.ratio) if policy.compresses else None)
            measure.use_kvpipe_attention(bm)
            gpu.cleanup(device)
            base = gpu.allocated_bytes(device)
            gpu.reset_peak(device)
            measure.kvpipe_prefill(gen, ids, args.chunk, 3 + 2 * args.steps)  # warm: kernels, allocator
            gpu.sync(device)
            t0 = time.perf_counter()
            measure.kvpipe_prefill(gen, ids, args.chunk, 3 + 2 * args.steps)
            gpu.sync(device)
            wall_s = time.perf_counter() - t0
            gpu.cleanup(device)
            gpu.reset_peak(device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                pre = measure.kvpipe_prefill(gen, ids, args.chunk, 3 + 2 * args.steps)
                gpu.sync(device)
            peak = gpu.peak_bytes(device)
            # kernel time well under the wall time: the host (launches, Python) sets the pace
            print(
                f"\n== {name} chunked prefill: {wall_s * 1e3:.1f} ms wall (unprofiled), "
                f"{_kernel_ms(prof):.1f} ms of kernels"
            )
            _, stored = measure.kv_bytes(pre.cache)
            if peak is not None:
                gib = [round(x / 2**30, 2) for x in (peak - base, stored, peak - base - stored)]
                print(f"\n== {name} chunked prefill ({args.chunk}): peak-weights, cache, transient GiB {gib}")
            for key, ms, count in _top_kernels(prof, args.top):
                print(f"  {ms:8.3f} ms  x{count:<5d} {key}")
            state = measure.tile(pre, args.batch)
            measure.decode_steps(gen, state, 3)
            gpu.sync(device)
            marks = gpu.Marks(device)
            marks.mark()
            measure.decode_steps(gen, state, args.steps, marks)
            gpu.sync(device)
            step_ms = gpu.summary(marks.intervals())["median_ms"]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                measure.decode_steps(gen, state, args.steps)
                gpu.sync(device)
            layer = state.cache.layers[0]
            # stored bytes, not `layer.keys`: a storage form builds that view by de-quantising
            # or gathering the whole layer (an OOM at large batches)
            print(
                f"\n== {name}: {step_ms:.2f} ms/step at batch {args.batch}, {args.layers} layers; "
                f"layer 0 {type(layer).__name__} stores {layer.stored_bytes() / 2**20:.1f} MiB "
                f"has_empty={layer.has_empty} heads_differ={layer.heads_differ}"
            )
            for key, ms, count in _top_kernels(prof, args.top):
                print(f"  {ms / args.steps:8.3f} ms/step  x{count // args.steps:<4d} {key}")
            del pre, state
            gpu.cleanup(device)
        if args.no_hf:
            return
        try:  # its full cache at a compressed policy's batch often does not fit
            hf = measure.hf_generate(bm, args.batch, args.context, args.steps, 0)
            print(f"\n== transformers generate: {hf['step_ms']:.2f} ms/step at batch {args.batch}")
        except torch.OutOfMemoryError:
            print(f"\n== transformers generate: out of memory at batch {args.batch}")


if __name__ == "__main__":
    main()
