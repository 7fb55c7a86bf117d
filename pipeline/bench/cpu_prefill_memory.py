"""Where a chunked prefill's transient memory goes, on the CPU (no GPU needed).

    python -m pipeline.bench.cpu_prefill_memory [--policy spindlekv] [--context 8192] [--chunk 4096]

Random-weight model of SmolLM2's shapes in float32, one row of random ids, `kvpipe_prefill` under the
torch profiler with `profile_memory=True`. Prints the peak of live CPU allocations above the start
(running sum of the allocator's events), the ops active at that peak, and per labelled phase (the
policy's functions below) the largest rise of live memory within one call. float32 is twice bf16 for
the model's tensors; the policies' float32 temporaries are the same size on the GPU. CPU attention
(SDPA's CPU kernels materialise causal masks) is not what the GPU runs: read the phases.

Measured 2026-11-25 (2-core CPU, torch 2.13), spindlekv, SmolLM2 shapes, chunk 4096, ratio 0.25:
  8K: peak 784.3 MiB at 6d3369b, inside `_resolve_chunk` (579 MiB: the whole [P, q, C]
  float32 similarity matrix and its masked copy); after the blocked resolution 648.4 MiB, set by CPU
  SDPA; `_resolve_chunk` 42 MiB, `_degrees` (CPU path) 435 -> 39 MiB. 32K: `_resolve_chunk`
  579 -> 43 MiB. snapkv at 8K: 463.6 MiB (CPU SDPA).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import inspect
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MIB = 2**20


def _label(owner, name: str) -> None:
    """Wrap owner.name in a profiler range `PH:name` (static methods stay static)."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function("PH:" + name):
            return fn(*args, **kwargs)

    setattr(
        owner,
        name,
        staticmethod(wrapper) if isinstance(inspect.getattr_static(owner, name), staticmethod) else wrapper,
    )


def _instrument() -> None:
    import policies.signals as sig
    import policies.spindlekv as sp

    for name in ("build_codebooks", "_degrees", "_greedy", "_resolve_chunk"):
        _label(sp, name)
    for name in ("_assign", "to_codebook", "evict_unfolded", "attend", "append", "_view"):
        _label(sp.SpindleLayer, name)
    _label(sp.SpindleKV, "_evict")
    _label(sig, "attention_probs")
    sp.attention_probs = sig.attention_probs


def _phases(mem: list, ops: list) -> dict:
    """Per phase: (calls, largest rise of live bytes within one call)."""
    times = [t for t, _ in mem]
    live, cur = [], 0
    for _, nbytes in mem:
        cur += nbytes
        live.append(cur)
    out = defaultdict(lambda: [0, 0])
    for name, start, end in ops:
        if not name.startswith("PH:"):
            continue
        i, j = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        if j <= i:
            continue
        rise = max(live[i:j]) - (live[i - 1] if i else 0)
        out[name][0] += 1
        out[name][1] = max(out[name][1], rise)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="spindlekv")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=0.25)
    args = ap.parse_args()

    from pipeline.bench import measure
    from pipeline.bench.settings import BenchSettings
    from policies.base import Budget
    from policies.registry import make_policy

    bm = measure.build_model(
        BenchSettings(model="smollm2", contexts=(args.context,)), torch.device("cpu"), torch.float32
    )
    gen = measure.make_generator(bm, make_policy(args.policy), Budget(ratio=args.ratio))
    measure.use_kvpipe_attention(bm)
    ids = measure.random_ids(bm, 1, args.context, args.context)
    _instrument()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        measure.kvpipe_prefill(gen, ids, args.chunk)
    raw = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]")
    ops = [(e.name(), e.start_ns(), e.end_ns()) for e in raw if e.name() != "[memory]"]
    cur = peak = 0
    at = None
    for t, nbytes in mem:
        cur += nbytes
        if cur > peak:
            peak, at = cur, t
    active = sorted((o for o in ops if o[1] <= at <= o[2]), key=lambda o: o[1])
    print(f"{args.policy} {args.context} chunk {args.chunk}: peak {peak / MIB:.1f} MiB above the start")
    print("active at the peak:", " > ".join(o[0] for o in active))
    for name, (calls, rise) in sorted(_phases(mem, ops).items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:24s} calls {calls:4d}  largest rise {rise / MIB:8.1f} MiB")


if __name__ == "__main__":
    main()
