"""`python -m pipeline.bench.check_ragged`: AdaKV's ragged decode attention on the GPU.

Checks, then times, one decode step of one layer at Llama-8B shapes (32 query heads, 8 kv
heads, head_dim 128, bf16) over a `RaggedKVLayer` whose (row, head)s keep `avg` tokens on
average, each between avg * (1 - spread) and avg * (1 + spread), plus a dense tail appended
one token at a time (the decode steps since compression):

- kernel: `RaggedKVLayer.attend` on its decode path (the Triton kernel over the flat store)
- dense+mask: `RaggedKVLayer.attend_masked`, the path every step took before (a padded
  [b, h, longest + tail, d] copy of the layer, then masked SDPA)
- flash-padded: SDPA with no mask over a dense cache padded to the longest head (what a
  plain padded cache would cost; a speed reference, not the same function)

Correctness: relative error ||out - ref|| / ||ref|| against a float32 torch reference, fresh
random inputs for each check, outputs poisoned with NaN first (every element must be
written). Timing: CUDA events around each call, median of `reps` after a warm-up.
Bytes: what each variant must read at least (keys and values of every kept token once,
plus query and output); GB/s = those bytes over the median time. The decode path is also run
under `torch.cuda.set_sync_debug_mode("error")` (no host sync) and its peak extra memory
is compared with the flat store's size (no copy of the store). CUDA-graph replays give GPU
time without the host's launch cost. A short table is printed last.

Measured 2026-11-25, H100 80GB HBM3, torch 2.11, triton 3.6, defaults (avg 8192 +-50%, tail
16); 1 GiB bf16 copy: 3006 GB/s (read + write). Floor = bytes needed / 3.0 TB/s.
  batch 16: 519 MB, floor 0.173 ms; kernel 0.191-0.198 ms (2.6-2.7 TB/s; graph replay 0.190),
            dense+mask 5.3-5.9 ms, SDPA over the padded cache (803 MB) 0.265 ms
  batch 48: 1607 MB, floor 0.535 ms; kernel 0.552 ms (2.91 TB/s), dense+mask 15.1 ms,
            SDPA padded (2419 MB) 0.800 ms (flash backend forced: 0.96)
  rel err vs float32 2.1e-3..2.3e-3 (bf16; the dense+mask path: the same); no host sync;
  peak extra memory 3.6 MB (dense+mask: 1.2 / 3.6 GB). Block/warps/stages/split variants
  within 5% of each other at batch 16 and 48.
  Batch 1 and 4 are host-bound in eager mode (~105-155 us of host time per call: two Triton
  launches, ~35 us each after their argument specialisation, plus allocations); graph replay
  0.048 ms (b 1; SDPA padded 0.030) and 0.067 ms (b 4; SDPA padded 0.073).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.attention_math import grouped_attention
from pipeline.kv_cache import EMPTY, StepContext
from policies import ragged_kernels as rk
from policies.ragged_heads import RaggedKVLayer


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def random_lens(b, h, avg, spread, g, device, empty_every=0):
    lo, hi = int(avg * (1 - spread)), int(avg * (1 + spread))
    lens = torch.randint(lo, hi + 1, (b, h), generator=g, device="cpu")
    if empty_every:
        lens.view(-1)[::empty_every] = 0
    return lens.to(device)


def make_layer(b, h, d, lens, tail, dtype, device, g, spare=64, padded_tail=False):
    """A RaggedKVLayer as AdaKV leaves it after compression, then `tail` decode appends."""
    n = int(lens.sum())
    layer = RaggedKVLayer()
    layer.spare = spare
    layer.lazy_initialization(
        torch.empty((b, h, 0, d), dtype=dtype, device=device),
        torch.empty((b, h, 0, d), dtype=dtype, device=device),
    )
    layer.flat_keys = torch.randn(n, d, generator=g, device=device).to(dtype)
    layer.flat_values = torch.randn(n, d, generator=g, device=device).to(dtype)
    layer.flat_positions = torch.zeros(n, dtype=torch.int32, device=device)  # all before the query
    layer.seg_lens = lens.to(torch.int64)
    layer._index_segments(int(lens.max()))
    pos = torch.full((b, 1), 10**6, device=device)
    for i in range(tail):
        new_pos = pos + i
        if padded_tail and i < tail // 2:
            new_pos = new_pos.clone()
            new_pos[0] = EMPTY
        k = torch.randn(b, h, 1, d, generator=g, device=device).to(dtype)
        layer.append(k, torch.randn(b, h, 1, d, generator=g, device=device).to(dtype), new_pos)
        layer.note_padding(padded_tail and i < tail // 2)
    return layer, pos + tail


def reference(layer: RaggedKVLayer, q: torch.Tensor, scaling: float) -> torch.Tensor:
    tail_pos = layer.positions if layer.has_empty else None
    return rk.ragged_decode_reference(
        q[:, :, 0],
        layer.flat_keys,
        layer.flat_values,
        layer.seg_lens,
        layer.keys,
        layer.values,
        tail_pos,
        scaling,
    )[:, :, None]


def poisoned_kernel(layer: RaggedKVLayer, q: torch.Tensor, scaling: float, **launch) -> torch.Tensor:
    out = torch.full((q.shape[0], q.shape[1], q.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    rk.ragged_decode_attention(
        q[:, :, 0],
        layer.flat_keys,
        layer.flat_values,
        layer.seg_offsets,
        layer.seg_lens32,
        layer.max_seg,
        layer.keys,
        layer.values,
        layer.positions if layer.has_empty else None,
        scaling,
        out=out,
        **launch,
    )
    return out[:, :, None]


def small_checks(device, seed) -> list[dict]:
    """Kernel vs float32 reference over a matrix of small ragged cases (fresh inputs each)."""
    rows = []
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for group in (1, 4):
            for d in (64, 128):
                for tail in (0, 16):
                    cases.append((dtype, group, d, tail, False, None))
    cases += [(torch.bfloat16, 4, 128, 16, True, None), (torch.bfloat16, 4, 128, 40, True, 8)]
    cases += [(torch.bfloat16, 4, 128, 16, False, 128), (torch.bfloat16, 8, 128, 5, False, 256)]
    for i, (dtype, group, d, tail, padded, chunk) in enumerate(cases):
        g = torch.Generator(device=device).manual_seed(seed + i)
        lens = random_lens(3, 4, 700, 0.9, torch.Generator().manual_seed(seed + i), device, empty_every=5)
        layer, _ = make_layer(3, 4, d, lens, tail, dtype, device, g, padded_tail=padded)
        q = torch.randn(3, 4 * group, 1, d, generator=g, device=device).to(dtype)
        ref = reference(layer, q, d**-0.5)
        out = poisoned_kernel(layer, q, d**-0.5, chunk=chunk)
        err = rel_err(out, ref)
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        rows.append(
            {
                "dtype": str(dtype).split(".")[-1],
                "group": group,
                "d": d,
                "tail": tail,
                "padded_tail": padded,
                "chunk": chunk,
                "rel_err": err,
                "ok": err == err and err < tol,
            }
        )
    return rows


def time_ms(fn, reps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def summary(times: list[float] | str) -> dict | str:
    if isinstance(times, str):  # an error message
        return times
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def graph_time_ms(fn, reps: int) -> list[float] | str:
    """Times of replays of a CUDA graph of `fn`: GPU time without the host's launch overhead."""
    try:
        fn()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay, reps)
    except Exception as exc:  # noqa: BLE001 - a call that cannot be captured is a datum
        return str(exc).splitlines()[0][:200]


def host_profile(fn, calls: int = 200, top: int = 14) -> str:
    """cProfile of `calls` calls (GPU not awaited): where the host's time per call goes."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(device) -> float:
    """Device-to-device copy of 1 GiB of bf16: (bytes read + written) / median time, in B/s."""
    return _copy(torch.randn(1 << 29, device=device).to(torch.bfloat16))


def _copy(src: torch.Tensor) -> float:
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), 20))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


LAUNCH_VARIANTS = [  # (block_n, num_warps, num_stages, chunk scale)
    (64, 4, 3, 1),
    (64, 4, 2, 1),
    (128, 4, 2, 1),
    (128, 8, 3, 1),
    (32, 4, 4, 1),
    (64, 4, 3, 0.5),
    (64, 4, 3, 2),
]


def shape_run(b, args, device, seed) -> dict:
    h, group, d = args.kv_heads, args.q_heads // args.kv_heads, args.head_dim
    g = torch.Generator(device=device).manual_seed(seed)
    lens = random_lens(b, h, args.avg, args.spread, torch.Generator().manual_seed(seed), device)
    q = torch.randn(b, h * group, 1, d, generator=g, device=device).to(torch.bfloat16)
    res = {"batch": b}
    res.update(_layer_part(b, h, d, lens, q, args, device, g))
    torch.cuda.empty_cache()
    padded = _padded_part(b, h, d, int(lens.max()) + args.tail, q, args, device, g)
    res["times"].update(padded.pop("times"))
    res.update(padded)
    torch.cuda.empty_cache()
    res["times"] = {k: summary(v) for k, v in res["times"].items()}
    return res


def _layer_part(b, h, d, lens, q, args, device, g) -> dict:
    """Correctness, syncs, memory and times of the RaggedKVLayer paths (the layer dies on return)."""
    scaling, elt = d**-0.5, 2
    layer, next_pos = make_layer(b, h, d, lens, args.tail, torch.bfloat16, device, g)
    n = layer.flat_keys.shape[0]
    step = StepContext(cache=None, positions=next_pos, padded=False)
    need = (n + b * h * args.tail) * d * elt * 2 + 2 * q.numel() * elt  # K+V once, query, output
    res = {"tokens": n, "max_seg": layer.max_seg, "bytes_needed": need}

    # correctness (poisoned output) of the layer's paths against float32
    ref = reference(layer, q, d**-0.5)
    res["rel_err_kernel"] = rel_err(poisoned_kernel(layer, q, scaling), ref)
    res["rel_err_layer_attend"] = rel_err(layer.attend(q, step, scaling), ref)
    res["rel_err_dense_mask"] = rel_err(layer.attend_masked(q, step, scaling), ref)

    # no host sync on the decode path; no copy of the flat store
    layer.attend(q, step, scaling)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer.attend(q, step, scaling)
        res["decode_syncs"] = "none"
    except RuntimeError as exc:
        res["decode_syncs"] = str(exc).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    res["kernel_peak_extra_bytes"] = peak_extra_bytes(lambda: layer.attend(q, step, scaling))
    res["flat_store_bytes"] = 2 * n * d * elt
    res["dense_mask_peak_extra_bytes"] = peak_extra_bytes(lambda: layer.attend_masked(q, step, scaling))

    # launch variants of the kernel: error and time each
    variants = []
    base_chunk = rk.split_size(n + b * h * args.tail, device)
    for bn, nw, ns, scale in LAUNCH_VARIANTS:
        launch = {"block_n": bn, "num_warps": nw, "num_stages": ns, "chunk": int(base_chunk * scale)}
        try:
            err = rel_err(poisoned_kernel(layer, q, scaling, **launch), ref)
            ms = statistics.median(
                time_ms(lambda launch=launch: poisoned_kernel(layer, q, scaling, **launch), args.reps)
            )
            variants.append({**launch, "rel_err": err, "median_ms": ms, "gbps": need / ms / 1e6})
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a datum
            variants.append({**launch, "error": str(exc).splitlines()[0][:200]})
    res["variants"] = variants
    res["chunk"] = base_chunk

    # host time to issue one decode call (two launches and three allocations), GPU not awaited
    calls = 100
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        layer.attend(q, step, scaling)
    res["host_us_per_call"] = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    res["host_profile"] = host_profile(lambda: layer.attend(q, step, scaling))
    res["times"] = {
        "kernel (layer.attend)": time_ms(lambda: layer.attend(q, step, scaling), args.reps),
        "kernel (CUDA graph replay)": graph_time_ms(lambda: layer.attend(q, step, scaling), args.reps),
        "dense+mask (old attend)": time_ms(
            lambda: layer.attend_masked(q, step, scaling), max(5, args.reps // 5)
        ),
    }
    return res


def _padded_part(b, h, d, width, q, args, device, g) -> dict:
    """SDPA with no mask over a dense bf16 cache of `width` slots per head (padded to the longest)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scaling = d**-0.5
    keys = torch.randn(b, h, width, d, generator=g, device=device).to(torch.bfloat16)
    values = torch.randn(b, h, width, d, generator=g, device=device).to(torch.bfloat16)
    res = {"padded_bytes": 2 * keys.numel() * 2 + 2 * q.numel() * 2, "times": {}}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        try:
            res["times"]["flash-padded (SDPA, no mask)"] = time_ms(
                lambda: grouped_attention(q, keys, values, None, scaling), args.reps
            )
        except RuntimeError as exc:
            res["flash_error"] = str(exc).splitlines()[0][:200]

    def sdpa():
        return F.scaled_dot_product_attention(q, keys, values, scale=scaling, enable_gqa=True)

    res["times"]["sdpa-padded (default backend)"] = time_ms(sdpa, args.reps)
    res["times"]["sdpa-padded (CUDA graph replay)"] = graph_time_ms(sdpa, args.reps)
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.check_ragged", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 48])
    parser.add_argument("--avg", type=int, default=8192, help="tokens kept per (row, head) on average")
    parser.add_argument("--spread", type=float, default=0.5, help="per-head lengths vary by +- this fraction")
    parser.add_argument("--tail", type=int, default=16)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile-batch", type=int, default=16, help="print the host profile of this batch")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for check_ragged.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_ragged needs a CUDA GPU", file=sys.stderr)
        return 2
    if not rk.triton_available():
        print("check_ragged needs triton", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    import triton

    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "args": vars(args),
    }
    report["copy_gbps"] = copy_bandwidth(device) / 1e9
    report["small_checks"] = small_checks(device, args.seed + 1000)
    report["shapes"] = [shape_run(b, args, device, args.seed + b) for b in args.batches]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "check_ragged.json").write_text(json.dumps(report, indent=1))

    print(f"# {report['device']}  torch {report['torch']}  triton {report['triton']}")
    print(f"copy bandwidth (read+write, 1 GiB bf16): {report['copy_gbps']:.0f} GB/s")
    bad = [r for r in report["small_checks"] if not r["ok"]]
    worst = max(r["rel_err"] for r in report["small_checks"])
    total = len(report["small_checks"])
    print(f"small checks: {total - len(bad)}/{total} ok, worst rel err {worst:.2e}")
    for r in bad:
        print("  FAILED", r)
    for s in report["shapes"]:
        print(
            f"\nbatch {s['batch']}: {s['tokens']} kept tokens (longest head {s['max_seg']}), "
            f"needs {s['bytes_needed'] / 1e6:.0f} MB; rel err kernel {s['rel_err_kernel']:.2e}, "
            f"layer.attend {s['rel_err_layer_attend']:.2e}, dense+mask {s['rel_err_dense_mask']:.2e}"
        )
        extra_kernel, extra_dense = s["kernel_peak_extra_bytes"] / 1e6, s["dense_mask_peak_extra_bytes"] / 1e6
        print(
            f"  decode syncs: {s['decode_syncs']}; peak extra memory: kernel {extra_kernel:.1f} MB, "
            f"dense+mask {extra_dense:.0f} MB (flat store {s['flat_store_bytes'] / 1e6:.0f} MB); "
            f"split {s['chunk']} tokens; host {s['host_us_per_call']:.0f} us per decode call"
        )
        for v in s["variants"]:
            name = f"bn={v['block_n']:>3} w={v['num_warps']} st={v['num_stages']} chunk={v['chunk']:>5}"
            if "error" in v:
                print(f"  variant {name}: {v['error']}")
            else:
                ms, gbps, err = v["median_ms"], v["gbps"], v["rel_err"]
                print(f"  variant {name}: {ms:.3f} ms  {gbps:.0f} GB/s  err {err:.1e}")
    profiled = [s for s in report["shapes"] if s["batch"] == args.profile_batch]
    if profiled:
        print(f"\nhost profile of layer.attend, batch {args.profile_batch} (200 calls):")
        print("\n".join(profiled[0]["host_profile"].strip().splitlines()[-16:]))
    print("\n| batch | path | median ms | bytes (MB) | GB/s |")
    print("|---|---|---|---|---|")
    for s in report["shapes"]:
        for name, t in s["times"].items():
            if not isinstance(t, dict):
                print(f"| {s['batch']} | {name} | failed: {t} | | |")
                continue
            nbytes = s["padded_bytes"] if "padded" in name else s["bytes_needed"]
            ms = t["median_ms"]
            print(f"| {s['batch']} | {name} | {ms:.3f} | {nbytes / 1e6:.0f} | {nbytes / ms / 1e6:.0f} |")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
