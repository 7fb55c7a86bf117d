"""`python -m pipeline.bench.profile_compress`: what one layer's compression costs at prefill.

Layers of a model's shapes (random bf16 keys and queries) go through the prefill sequence a
policy sees: one-shot (the whole prompt, then one compression) or chunked (each chunk appended
to every layer, then each layer compressed, as one forward does). Layers store a chunk as the
cache does (`append_step`, with the engine's spare): kivi's compressing forwards then hold every
layer's wide rings until its compression (in the model, one layer at a time), so the peak here is
not the engine's; the attention between append and compression is not run (kivi's de-quantisation
is not in these times: `host_work`'s layer path and `profile_decode`'s prefill have it).

Only `compress_layer` is timed: synchronised wall clock around the loop over layers (so host
work that the GPU cannot hide counts), median of `--reps`; the peak is the allocator's peak
above what was allocated before the loop. `--profile` adds the top CUDA kernels of one layer's
compression and the number of kernels it launches. Every case prints a digest of the kept
positions, so two code versions can be compared on the same machine (same seeds, same kernels:
same tokens).

`--micro` times the selection primitives (sort, top-k) on the shapes the policies use.

Measured 2026-11-25, H100 80GB HBM3, torch 2.11, ratio 0.25, chunk 4096, 4 layers (Llama-8B
shapes, 32K) / 6 layers (SmolLM2 shapes, 8K); ms per layer over the prefill, median of 3, with
the previous code (sorts, a device sync before the work) -> this code (same kept digests):
  llama8b   snapkv one-shot 4.02 -> 3.50 (196 -> 133 kernels), pyramidkv 4.33 -> 3.57,
            adakv one-shot 7.45 -> 5.35 (318 -> 210 kernels)
  smollm2   snapkv one-shot 4.06 -> 1.83, chunked 6.61 -> 4.65; pyramidkv 3.99 -> 1.90,
            7.40 -> 4.05; adakv 4.03 -> 3.37, 9.22 -> 10.06 (chunked: the dense view's mask per
            head, a fix, changes what it computes)
Wall times here are host-bound (nothing to overlap with) and noisy; in the model the host work
hides behind the layer's GPU work once no sync waits for it. The one-shot top kernel then was a
1.05 ms generic elementwise copy, most likely the broadcast matmul of the window queries
materialising the float32 keys over the GQA group (removed since: one GEMM per kv head; not
re-measured).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import torch

from pipeline.bench.settings import MODEL_SHAPES
from pipeline.generate import Generator
from pipeline.kv_cache import StepContext
from policies import make_policy


def _shape(name: str) -> tuple[int, int, int, int]:
    """(query heads, kv heads, head_dim, layers) of the benchmark's named shapes."""
    c = MODEL_SHAPES[name]
    d = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_attention_heads"], c["num_key_value_heads"], d, c["num_hidden_layers"]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def kept_digest(layers) -> str:
    h = hashlib.md5()
    for layer in layers:
        pos = layer.kept_positions() if hasattr(layer, "kept_positions") else layer.positions
        h.update(pos.to(torch.int32).cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def run_case(policy_name, shapes, context, chunk, ratio, layers, dev, seed=0, profile=False):
    """(seconds of compression per layer over the whole prefill, peak bytes, digest, profile text)."""
    num_heads, kv_heads, d, model_layers = _shape(shapes)
    policy = make_policy(policy_name)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(seed)
    budget = max(1, round(ratio * context))
    budgets = torch.tensor([budget], device=dev)
    cache_layers = [policy.make_layer() for _ in range(layers)]
    keeps_all = policy.keeps_every_token
    chunk = chunk or context
    total, peak, prof_text = 0.0, 0, ""
    for lo in range(0, context, chunk):
        hi = min(context, lo + chunk)
        q = hi - lo
        positions = torch.arange(lo, hi, device=dev)[None]
        step = StepContext(
            cache=None,
            positions=positions,
            compress=True,
            row_budgets=budgets,
            padded=False,
            budgets_host=[budget],  # the host facts the engine hands every forward
            valid_host=[q],
            seen_host=[hi],
        )
        queries = []
        for layer in cache_layers:
            # the engine's spare (storage kept whole is sized once for the prompt) and its append
            layer.spare = Generator._spare_slots(not keeps_all, context, hi, 0)
            k = torch.randn(1, kv_heads, q, d, generator=g, device=dev, dtype=dtype)
            layer.append_step(k, k, step)
            queries.append(torch.randn(1, num_heads, q, d, generator=g, device=dev, dtype=dtype))
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
        last = hi == context
        if profile and last and dev.type == "cuda":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as tprofile

            with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                policy.compress_layer(cache_layers[0], queries[0], step, 0, model_layers, d**-0.5)
                _sync(dev)
            events = prof.key_averages()
            kernels = [e for e in events if e.device_type.name == "CUDA"]
            launches = sum(e.count for e in kernels)
            kernels.sort(key=lambda e: e.device_time_total, reverse=True)
            lines = [
                f"    {e.device_time_total / 1e3:7.3f} ms  x{e.count:<3d} {e.key[:90]}" for e in kernels[:10]
            ]
            prof_text = f"  one layer, last compression: {launches} kernels\n" + "\n".join(lines)
            start_layer = 1
        else:
            start_layer = 0
        t0 = time.perf_counter()
        for i in range(start_layer, layers):
            policy.compress_layer(cache_layers[i], queries[i], step, i, model_layers, d**-0.5)
        _sync(dev)
        total += time.perf_counter() - t0
        if dev.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(dev) - before)
        del queries
    timed_layers = layers - (1 if profile and dev.type == "cuda" else 0)
    return total / max(timed_layers, 1), peak, kept_digest(cache_layers), prof_text


def _time_ms(dev, fn, reps=20) -> float:
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / reps * 1e3


def _micro_case(dev, b, h, s, k) -> str:
    key = torch.randint(0, 2**62, (b, h, s), device=dev)
    f = torch.rand(b, h * s, device=dev)
    cases = {
        "int64 sort": lambda: key.sort(dim=-1, descending=True),
        "argsort stable": lambda: key.argsort(dim=-1, descending=True, stable=True),
        "topk sorted": lambda: key.topk(k, dim=-1),
        "topk unsorted": lambda: key.topk(k, dim=-1, sorted=False),
        f"float [{b},{h * s}] sort": lambda: f.sort(dim=-1, descending=True),
        "float topk": lambda: f.topk(min(h * k, h * s), dim=-1),
    }
    return ", ".join(f"{name} {_time_ms(dev, fn):.3f}" for name, fn in cases.items())


def micro(dev):
    for b, h, s, k in [(1, 8, 32768, 8192), (1, 3, 6144, 2048), (1, 8, 12288, 8192), (4, 8, 32768, 8192)]:
        print(f"  [{b},{h},{s}] k={k} (ms): {_micro_case(dev, b, h, s, k)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama8b", choices=["llama8b", "smollm2"])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--policies", default="snapkv,pyramidkv,adakv")
    ap.add_argument("--modes", default="oneshot,chunked")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    print(
        f"# compression cost per layer, {args.shapes} shapes, {args.context} tokens, "
        f"ratio {args.ratio} {args.tag}"
    )
    for name in args.policies.split(","):
        for mode in args.modes.split(","):
            chunk = args.chunk if mode == "chunked" else None
            runs = []
            prof_text = ""
            for rep in range(args.reps):
                sec, peak, digest, text = run_case(
                    name,
                    args.shapes,
                    args.context,
                    chunk,
                    args.ratio,
                    args.layers,
                    dev,
                    profile=args.profile and rep == 0,
                )
                prof_text = prof_text or text
                runs.append((sec, peak, digest))
            times = sorted(r[0] * 1e3 for r in runs)
            digests = {r[2] for r in runs}
            peak_mib = max(r[1] for r in runs) / 2**20
            print(
                f"{args.tag} {name:9s} {mode:8s} {statistics.median(times):7.3f} ms/layer "
                f"(min {times[0]:.3f}, max {times[-1]:.3f}), peak {peak_mib:7.1f} MiB, "
                f"kept {','.join(sorted(digests))}"
            )
            if prof_text:
                print(prof_text)
    if args.micro and dev.type == "cuda":
        micro(dev)


if __name__ == "__main__":
    main()
