"""`python -m pipeline.bench.check_graphs`: CUDA-graph decode steps against eager ones, on the GPU.

Two parts:

- kernel: one layer's static-shape decode attention (`pipeline.decode_kernels`, Triton split-K
  over a [b, 8, capacity, 128] bf16 buffer, slot count read on the device) against a float32
  torch form of the same function (relative error) and against SDPA flash over the used slots
  (the dynamic step's attention): median time of CUDA events, eager and as a graph replay,
  and GB/s of the keys/values read.
- model: random-weight model of the named shapes (Llama-3.1-8B by default), one row prefilled
  (chunked, as the bench), tiled to each batch; per policy and batch, the same decode steps in
  the three modes of `pipeline.decode_graph` (eager: the dynamic step; static: the static step
  run eagerly; graphs: captured after 2 eager static steps, then replayed). Reported: step time
  (median of CUDA events per step, and wall time), graph captures/replays, greedy tokens of
  static and graphs vs eager (bf16: argmax ties may flip), graphs vs static (the same kernels:
  identical tokens, logits within bf16 noise).

    python -m pipeline.bench.check_graphs [--model llama8b] [--layers 32] [--context 8192]
        [--batches 4,32] [--policies full,snapkv,streaming_llm] [--ratio 0.25] [--steps 16]
        [--ragged 0] [--json out.json]

`--ragged P` prefills P rows of different lengths (left-padded: context, context - 37, ...)
instead of one row, so that the tiled batch's rows hold different counts (kivi's ragged static
step). kivi (`--policies kivi,snapkv+kivi`) quantises a value group every 32 decode tokens and a
key block every 128 (G 32, R 128): `--steps 160` crosses both inside the timed steps; a row's
`static_counts`/`graphs_counts` then say whether every step took the static step and how many
graphs were captured (one after the warm-up: flushes run before the replays, in place).

Measured 2026-11-25, H100 80GB HBM3, torch 2.11, transformers 5.17, triton 3.6, Llama-8B shapes
(32 layers), 8K context (commits ab2d8ba / 27491bd / bc79962):
  kernel, one layer, 8208 slots: batch 4 0.069 ms as a graph replay (1958 GB/s; SDPA flash
  0.059 ms), batch 32 0.372 ms (2893 GB/s; flash 0.414 ms); rel err vs float32 2.2e-3 (bf16).
  model, ms/step eager / static (eager) / graphs: full b4 31.0 / 48.6 / 10.8, b32 42.3 / 49.5 /
  20.9; snapkv@0.25 b4 49.1 / 56.4 / 9.4, b32 47.5 / 54.5 / 12.5; streaming_llm@0.25 b4 28.1 /
  26.7 / 9.4, b32 21.0 / 30.5 / 12.5 (a second run: full b4 20.4-26.6 / 27.0-36.2 / 10.1-10.2).
  graphs vs static: identical logits and tokens in every case. One step from the same state:
  static vs eager rel logit error 0.044, the float32-attention static step vs eager 0.044, top-1
  equal for every row (full, b4): the two steps are equally close; tokens over many steps
  diverge on this random-weight model in bf16 whichever form is used. Three warm-up steps
  (2 eager static + capture): 96-151 ms vs 61-74 ms eager.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
import torch.nn.functional as F


def _events_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _graph_of(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def check_kernel(batches, context: int, reps: int = 50) -> list[dict]:
    from pipeline import decode_kernels as dk
    from pipeline.attention_math import decode_backends

    rows = []
    h, group, d = 8, 4, 128
    for b in batches:
        cap, last = context + 32, context + 15
        g = torch.Generator(device="cuda").manual_seed(b)
        q = torch.randn(b, h * group, d, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(b, h, cap, d, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn(b, h, cap, d, device="cuda", generator=g, dtype=torch.bfloat16)
        pos = torch.arange(cap, device="cuda", dtype=torch.int32).expand(b, h, cap).contiguous()
        pos[0, :, :100] = -1  # a padded row
        last_t = torch.tensor([last], device="cuda")
        row = {"batch": b, "slots": last + 1}
        for name, p in (("dense", None), ("masked", pos)):
            out = dk.static_decode_attention(q, k, v, p, last_t, d**-0.5)
            ref = dk.static_decode_torch(q.float(), k.float(), v.float(), p, last_t, d**-0.5)
            row[f"rel_err_{name}"] = float((out.float() - ref).norm() / ref.norm())
            del ref
        nbytes = 2 * b * h * (last + 1) * d * 2
        kernel = functools.partial(dk.static_decode_attention, q, k, v, None, last_t, d**-0.5)
        sdpa = functools.partial(
            F.scaled_dot_product_attention,
            q[:, :, None],
            k[:, :, : last + 1],
            v[:, :, : last + 1],
            scale=d**-0.5,
            enable_gqa=True,
        )
        for name, fn in (("kernel", kernel), ("sdpa_flash", sdpa)):
            with decode_backends():
                ms = _events_ms(fn, reps)
                graph = _graph_of(fn)
                ms_graph = _events_ms(graph.replay, reps)
            row[f"{name}_ms"] = round(ms, 4)
            row[f"{name}_graph_ms"] = round(ms_graph, 4)
            row[f"{name}_graph_GBps"] = round(nbytes / ms_graph / 1e6, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        kernel = sdpa = graph = q = k = v = pos = None
        torch.cuda.empty_cache()
    return rows


def _one_step_agreement(gen, measure, pre, batch: int) -> dict:
    """One decode step from the same tiled state in each form: relative logit error and top-1 match.

    "torch" is the static step with the attention computed by `static_decode_torch` (float32
    inside): a calibration of how far two correct bf16 steps lie apart on this random model.
    """
    from pipeline import decode_kernels as dk
    from pipeline.bench import gpu

    logits = {}
    for form in ("eager", "static", "torch"):
        gen.decode.mode = "eager" if form == "eager" else "static"
        gen.decode.release()
        usable = dk.usable
        if form == "torch":
            dk.usable = lambda query: False
        try:
            state = measure.tile(pre, batch)
            tok = state.logits.argmax(-1)
            logits[form] = gen.decode_step(state.cache, tok, state.next_pos, state.budgets).float().clone()
        finally:
            dk.usable = usable
        del state
        gpu.cleanup(torch.device("cuda"))  # a cache and its StepContext form a cycle: collect it

    def rel(a, b):
        return float((logits[a] - logits[b]).norm() / logits[b].norm())

    def top1(a, b):
        return float((logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean())

    return {
        "step1_rel_static_vs_eager": rel("static", "eager"),
        "step1_rel_torch_vs_eager": rel("torch", "eager"),
        "step1_rel_static_vs_torch": rel("static", "torch"),
        "step1_top1_static_vs_eager": top1("static", "eager"),
        "step1_top1_torch_vs_eager": top1("torch", "eager"),
        "step1_top1_static_vs_torch": top1("static", "torch"),
    }


def _ragged_prefill(gen, bm, rows: int, context: int, chunk: int, after_prefill: int):
    """`measure.kvpipe_prefill` over `rows` left-padded rows of context, context - 37, ... tokens."""
    from pipeline.bench import measure
    from pipeline.kv_cache import EMPTY, CompressedCache
    from policies.base import row_budgets

    lengths = [context - 37 * i for i in range(rows)]
    ids = measure.random_ids(bm, rows, context, 0)
    col = torch.arange(context, device=ids.device)
    start = torch.tensor([context - n for n in lengths], device=ids.device)[:, None]
    positions = torch.where(col >= start, col - start, torch.full_like(ids, EMPTY))
    cache = CompressedCache(gen.num_layers, gen.policy)
    budgets = row_budgets(gen.budget, lengths, ids.device)
    logits = gen.prefill(cache, ids, positions, budgets, chunk, after_prefill, context - min(lengths))
    next_pos = torch.tensor(lengths, device=ids.device)
    return measure.Prefilled(cache, logits, budgets, next_pos)


def check_model(args) -> list[dict]:
    from pipeline.bench import gpu, measure
    from pipeline.bench.settings import BenchSettings
    from policies import Budget, make_policy

    device = torch.device("cuda")
    settings = BenchSettings(model=args.model, contexts=(args.context,))
    bm = measure.build_model(settings, device, torch.bfloat16, layers=args.layers)
    ids = measure.random_ids(bm, 1, args.context, 0)
    rows = []
    with torch.inference_mode():
        for pol_name in args.policies.split(","):
            policy = make_policy(pol_name)
            budget = Budget(ratio=args.ratio) if policy.compresses else None
            gen = measure.make_generator(bm, policy, budget)
            measure.use_kvpipe_attention(bm)
            if args.ragged:
                pre = _ragged_prefill(gen, bm, args.ragged, args.context, 4096, 3 + args.steps + 2)
            else:
                pre = measure.kvpipe_prefill(gen, ids, 4096, 3 + args.steps + 2)
            for batch in [int(x) for x in args.batches.split(",")]:
                agreement = _one_step_agreement(gen, measure, pre, batch)
                runs = {}
                for mode in ("eager", "static", "graphs"):
                    gen.decode.mode = mode
                    gen.decode.release()
                    gen.decode.counts = {"eager": 0, "captured": 0, "replayed": 0}
                    gpu.cleanup(device)
                    state = measure.tile(pre, batch)
                    torch.cuda.synchronize()
                    w0 = time.perf_counter()
                    measure.decode_steps(gen, state, 3)  # graphs: 2 eager static steps, then the capture
                    torch.cuda.synchronize()
                    warm = (time.perf_counter() - w0) * 1e3
                    marks = gpu.Marks(device)
                    marks.mark()
                    tokens, logits = [], []
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        tok = state.logits.argmax(-1)
                        out = gen.decode_step(state.cache, tok, state.next_pos, state.budgets)
                        state.next_pos = state.next_pos + 1
                        state.logits = out
                        marks.mark()
                        tokens.append(out.argmax(-1))
                        logits.append(out[:, :64].clone())
                    torch.cuda.synchronize()
                    wall = (time.perf_counter() - t0) / args.steps * 1e3
                    runs[mode] = {
                        "step_ms": gpu.summary(marks.intervals())["median_ms"],
                        "wall_step_ms": wall,
                        "tokens": torch.stack(tokens).cpu(),
                        "logits": torch.stack(logits).float().cpu(),
                        "counts": dict(gen.decode.counts),
                        "warmup_ms": warm,
                    }
                    del state
                gen.decode.release()
                e, s, g = runs["eager"], runs["static"], runs["graphs"]
                row = {
                    "policy": pol_name,
                    "batch": batch,
                    "context": args.context,
                    "ragged_rows": args.ragged,
                    "layers": bm.config.num_hidden_layers,
                    **{f"{m}_step_ms": round(runs[m]["step_ms"], 3) for m in runs},
                    **{f"{m}_wall_ms": round(runs[m]["wall_step_ms"], 3) for m in runs},
                    **{f"{m}_3_warmup_steps_ms": round(runs[m]["warmup_ms"], 1) for m in runs},
                    "graphs_counts": g["counts"],
                    "static_counts": s["counts"],
                    "tokens_static_vs_eager": float((s["tokens"] == e["tokens"]).float().mean()),
                    "tokens_graphs_vs_eager": float((g["tokens"] == e["tokens"]).float().mean()),
                    "tokens_graphs_vs_static": float((g["tokens"] == s["tokens"]).float().mean()),
                    "logit_maxdiff_graphs_vs_static": float((g["logits"] - s["logits"]).abs().max()),
                    **agreement,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            del pre, gen
            gpu.cleanup(device)
    return rows


def main(argv=None) -> None:
    from pipeline.bench import gpu

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama8b")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the model's (0: all)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batches", default="4,32")
    ap.add_argument("--policies", default="full,snapkv,streaming_llm")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--ragged", type=int, default=0, help="prefill this many rows of different lengths")
    ap.add_argument("--no-kernel", action="store_true")
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    gpu.prefer_expandable_segments()
    if not torch.cuda.is_available():
        raise SystemExit("check_graphs needs a CUDA device")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.no_kernel:
        result["kernel"] = check_kernel([int(x) for x in args.batches.split(",")], args.context)
    if not args.no_model:
        result["model"] = check_model(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
