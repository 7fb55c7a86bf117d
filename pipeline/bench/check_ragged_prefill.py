"""`python -m pipeline.bench.check_ragged_prefill`: AdaKV's prefill on the GPU, against the exact path.

One layer at Llama-8B shapes (32 query heads, 8 kv heads, head_dim 128, bf16), one row: a
`RaggedKVLayer` as AdaKV leaves it after compressing a 32K prompt's first chunks ((row, head)
segments of `avg` tokens +-50%), plus a prefill chunk of 4096 tokens in its tail.

- attention: `attend` (one varlen flash call over each (row, head)'s segment + tail) vs
  `attend_masked` (the exact path: padded copy + [b, h, q, s] mask + SDPA) vs SDPA over a
  dense cache of the same average size (what snapkv's layer costs); relative error of both
  against the masked path in float32
- compression: `AdaKV.compress_layer` on the chunked layer and on a one-shot 32K layer
- model: chunked (4096) and one-shot prefill of a 32K prompt through an 8-layer random
  Llama-8B (`--layers`), full / snapkv / adakv: seconds and peak memory, and adakv's top kernels.

Time: median of `reps` after a warm-up (synchronised wall clock); peak: the allocator's peak
above what was allocated before the call. A short table is printed last.

Measured 2026-11-25 13:05, H100 80GB HBM3, torch 2.11 (`--skip-model`): chunk attention b=1:
  packed (one varlen flash call over segment + tail) 2.59 ms, 0.143 GiB; merged (store in place
  + tail, log-sum-exp merge) 2.79 ms, 0.221 GiB; masked 20.29 ms; dense flash over 12288 slots
  2.17 ms. b=2: 4.56 / 4.84 / 41.75 / 4.01 ms. Rel. error vs float32 2.3e-3 (packed and masked).
  Compression (sort-free selection, host-side budget tests): chunked b=1 3.19 ms, one-shot
  3.00 ms (0.877 GiB).

History: the same tool compared these with a frozen copy of the layer before the change
(removed since; its figures stay here). Earlier (the merged path), 2026-11-25, H100 80GB HBM3,
torch 2.11 (defaults: avg 8192 +-50%, chunk 4096, 32K):
  chunk attention b=1: new 2.86 ms, 0.221 GiB peak; old masked 20.51 ms, 6.111 GiB; SDPA flash
    over a dense 12288-slot cache 2.32 ms. b=2: 5.10 / 39.37 / 4.37 ms, 0.442 / 13.112 GiB.
    Rel. error vs float32: new 2.8e-3, old 2.3e-3 (bf16); new vs old 3.6e-3.
  compression (same kept tokens, new vs old code): chunked b=1 4.58 vs 4.24 ms (0.420 GiB both);
    one-shot b=1 6.70 vs 8.47 ms, 0.877 vs 1.003 GiB.
  model, 8 layers, one row: chunked full 0.453 s (1.46 GiB above weights), snapkv 0.582 s (0.85),
    adakv old 1.308 s (5.51), adakv new 0.659 s (0.79); one-shot full 0.346 s, snapkv 0.370,
    adakv old 0.393, new 0.392 (3.89 GiB). Kept tokens: one-shot identical in 8/8 layers;
    chunked identical in layer 0, later layers >= 94.4% of (head, position)s in common (the
    attention output differs from the masked path by bf16 rounding, 3.6e-3, and that feeds
    the next layers' queries).
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch

from pipeline.attention_math import dense_bias, grouped_attention
from pipeline.kv_cache import StepContext
from policies import make_policy
from policies.ragged_heads import RaggedKVLayer

GIB = 2**30
DEV = torch.device("cuda")  # `--device cpu`: a small smoke run of this script's own code


def measure(fn, reps=3):
    """(median seconds, peak bytes above the start, result of the last call)."""
    cuda = DEV.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = fn()  # warm-up (compiles, allocator)
    del out
    sync()
    times = []
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
        if i < reps - 1:
            del out
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    return statistics.median(times), peak, out


def build_state(b, h, d, avg, chunk, prefix_end, g, dtype, dev):
    lens = torch.randint(avg // 2, avg * 3 // 2 + 1, (b, h), generator=g)
    flat_pos = torch.cat(
        [torch.randperm(prefix_end, generator=g)[: int(n)].sort().values for n in lens.view(-1)]
    )
    n = int(lens.sum())
    return dict(
        lens=lens.to(dev),
        fk=torch.randn(n, d, generator=g).to(dev, dtype),
        fv=torch.randn(n, d, generator=g).to(dev, dtype),
        fp=flat_pos.to(dev, torch.int32),
        tk=torch.randn(b, h, chunk, d, generator=g).to(dev, dtype),
        tv=torch.randn(b, h, chunk, d, generator=g).to(dev, dtype),
        tpos=torch.arange(prefix_end, prefix_end + chunk, device=dev)[None].expand(b, chunk),
    )


def make_layer(st):
    layer = RaggedKVLayer()
    b, h, t, d = st["tk"].shape
    layer.lazy_initialization(st["tk"][:, :, :0], st["tv"][:, :, :0])
    if st["fk"].shape[0]:
        layer.flat_keys, layer.flat_values, layer.flat_positions = st["fk"], st["fv"], st["fp"]
        layer.seg_lens = st["lens"]
        layer._index_segments(int(st["lens"].max()))
    layer.append(st["tk"], st["tv"], st["tpos"])
    layer.note_padding(False)
    return layer


def kept_tokens(layer) -> int:
    return int(layer.seg_lens.sum())


def compress_row(label, st, q, step, policy, scaling):
    """AdaKV's compression of a layer built from `st`: time, peak, tokens kept."""

    def run():
        layer = make_layer(st)
        policy.compress_layer(layer, q, step, 0, 1, scaling)
        return layer

    t, m, layer = measure(run)
    return (label, t, m, f"kept {kept_tokens(layer)}")


def layer_rows(b, args, g, policy) -> list:
    dev, dtype = DEV, torch.bfloat16 if DEV.type == "cuda" else torch.float32
    h, group, d, chunk = 8, 4, 128, args.chunk
    scaling = d**-0.5
    # -- attention of one chunk ----------------------------------------------------------
    st = build_state(b, h, d, args.avg, chunk, args.context - chunk, g, dtype, dev)
    layer = make_layer(st)
    q = torch.randn(b, chunk, h * group, d, generator=g).to(dev, dtype).transpose(1, 2)
    step = StepContext(cache=None, positions=st["tpos"], padded=False)
    t_new, m_new, o_new = measure(lambda: layer.attend(q, step, scaling))
    t_mask, m_mask, o_mask = measure(lambda: layer.attend_masked(q, step, scaling))
    # float32 reference: the masked path over a float32 copy, 1024 queries at a time (memory)
    exact = make_layer({k: v.float() if v.is_floating_point() else v for k, v in st.items()})
    err_new = err_mask = float("nan")
    if b == 1:
        parts = []
        for lo in range(0, chunk, 1024):
            sub = StepContext(cache=None, positions=st["tpos"][:, lo : lo + 1024], padded=False)
            parts.append(exact.attend_masked(q[:, :, lo : lo + 1024].float(), sub, scaling))
        ref = torch.cat(parts, dim=2)
        err_new = float((o_new.float() - ref).norm() / ref.norm())
        err_mask = float((o_mask.float() - ref).norm() / ref.norm())
        del ref, parts
    del exact, o_new, o_mask
    s = args.avg + chunk
    dk = torch.randn(b, h, s, d, generator=g).to(dev, dtype)
    t_fl, m_fl, _ = measure(lambda: grouped_attention(q, dk, dk, dense_bias(chunk, s), scaling))
    print(f"attention b={b}: rel err vs fp32: packed {err_new:.2e} masked {err_mask:.2e}", flush=True)
    rows = [
        (f"chunk attn b={b} packed", t_new, m_new, f"err {err_new:.1e}"),
        (f"chunk attn b={b} masked", t_mask, m_mask, f"err {err_mask:.1e}"),
        (f"chunk attn b={b} dense flash", t_fl, m_fl, f"s={s}"),
    ]
    # -- compression of that layer (chunked mode), and of a one-shot layer -----------------
    budget = torch.full((b,), args.avg, device=dev)
    cstep = StepContext(cache=None, positions=st["tpos"], compress=True, row_budgets=budget, padded=False)
    rows.append(compress_row(f"compress chunked b={b}", st, q, cstep, policy, scaling))
    one = dict(st, fk=st["fk"][:0], fv=st["fv"][:0], fp=st["fp"][:0])
    one["tk"] = torch.randn(b, h, args.context, d, generator=g).to(dev, dtype)
    one["tv"] = torch.randn(b, h, args.context, d, generator=g).to(dev, dtype)
    one["tpos"] = torch.arange(args.context, device=dev)[None].expand(b, args.context)
    q1 = torch.randn(b, 64, h * group, d, generator=g).to(dev, dtype).transpose(1, 2)
    ostep = StepContext(
        cache=None, positions=one["tpos"][:, -64:], compress=True, row_budgets=budget, padded=False
    )
    rows.append(compress_row(f"compress one-shot b={b}", one, q1, ostep, policy, scaling))
    print("\n".join(f"{r[0]}: {r[1] * 1e3:.2f} ms {r[2] / GIB:.3f} GiB {r[3]}" for r in rows), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avg", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    global DEV
    DEV = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    policy = make_policy("adakv")
    table = []
    with torch.inference_mode():
        for b in (1, 2):
            try:
                table += layer_rows(b, args, g, policy)
            except Exception:  # report and go on: the other parts still measure
                traceback.print_exc()
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
        if not args.skip_model:
            table += model_rows(args)
    print(f"\n{'case':34s} {'ms':>9s} {'peak GiB':>9s}  note")
    for name, t, m, note in table:
        print(f"{name:34s} {t * 1e3:9.2f} {m / GIB:9.3f}  {note}")


def model_rows(args):
    from pipeline.bench import gpu
    from pipeline.bench import measure as bm_measure
    from pipeline.bench.settings import BenchSettings
    from policies import Budget

    dev = DEV
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    settings = BenchSettings(model="llama8b", contexts=(args.context,))
    bm = bm_measure.build_model(settings, dev, dtype, layers=args.layers)
    bm_measure.use_kvpipe_attention(bm)
    ids = bm_measure.random_ids(bm, 1, args.context, 0)
    rows = []
    for chunk in (args.chunk, None):
        for name in ("full", "snapkv", "adakv"):
            try:
                policy = make_policy(name)
                gen = bm_measure.make_generator(bm, policy, Budget(ratio=0.25) if policy.compresses else None)
                gpu.cleanup(dev)
                base = gpu.allocated_bytes(dev) or 0
                pre = bm_measure.kvpipe_prefill(gen, ids, chunk)  # warm-up
                del pre
                gpu.cleanup(dev)
                gpu.reset_peak(dev)
                gpu.sync(dev)
                t0 = time.perf_counter()
                pre = bm_measure.kvpipe_prefill(gen, ids, chunk)
                gpu.sync(dev)
                sec = time.perf_counter() - t0
                peak = (gpu.peak_bytes(dev) or 0) - base
                _, stored = bm_measure.kv_bytes(pre.cache)
                note = f"cache {stored / GIB:.3f} GiB"
                if name == "adakv":
                    note += f" kept {sum(kept_tokens(layer) for layer in pre.cache.layers)}"
                if name == "adakv" and cuda:  # where its time goes now
                    from torch.profiler import ProfilerActivity, profile

                    from pipeline.bench.profile_decode import _top_kernels

                    del pre
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        pre = bm_measure.kvpipe_prefill(gen, ids, chunk)
                        gpu.sync(dev)
                    print(f"top kernels, adakv prefill chunk={chunk}:")
                    for key, ms, count in _top_kernels(prof, 10):
                        print(f"  {ms:8.3f} ms  x{count:<5d} {key}")
                label = f"model {'chunked' if chunk else 'one-shot'} {name}"
                rows.append((label, sec, peak, note))
                print(label, f"{sec:.3f} s", f"{peak / GIB:.2f} GiB", note, flush=True)
                del pre, gen
            except Exception:  # report and go on
                traceback.print_exc()
    return rows


if __name__ == "__main__":
    main()
