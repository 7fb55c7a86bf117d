"""KIVI decode on a GPU: the fused kernel's correctness and speed (`python -m pipeline.bench.check_kivi`).

Correctness: the fused kernel against the float64 reference (`decode_attention_reference`) on
fresh random ragged stores (bits 2 and 4, GQA groups 1 and 4, head_dim 64 and 128) and on
stores a real `QuantizedKVLayer` built at Llama-8B shapes; outputs are poisoned (NaN) first and
must be fully written. Timing (CUDA events, median; `triton.testing.do_bench`) at Llama-8B
shapes (32 query heads, 8 kv heads, head_dim 128, bf16), 32K tokens, batch 4 and 32:

- fused: the Triton kernel over the packed store (its defaults);
- deq+sdpa: the layer's de-quantised keys/values (its reference path), then SDPA's flash kernel
  (GQA folded into the query axis, no mask);
- sdpa-bf16: SDPA's flash kernel over a full-precision bf16 cache of the same length;
- step: one layer's whole decode step (append + flush + attend) with the fused kernel;
- sweep: the fused kernel's variants side by side (`SWEEP`, batch 4 and 75 at 2 bits:
  de-quantisation, block size, warps, pipeline stages, register cap, programs per SM; with
  `--baseline PATH` another kivi_kernels.py first, e.g. an earlier commit's, at its defaults),
  each checked against the float64 reference; a table per batch, fastest first;
- prefill: one layer's attention at 32K tokens (batch 1): one-shot (append + attend: flash over
  the forward's own tokens) and chunked (4096-token chunks: append + attend + flush each), time
  and peak memory above the inputs, against flash over a bf16 cache (`prefill-bf16`).

`--quick`: batch 4 and 75 at 2 bits only (with the sweep), no SDPA comparisons, no prefill.

Bytes are the fewest each must move (inputs read once; deq+sdpa also writes and reads back
bf16 keys/values). Full numbers go to $OUT/check_kivi.json (or ./check_kivi.json); a table last.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from pipeline.kv_cache import StepContext
from policies.kivi import QuantizedKVLayer
from policies.kivi_kernels import KiviStore, decode_attention, decode_attention_reference, dequantized

H, HKV, D = 32, 8, 128
DT = torch.bfloat16
DEV = "cuda"  # a CPU smoke test under TRITON_INTERPRET=1 sets "cpu" (and DT float16)
# kernel configurations timed at 2 bits (decode_attention keyword arguments)
SWEEP = [
    # the CUDA kernel (policies.kivi_cuda): programs per SM, its register budget (warps per SM:
    # 12 -> 168 registers each, 16 -> 128), the Triton tail's tile (block_n)
    dict(impl="cuda"),
    dict(impl="cuda", block_n=128),
    dict(impl="cuda", programs_per_sm=24),
    dict(impl="cuda", programs_per_sm=96),
    dict(impl="cuda", min_warps=16),
    # the Triton kernel
    dict(impl="triton"),
]
BASELINE = None  # --baseline PATH: another kivi_kernels.py (e.g. an earlier commit's), timed first
QUICK = False  # --quick: batch 4 and 75 at 2 bits, no SDPA comparisons


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _empty() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def rows(store: KiviStore, sl: slice) -> KiviStore:
    fields = {k: v[sl] if isinstance(v, torch.Tensor) else v for k, v in vars(store).items()}
    return KiviStore(**fields)


def reference64(q: torch.Tensor, store: KiviStore, scaling: float, chunk: int = 2) -> torch.Tensor:
    """float64 reference, a few rows at a time (bounded memory)."""
    outs = [
        decode_attention_reference(q[i : i + chunk], rows(store, slice(i, i + chunk)), scaling, torch.float64)
        for i in range(0, q.shape[0], chunk)
    ]
    return torch.cat(outs)


def random_store(b, h, d, bits, g, max_n, gen) -> KiviStore:
    gv = min(g, d)
    dev = DEV
    n = torch.randint(1, max_n + 1, (b, h), generator=gen)
    n[0, 0] = max_n
    nk = (torch.rand((b, h), generator=gen) * n / g).floor().long() * g
    nv = (torch.rand((b, h), generator=gen) * (n + 1)).floor().long().clamp(max=n)
    groups = -(-max_n // g) + 1

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(DT).to(dev)

    def u8(*shape):
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(dev)

    return KiviStore(
        n.to(dev), nk.to(dev), nv.to(dev),
        u8(b, h, groups, d, g * bits // 8), rnd(b, h, groups, d, scale=0.3).abs(), rnd(b, h, groups, d),
        rnd(b, h, 97, d), u8(b, h, max_n + 3, d * bits // 8),
        rnd(b, h, max_n + 3, d // gv, scale=0.3).abs(), rnd(b, h, max_n + 3, d // gv), rnd(b, h, 161, d),
        bits, g,
    )  # fmt: skip


def check_random(results: list) -> bool:
    ok = True
    gen = torch.Generator().manual_seed(1234)
    for bits in (2, 4):
        for group, d in ((1, 64), (4, 128), (4, 64), (1, 128)) if not QUICK else ((4, 128),):
            b, h, max_n = 3, 4, 5000
            store = random_store(b, h, d, bits, 32, max_n, gen)
            q = torch.randn((b, group * h, 1, d), generator=gen).to(DT).to(DEV)
            out = torch.full_like(q, float("nan"))
            decode_attention(q, store, d**-0.5, max_tokens=max_n, out=out)
            _sync()
            err = rel_err(out, reference64(q, store, d**-0.5))
            good = bool(torch.isfinite(out).all()) and err < 1e-2
            ok &= good
            results.append(dict(check="random", bits=bits, group=group, d=d, rel_err=err, ok=good))
            verdict = "ok" if good else "FAIL"
            print(f"random ragged store bits={bits} group={group} d={d}: rel err {err:.2e} {verdict}")
    return ok


def build_layer(b: int, n: int, bits: int, extra: int) -> QuantizedKVLayer:
    """A layer holding `n` prompt tokens per row (prefill + flush), sized for `extra` decode tokens."""
    layer = QuantizedKVLayer(bits, 32, 128)
    pos = torch.arange(n, device=DEV)[None].expand(b, n)
    chunk = 8192
    for lo in range(0, n, chunk):  # chunked appends bound the float32 temporaries of quantisation
        k = torch.randn((b, HKV, min(chunk, n - lo), D), device=DEV, dtype=DT)
        v = torch.randn_like(k)
        layer.append(k, v, pos[:, lo : lo + chunk])
        layer.note_padding(False)
        layer.flush()
        del k, v
    layer.reserve(extra)
    return layer


def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _label(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def _baseline_module():
    """The module at BASELINE, imported once under its own name."""
    import importlib.util

    if "kivi_kernels_baseline" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kivi_kernels_baseline", BASELINE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["kivi_kernels_baseline"] = module
        spec.loader.exec_module(module)
    return sys.modules["kivi_kernels_baseline"]


def kernel_times(fn, b: int, results: list, calls: int = 20) -> None:
    """The GPU time of each kernel of one call of `fn` (the fast blocks, the tail, the merge), from
    the torch profiler over `calls` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync()
    for event in prof.key_averages():
        us = event.device_time_total / calls
        if us > 0:
            results.append(dict(check="kernels", batch=b, kernel=event.key, us_per_call=us))
            print(f"kernels b={b}: {us:9.1f} us per call  {event.key[:90]}")


def _with_min_warps(attend, min_warps: int):
    """`attend` with `policies.kivi_cuda.MIN_WARPS` (a compile-time option) set for the call."""
    from policies import kivi_cuda

    def call(*args, **kw):
        saved, kivi_cuda.MIN_WARPS = kivi_cuda.MIN_WARPS, min_warps
        try:
            return attend(*args, **kw)
        finally:
            kivi_cuda.MIN_WARPS = saved

    return call


def sweep(q, store, layer, b, n, scaling, out, packed, results) -> None:
    """Every SWEEP configuration at this batch: median time and error against the float64 reference
    (poisoned output first, a few rows)."""
    few = slice(0, min(b, 4))
    ref = reference64(q[few], rows(layer._store(), few), scaling)
    baseline = [dict(baseline=BASELINE)] if BASELINE else []
    for cfg in baseline + SWEEP:
        kw = dict(cfg, max_tokens=n, out=out)
        attend = _baseline_module().decode_attention if "baseline" in kw else decode_attention
        kw.pop("baseline", None)
        if "min_warps" in kw:  # the CUDA kernel's compile-time option: the module's for this entry
            attend = _with_min_warps(attend, kw.pop("min_warps"))
        try:
            out.fill_(float("nan"))
            attend(q, store, scaling, **kw)  # compiles
            _sync()
            err = rel_err(out[few], ref)
            good = bool(torch.isfinite(out).all()) and err < 1e-2
            ms = bench(lambda kw=kw, attend=attend: attend(q, store, scaling, **kw))
        except Exception as e:  # e.g. shared memory, an option this triton lacks
            print(f"sweep b={b} {_label(cfg)}: {type(e).__name__}: {e}"[:300], flush=True)
            continue
        row = dict(check="sweep", config=_label(cfg), batch=b, tokens=n, bits=2, ms=ms, rel_err=err, ok=good)
        results.append(dict(row, gbs=packed / ms / 1e6))
        print(f"sweep b={b} {_label(cfg)}: {ms:.4f} ms {packed / ms / 1e6:.0f} GB/s err {err:.1e}"
              f"{'' if good else ' FAIL'}", flush=True)  # fmt: skip


def time_config(b: int, n: int, bits: int, results: list, copy_gbs: float) -> bool:
    _empty()
    scaling = D**-0.5
    layer = build_layer(b, n, bits, extra=64)
    store = layer._store_for_kernel()
    q = torch.randn((b, H, 1, D), device=DEV, dtype=DT)
    # correctness on the real layer's store (float64 reference, two rows at a time)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, store, scaling, max_tokens=n, out=out)
    _sync()
    few = slice(0, min(b, 4))  # the float64 reference over a few rows (time)
    err = rel_err(out[few], reference64(q[few], rows(layer._store(), few), scaling))
    ok = bool(torch.isfinite(out).all()) and err < 1e-2
    print(f"layer store b={b} n={n} bits={bits}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")

    packed = int(layer.kept_bytes_per_row().sum())
    t_fused = bench(lambda: decode_attention(q, store, scaling, max_tokens=n, out=out))
    if bits == 2 and SWEEP:
        sweep(q, store, layer, b, n, scaling, out, packed, results)
        decode_attention(q, store, scaling, max_tokens=n, out=out)  # the defaults' output again
    if DEV == "cuda":
        kernel_times(lambda: decode_attention(q, store, scaling, max_tokens=n, out=out), b, results)
    kv16 = b * HKV * n * D * 2 * 2
    folded = q.reshape(b, HKV, H // HKV, D)

    def deq_sdpa():
        k, v = layer.keys, layer.values
        return F.scaled_dot_product_attention(folded, k, v, scale=scaling)

    flash = (
        torch.nn.attention.SDPBackend.FLASH_ATTENTION if DEV == "cuda" else torch.nn.attention.SDPBackend.MATH
    )
    with torch.nn.attention.sdpa_kernel(flash):
        t_deq = bench(deq_sdpa) if b <= 4 and not QUICK else float("nan")
        kf = torch.randn((b if not QUICK else 1, HKV, n, D), device=DEV, dtype=DT)
        vf = torch.randn_like(kf)
        t_sdpa = (
            float("nan")
            if QUICK
            else bench(lambda: F.scaled_dot_product_attention(folded, kf, vf, scale=scaling))
        )
        lk, lv = dequantized(rows(layer._store(), few), n, DT)  # those rows only (memory at batch 75)
        ref16 = F.scaled_dot_product_attention(folded[few], lk, lv, scale=scaling)
        lk = lv = None
    err_deq = rel_err(out[few].reshape(-1, HKV, H // HKV, D), ref16)
    kf = vf = None
    _empty()

    # one layer's whole decode step: append (+ flush) + attend, the way the cache calls it
    times = []
    next_pos = torch.full((b, 1), n, device=DEV)
    for i in range(40):
        kn = torch.randn((b, HKV, 1, D), device=DEV, dtype=DT)
        vn = torch.randn_like(kn)
        step = StepContext(cache=None, positions=next_pos + i, padded=False)
        _sync()
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        layer.append(kn, vn, step.positions)
        layer.note_padding(False)
        layer.attend(q, step, scaling)
        if DEV == "cuda":
            end.record()
            _sync()
            if i >= 5:
                times.append(start.elapsed_time(end))
        else:
            times.append(1.0)
    t_step = sorted(times)[len(times) // 2]
    assert layer._hn.tolist() == layer._n.cpu().tolist()

    for name, ms, nbytes in (
        ("fused", t_fused, packed),
        ("deq+sdpa", t_deq, packed + 2 * kv16),
        ("sdpa-bf16", t_sdpa, kv16),
        ("step(append+attend)", t_step, packed),
    ):
        results.append(
            dict(
                check="time",
                name=name,
                batch=b,
                tokens=n,
                bits=bits,
                ms=ms,
                bytes=nbytes,
                gbs=nbytes / ms / 1e6,
                floor_ms=nbytes / copy_gbs / 1e6,
                rel_err=err,
                rel_err_vs_bf16=err_deq,
            )  # fmt: skip
        )
    layer = store = None
    _empty()
    return ok


def _peak_run(fn) -> tuple[float, float]:
    """(ms, peak GiB above what was allocated before) of one call of `fn`."""
    _sync()
    base = torch.cuda.memory_allocated() if DEV == "cuda" else 0
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    fn()
    if DEV != "cuda":
        return 0.0, 0.0
    end.record()
    _sync()
    return start.elapsed_time(end), (torch.cuda.max_memory_allocated() - base) / 2**30


def time_prefill(n: int, bits: int, results: list, chunk: int = 4096) -> bool:
    """One layer's prefill attention at `n` tokens, batch 1: one-shot and chunked, vs flash over bf16."""
    from torch.nn.attention.bias import causal_lower_right

    _empty()
    scaling = D**-0.5
    gen = torch.Generator(device=DEV).manual_seed(5)
    k = torch.randn((1, HKV, n, D), device=DEV, dtype=DT, generator=gen)
    v = torch.randn((1, HKV, n, D), device=DEV, dtype=DT, generator=gen)
    q = torch.randn((1, H, n, D), device=DEV, dtype=DT, generator=gen)
    pos = torch.arange(n, device=DEV)[None]
    outs = {}

    def oneshot():
        layer = QuantizedKVLayer(bits, 32, 128)
        layer.append(k, v, pos)
        layer.note_padding(False)
        outs["one"] = layer.attend(q, StepContext(cache=None, positions=pos, padded=False), scaling)
        layer.flush()

    def chunked():
        layer = QuantizedKVLayer(bits, 32, 128)
        parts = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            layer.append(k[:, :, lo:hi], v[:, :, lo:hi], pos[:, lo:hi])
            layer.note_padding(False)
            step = StepContext(cache=None, positions=pos[:, lo:hi], padded=False)
            parts.append(layer.attend(q[:, :, lo:hi], step, scaling))
            layer.flush()
        outs["chunked"] = torch.cat(parts, dim=2)

    def flash_one():
        outs["flash"] = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, enable_gqa=True
        )

    def flash_chunked():
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            bias = causal_lower_right(hi - lo, hi) if lo else None
            F.scaled_dot_product_attention(
                q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], attn_mask=bias, is_causal=not lo,
                scale=scaling, enable_gqa=True,
            )  # fmt: skip

    ok = True
    for name, fn in (
        ("prefill-oneshot", oneshot),
        ("prefill-bf16-oneshot", flash_one),
        ("prefill-chunked", chunked),
        ("prefill-bf16-chunked", flash_chunked),
    ):
        fn()  # warm-up
        ms, peak = _peak_run(fn)
        row = dict(check="prefill", name=name, tokens=n, bits=bits, chunk=chunk, ms=ms, peak_gib=peak)
        results.append(row)
        print(f"{name} n={n} bits={bits}: {ms:.2f} ms, peak {peak:.2f} GiB above the inputs")
    ref = outs["flash"]
    for name in ("one", "chunked"):
        err = rel_err(outs[name], ref)
        good = bool(torch.isfinite(outs[name]).all()) and err < (1e-2 if name == "one" else 0.5)
        ok &= good
        results.append(dict(check="prefill-err", name=name, bits=bits, rel_err_vs_bf16=err, ok=good))
        print(f"prefill {name} vs flash bf16: rel err {err:.2e} {'ok' if good else 'FAIL'}")
    return ok


def _fall_back_if_default_fails() -> None:
    """If the module's default de-quantisation does not compile on this triton, the next simpler one
    (so that one failure does not cost the whole run)."""
    from policies import kivi_kernels

    gen = torch.Generator().manual_seed(9)
    store = random_store(1, 2, D, 2, 32, 300, gen)
    q = torch.randn((1, 8, 1, D), generator=gen).to(DT).to(DEV)
    for deq in (kivi_kernels.DEFAULT_DEQ, 3, 1):
        try:
            decode_attention(q, store, D**-0.5, max_tokens=300, deq=deq)
            _sync()
        except Exception as e:
            print(f"default deq={deq} failed: {type(e).__name__}: {e}"[:400])
            continue
        kivi_kernels.DEFAULT_DEQ = deq
        print(f"default deq={deq}")
        return


def main() -> int:
    global QUICK, BASELINE
    QUICK = "--quick" in sys.argv[1:]
    if "--baseline" in sys.argv[1:]:
        BASELINE = sys.argv[sys.argv.index("--baseline") + 1]
    if not torch.cuda.is_available():
        print("check_kivi needs a CUDA GPU")
        return 2
    import triton

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    results: list = []
    _fall_back_if_default_fails()
    ok = check_random(results)
    buf = torch.empty(2**28, dtype=torch.float32, device=DEV)  # 1 GiB
    dst = torch.empty_like(buf)
    copy_ms = bench(lambda: dst.copy_(buf))
    copy_gbs = 2 * 2**28 * 4 / copy_ms / 1e6
    buf = dst = None
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    configs = [(4, 32768, 2), (75, 32768, 2), (4, 32768, 4), (32, 32768, 4)]
    if QUICK:
        configs = [(4, 32768, 2), (75, 32768, 2)]
        if torch.cuda.get_device_properties(0).total_memory > 100 * 2**30:  # an H200's largest kivi batch
            configs.append((150, 32768, 2))
    for b, n, bits in configs:
        ok &= time_config(b, n, bits, results, copy_gbs)
    if not QUICK:
        ok &= time_prefill(32768, 2, results)
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "check_kivi.json"), "w") as f:
        json.dump(dict(copy_gbs=copy_gbs, results=results), f, indent=1)
    print(
        f"\n{'what':<22}{'batch':>6}{'tokens':>8}{'bits':>5}{'ms':>10}{'MB':>10}{'GB/s':>8}{'floor ms':>10}"
    )
    for r in results:
        if r["check"] == "time":
            print(
                f"{r['name']:<22}{r['batch']:>6}{r['tokens']:>8}{r['bits']:>5}{r['ms']:>10.4f}"
                f"{r['bytes'] / 1e6:>10.1f}{r['gbs']:>8.0f}{r['floor_ms']:>10.4f}"
            )
    print(f"\n{'prefill (1 layer, batch 1)':<28}{'tokens':>8}{'bits':>5}{'ms':>10}{'peak GiB':>10}")
    for r in results:
        if r["check"] == "prefill":
            print(f"{r['name']:<28}{r['tokens']:>8}{r['bits']:>5}{r['ms']:>10.2f}{r['peak_gib']:>10.2f}")
    ok &= all(r["ok"] for r in results if r["check"] == "sweep")
    swept = [r for r in results if r["check"] == "sweep" and r["ok"]]
    for bsz in sorted({r["batch"] for r in swept}):
        print(f"\nsweep b={bsz} (2-bit), fastest first:")
        for r in sorted((r for r in swept if r["batch"] == bsz), key=lambda r: r["ms"]):
            print(f"  {r['ms']:8.4f} ms {r['gbs']:6.0f} GB/s  {r['config']}")
    errs = [r["rel_err"] for r in results if "rel_err" in r]
    print(f"correctness: {'all ok' if ok else 'FAILED'}; max rel err vs float64 {max(errs):.2e}")
    return 0 if ok and all(math.isfinite(e) for e in errs) else 1


if __name__ == "__main__":
    sys.exit(main())
