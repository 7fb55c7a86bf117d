"""Where SpindleKV's one-shot prefill time goes, against the full cache's prefill, on the GPU.

    python -m pipeline.bench.profile_spindle_prefill [--layers 8] [--context 32768] [--reps 2]
        [--chunk 0] [--top 15]

Random-weight model of Llama-3.1-8B's shapes (fewer layers: every layer of a kind does the same
work; round(0.2 * layers) are codebook layers, the rest evict), one row of random ids. Prints:
- prefill wall time (synchronised) of full and spindlekv, median of `reps` (one warm-up first);
- the spindlekv prefill's phases, each timed by synchronising around it (so they add up to more
  than the plain run: attribution, not a timing): codebook building (`to_codebook`, and inside
  it `build_codebooks`, `_degrees`, `_greedy` with its linked-token count and steps), eviction
  (`SpindleKV._evict`, `received_attention`, `evict_unfolded`);
- the top CUDA kernels of one spindlekv prefill (torch profiler) and their total.
`--chunk N` profiles chunked prefill instead (N tokens per chunk).

Measured 2026-11-25, H100 80GB HBM3, 8 layers (2 codebook, 6 evicting), 32K, one row:
  one-shot: full 0.336 s; spindlekv 3.319 s at 411b454, of which the codebook greedy took 3.38 s
  (with timers): 7365 linked tokens (layer 0's values: repeated token ids give identical values),
  3529 centers, one greedy step each. With the batched greedy (64eeca7): 0.436 s, greedy 30 ms;
  what remains (with timers): codebooks 78 ms (neighbour counts 28 ms for 4 calls), evictions
  40 ms (6 layers), `evict_unfolded` 10 ms.
  chunked 4096 (64eeca7): full 0.447 s, spindlekv 0.709 s; with timers `_evict` 283 ms (48 calls,
  of which `evict_unfolded` 82, `attention_probs` 49, pooling 31), chunk appends 204 ms (64 calls;
  `_assign` 104, `_resolve_chunk` 47 over 7 calls), prefill attention over views 149 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

PHASES = defaultdict(lambda: [0, 0.0])  # name -> [calls, seconds]
GREEDY = []  # (sequences, linked tokens, steps) per `_greedy` call


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(name: str, fn):
    def wrapper(*args, **kwargs):
        _sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync()
        PHASES[name][0] += 1
        PHASES[name][1] += time.perf_counter() - t0
        if name == "_greedy":  # (sequences, linked tokens, centers)
            GREEDY.append((args[0].shape[0], args[0].shape[1], out[1].shape[1]))
        return out

    return wrapper


def _instrument():
    """Wrap the phases in `policies.spindlekv` / `spindle_kernels` (functions, methods); returns an undo.
    Times are inclusive: `append` contains `_assign`, which contains `best_match`."""
    import inspect

    from policies import spindle_kernels as sk
    from policies import spindlekv as sp

    layer = sp.SpindleLayer
    targets = [(sp, name) for name in ("build_codebooks", "_degrees", "_greedy", "received_attention")]
    targets += [(sp, name) for name in ("pool_in_position_order", "gather_front", "_resolve_chunk")]
    targets += [(sk, "best_match"), (sk, "pair_counts"), (sk, "self_pair_counts"), (sp.SpindleKV, "_evict")]
    targets += [(layer, name) for name in ("to_codebook", "evict_unfolded", "_view", "_assign", "append")]
    targets += [(layer, "attend")]
    saved = [(obj, name, inspect.getattr_static(obj, name)) for obj, name in targets]
    for obj, name, fn in saved:
        if isinstance(fn, staticmethod):
            setattr(obj, name, staticmethod(_timed(name, fn.__func__)))
        else:
            setattr(obj, name, _timed(name, fn))

    def undo():
        for obj, name, fn in saved:
            setattr(obj, name, fn)

    return undo


def _prefill_s(measure, gen, ids, chunk) -> float:
    _sync()
    t0 = time.perf_counter()
    pre = measure.kvpipe_prefill(gen, ids, chunk, 16)
    _sync()
    dt = time.perf_counter() - t0
    del pre
    return dt


def main(argv=None) -> None:
    from torch.profiler import ProfilerActivity, profile

    from pipeline.bench import gpu, measure
    from pipeline.bench.profile_decode import _top_kernels
    from pipeline.bench.settings import BenchSettings
    from policies import Budget, make_policy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    gpu.prefer_expandable_segments()
    device = gpu.resolve_device("auto")  # CPU (float32) only to try the script out at small sizes
    dtype = torch.bfloat16 if gpu.is_cuda(device) else torch.float32
    settings = BenchSettings(model="llama8b", contexts=(args.context,))
    bm = measure.build_model(settings, device, dtype, layers=args.layers)
    ids = measure.random_ids(bm, 1, args.context, 0)
    chunk = args.chunk or None
    label = f"chunked {chunk}" if chunk else "one-shot"
    with torch.inference_mode():
        gens = {}
        for name in ("full", "spindlekv"):
            policy = make_policy(name)
            gens[name] = measure.make_generator(
                bm, policy, Budget(ratio=args.ratio) if policy.compresses else None
            )
            measure.use_kvpipe_attention(bm)
            _prefill_s(measure, gens[name], ids, chunk)  # warm-up: kernels compile
            times = [_prefill_s(measure, gens[name], ids, chunk) for _ in range(args.reps)]
            runs = [round(t, 3) for t in times]
            print(f"{name} {label} prefill: {statistics.median(times):.3f} s (runs {runs})")
            gpu.cleanup(device)
        undo = _instrument()
        try:
            total = _prefill_s(measure, gens["spindlekv"], ids, chunk)
        finally:
            undo()
        print(f"\nspindlekv {label} prefill with phase timers: {total:.3f} s")
        for name, (calls, secs) in sorted(PHASES.items(), key=lambda kv: -kv[1][1]):
            print(f"  {secs * 1e3:9.1f} ms  x{calls:<4d} {name}")
        for g, k, centers in GREEDY:
            print(f"  _greedy: {g} sequences, {k} linked tokens (max), {centers} centers (max)")
        gpu.cleanup(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _prefill_s(measure, gens["spindlekv"], ids, chunk)
        rows = _top_kernels(prof, 10_000)
        print(f"\nspindlekv {label} prefill: CUDA kernel time {sum(r[1] for r in rows):.1f} ms; top kernels")
        for key, ms, count in rows[: args.top]:
            print(f"  {ms:8.3f} ms  x{count:<6d} {key}")


if __name__ == "__main__":
    main()
