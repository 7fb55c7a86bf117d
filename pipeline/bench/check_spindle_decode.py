"""SpindleKV decode on the GPU: the codebook kernel's tensor-core path against its float32 path, the
fused match against the separate one, and the decode step as a CUDA graph with and without it.

    python -m pipeline.bench.check_spindle_decode [--layers 8] [--context 32768] [--batches 4,48,109]
        [--steps 8] [--no-model] [--sweep] [--union ROWS:SHARE,...] [--shapes llama8b|smollm2]
        [--order random|sequential] [--json PATH]

Kernel (one codebook layer at Llama-8B decode shapes: 32 query heads, 8 kv heads, head_dim 128,
or with `--shapes smollm2` SmolLM2's: 9 query heads, 3 kv heads, head_dim 64; the model part
builds that model too; bf16; fresh random storage whose every book entry is read by some token;
per batch of `--batches` at `--context` tokens without RoPE, and batch 4 at 8K with RoPE, where
only the float32 path runs):
  agreement: the tensor-core attention (`spindle_decode`, the default there) against the float32
  path (`mma=False`) and, where it fits, the float32 reference (relative error < 1e-2: bf16 output
  and probabilities); for each path, `spindle_decode_match` against `best_match` over each book
  (cosine within 1e-5: bf16 products are exact in float32 on either side; the same entry where the
  best cosine leads the next by more than that) and its partials (free slot empty) against the
  same path's `spindle_decode` (< 1e-3).
  times (CUDA events, median): attention on the float32 path and on the tensor-core path; the
  fused attention + match (with the reduce, as a decode step uses it) on each path; `best_match`
  on both books; attention + `best_match` on both books (the separate match). Each with its
  bandwidth share: bytes read / time / the device copy bandwidth measured in the same run
  (`gpu.copy_bandwidth`). Bytes: attention reads per stored token its gathered key and value book
  rows, two int16 indices and two bf16 magnitudes (and int32 positions with RoPE), plus the
  queries and the output; `best_match` reads both books once.
  --sweep: the tensor-core path's launch alternatives (block_n, warps, stages, splits) at the
  largest batch, attention and fused. By default the storage's tokens read their entries in random
  order (the worst case for locality); the model's codebooks of random weights are read nearly in
  order (`--order sequential` builds that), and a launch the random order prefers may lose there:
  confirm it with `profile_decode` before adopting it (SmolLM2's shapes: 64-token blocks won the
  random-order sweep and lost in the model, `spindle_kernels`).

--union ROWS:SHARE,...: only the deep (evicted) layers' decode, per batch: the union kernel
(`union_decode`: each kv head's kept rows read once, member bits) against the per-head kernel (each
query head's rows through its indices) on random storage of ROWS union rows per kv head, each kept
by each query head with probability SHARE (at least one): agreement (< 1e-2, bf16) and times with
bandwidth shares (bytes each must read: rows, member bytes or int16 indices, queries, output).

Model (random weights of Llama-3.1-8B's shapes, `--layers` of them, one row prefilled in 4096-token
chunks and tiled to each batch): decode steps in the graphs mode with `FUSED_MATCH` on and off:
step time (CUDA events, median), captures/replays, and per step the logits' relative difference
and greedy token agreement between the two (bf16: the two compute the same function in a
different summation order).

Measured 2026-11-25, H100 80GB HBM3, torch 2.11, triton 3.6 (code b13b877, before the tensor-core
path; the float32 path's fused match):
  kernel: every case agrees (cosines within 4e-7, the same entries, partials equal to
  `spindle_decode`); batch 4, 8K: fused 0.328 ms vs 0.505 ms apart (attention alone 0.147);
  batch 48, 32K: fused 5.81 ms vs 5.12 ms apart (attention alone 3.35); batch 4, 8K with RoPE:
  0.577 vs 0.963 ms.
  model, 8 layers, 32K, graph steps: batch 4 4.21 ms fused vs 3.65 ms apart, batch 48 13.55 vs
  13.78 ms; logits within 1.8% relative (bf16), greedy tokens equal.
The tensor-core path on an H200: `benchmarks/results/check_spindle_decode-h200-20261203.json`.
--union on an H200 (code 2519fd7, 2400 or 1200 union rows per kv head, `check_spindle_decode
--union 2400:0.5,2400:0.25,1200:0.75 --batches 48,100`): every case agrees (2.3e-3); batch 100:
union 0.241 / 0.241 / 0.130 ms (~93-100% of the copy bandwidth) against per-head 0.788 / 0.583 /
0.512 ms (72-77%), 1.75-3.25 query heads reading each union row; batch 48: 0.21 / 0.12 / 0.13 ms
against 0.45 / 0.33 / 0.29 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import torch

from pipeline.bench.check_spindle import time_ms
from policies import spindle_kernels as sk
from policies import spindlekv
from policies.seqstore import compact

# kv heads, query heads a kv head, head_dim of each model's layers (`--shapes`; Llama-8B's by default)
SHAPES = {"llama8b": (8, 4, 128), "smollm2": (3, 3, 64)}
HK, GROUP, D = SHAPES["llama8b"]
ORDER = "random"  # how the tokens read their book entries (`_storage`; --order)
REFERENCE_ELEMENTS = 1 << 29  # the float32 reference's dense [b, H, s, d] keys fit (2 GiB each)


def _storage(b, hk, group, d, s, rope_theta, gen, dev):
    """Codebook storage whose every book entry is read: the first tokens take each entry once (in
    random order, or with ORDER "sequential" in entry order, as the model's codebooks of random
    weights are read), the rest repeat random entries."""
    ck, cv = s - s // 8, s - s // 4

    def book(c):
        x = torch.randn(b, hk, c, d, generator=gen, device=dev)
        return (x / x.norm(dim=-1, keepdim=True)).to(torch.bfloat16)

    def index(c):
        if ORDER == "sequential":
            first = torch.arange(c, device=dev).expand(b, hk, c)
        else:
            first = torch.rand(b, hk, c, generator=gen, device=dev).argsort(dim=-1)
        rest = torch.randint(0, c, (b, hk, s - c), generator=gen, device=dev)
        return torch.cat([first, rest], dim=-1).to(torch.int16)

    return dict(
        query=torch.randn(b, hk * group, d, generator=gen, device=dev).to(torch.bfloat16),
        kbook=book(ck), vbook=book(cv), rk=index(ck), rv=index(cv),
        mk=(torch.rand(b, hk, s, generator=gen, device=dev) * 20 + 1).to(torch.bfloat16),
        mv=(torch.rand(b, hk, s, generator=gen, device=dev) * 3 + 0.2).to(torch.bfloat16),
        pos=torch.arange(s, device=dev, dtype=torch.int32).expand(b, hk, s).contiguous(),
        n=torch.full((b, hk), s, device=dev, dtype=torch.int64), scaling=d**-0.5, rope_theta=rope_theta,
    )  # fmt: skip


def attention_bytes(st) -> int:
    """Bytes one attention pass moves: per stored token its key and value book rows (gathered),
    indices and magnitudes (positions with RoPE); the queries and the output."""
    tokens = int(st["n"].sum())
    d, row = st["kbook"].shape[-1], st["kbook"].element_size()
    per_token = 2 * d * row + sum(st[x].element_size() for x in ("rk", "rv", "mk", "mv"))
    if st["rope_theta"] is not None:
        per_token += st["pos"].element_size()
    return tokens * per_token + 2 * st["query"].numel() * st["query"].element_size()


def book_bytes(st) -> int:
    """Bytes `best_match` reads on both books: every entry once."""
    return sum(st[x].numel() * st[x].element_size() for x in ("kbook", "vbook"))


def _match(book, x, r):
    """`best_match` of one new vector per (row, kv head) over the whole book: ([b, hk], [b, hk])."""
    b, hk, c, d = book.shape
    P = b * hk
    ones = torch.ones(P, dtype=torch.long, device=book.device)
    best, arg = sk.best_match(x.reshape(P, 1, d), r.reshape(P, 1), book.reshape(P, c, d), ones, ones * c)
    return best.reshape(b, hk), arg.reshape(b, hk)


def _lead(book, x, r, rows: int = 8) -> torch.Tensor:
    """[b, hk]: how far the best cosine of x with the book leads the runner-up (float32, by rows)."""
    out = []
    for lo in range(0, book.shape[0], rows):
        cos = torch.einsum("bhcd,bhd->bhc", book[lo : lo + rows].float(), x[lo : lo + rows].float())
        top = (cos * r[lo : lo + rows, :, None]).topk(2, dim=-1).values
        out.append(top[..., 0] - top[..., 1])
    return torch.cat(out)


def _fused(st, xk, xv, rx, **launch):
    """Attention with the match fused, reduced as a decode step uses it (its free slot, the new
    token's term, three small writes in a step, emptied here): (attention, best, arg)."""
    part, best, arg = sk.spindle_decode_match(**st, xk=xk, xv=xv, rx=rx, **launch)
    part.pm[..., -1], part.pl[..., -1], part.pacc[..., -1, :] = float("-inf"), 0.0, 0.0
    return sk.reduce_partials(part, torch.bfloat16), best, arg


def _rel(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _new_token(st, gen):
    """A new key close to a book entry (a clear match) and a random value, bf16; their 1 / norms."""
    b, hk, _, d = st["kbook"].shape
    dev = st["kbook"].device
    xk = st["kbook"][:, :, 3].float() * 2 + 0.01 * torch.randn(b, hk, d, generator=gen, device=dev)
    xv = torch.randn(b, hk, d, generator=gen, device=dev)
    xk, xv = xk.to(torch.bfloat16), xv.to(torch.bfloat16)
    rx = torch.stack([1 / xk.float().norm(dim=-1), 1 / xv.float().norm(dim=-1)], dim=-1)
    return xk, xv, rx


def _agreement(st, xk, xv, rx, mma: bool) -> tuple[dict, bool]:
    """The tensor-core (mma) or float32 path's agreement (see the module)."""
    tag = "mma" if mma else "f32"
    row: dict = {}
    if mma:
        out = sk.spindle_decode(**st)
        row["mma_vs_f32_rel"] = _rel(out, sk.spindle_decode(**st, mma=False))
        ok = row["mma_vs_f32_rel"] < 1e-2
        b, h, s = st["query"].shape[0], st["query"].shape[1], st["rk"].shape[-1]
        if b * h * s * st["query"].shape[-1] <= REFERENCE_ELEMENTS:
            row["mma_vs_reference_rel"] = _rel(out, sk.reference_decode(**st))
            ok = ok and row["mma_vs_reference_rel"] < 1e-2
    else:
        ok = True
    attn, best, arg = _fused(st, xk, xv, rx, mma=mma)
    row[f"fused_{tag}_attn_rel"] = _rel(attn, sk.spindle_decode(**st, mma=mma))
    ok = ok and row[f"fused_{tag}_attn_rel"] < 1e-3
    for j, (book, x) in enumerate(((st["kbook"], xk), (st["vbook"], xv))):
        bm, am = _match(book, x, rx[..., j])
        clear = _lead(book, x, rx[..., j]) > 1e-5
        diff = (best[..., j] - bm).abs().max().item()
        same = bool(torch.equal(arg[..., j][clear], am[clear]))
        row[f"fused_{tag}_best_maxdiff_{'kv'[j]}"] = diff
        row[f"fused_{tag}_arg_equal_{'kv'[j]}"] = same
        ok = ok and diff < 1e-5 and same
    return row, ok


def check_kernel(batch: int, tokens: int, rope_theta, copy_bps: float, dev=None, timing: bool = True) -> dict:
    """One case: agreement (`ok`) and, with `timing`, the kernels' times and bandwidth shares."""
    dev = dev or torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(batch + tokens)
    st = _storage(batch, HK, GROUP, D, tokens, rope_theta, gen, dev)
    xk, xv, rx = _new_token(st, gen)
    mma = sk.mma_path(torch.bfloat16, rope_theta)
    row = {"batch": batch, "tokens": tokens, "rope": rope_theta, "mma_path": mma}
    ok = True
    for path in (False, True) if mma else (False,):
        got, good = _agreement(st, xk, xv, rx, path)
        row.update(got)
        ok = ok and good
    row["ok"] = ok
    if not timing:
        return row
    attn, books = attention_bytes(st), book_bytes(st)
    row["attention_GB"], row["books_GB"] = attn / 1e9, books / 1e9

    def matches():
        _match(st["kbook"], xk, rx[..., 0])
        _match(st["vbook"], xv, rx[..., 1])

    def separate():
        sk.spindle_decode(**st)
        matches()

    runs = {  # name: (function, bytes read)
        "attn_f32": (partial(sk.spindle_decode, **st, mma=False), attn),
        "fused_f32": (partial(_fused, st, xk, xv, rx, mma=False), attn),
        "best_match_both": (matches, books),
        "separate": (separate, attn + books),
    }
    if mma:
        runs["attn_mma"] = (partial(sk.spindle_decode, **st, mma=True), attn)
        runs["fused_mma"] = (partial(_fused, st, xk, xv, rx, mma=True), attn)
    for name, (fn, nbytes) in runs.items():
        ms = time_ms(fn)["median_ms"]
        row[f"{name}_ms"] = round(ms, 4)
        row[f"{name}_bw_pct"] = round(100 * nbytes / (ms * 1e-3) / copy_bps, 1)
    return row


# (block_n, num_warps, num_stages) of the tensor-core path, and programs per SM for the splits
SWEEP_LAUNCH = [(32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2)]
SWEEP_LAUNCH += [(128, 8, 3)]
SWEEP_WAVES = (4, 32)


def sweep(batch: int, tokens: int, copy_bps: float, dev=None) -> list[dict]:
    """The tensor-core path's launch alternatives at one size: attention and fused, ms and bandwidth."""
    dev = dev or torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(batch + tokens)
    st = _storage(batch, HK, GROUP, D, tokens, None, gen, dev)
    xk, xv, rx = _new_token(st, gen)
    nbytes = attention_bytes(st)
    ref = sk.spindle_decode(**st, mma=False)
    rows = []
    for bn, warps, stages in SWEEP_LAUNCH:
        for waves in SWEEP_WAVES:
            splits, _ = sk.plan_splits(batch * HK, tokens, bn, dev, waves, sk.MMA_MIN_BLOCKS)
            kw = dict(block_n=bn, num_warps=warps, num_stages=stages, splits=splits, mma=True)
            row = dict(block_n=bn, num_warps=warps, num_stages=stages, waves=waves, splits=splits)
            try:
                row["rel_vs_f32"] = _rel(sk.spindle_decode(**st, **kw), ref)
                row["attn_ms"] = time_ms(partial(sk.spindle_decode, **st, **kw), reps=20)["median_ms"]
                row["fused_ms"] = time_ms(partial(_fused, st, xk, xv, rx, **kw), reps=20)["median_ms"]
            except Exception as exc:  # noqa: BLE001 - a launch that does not fit: report and go on
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if "attn_ms" in row:
                row["attn_bw_pct"] = round(100 * nbytes / (row["attn_ms"] * 1e-3) / copy_bps, 1)
                row["fused_bw_pct"] = round(100 * nbytes / (row["fused_ms"] * 1e-3) / copy_bps, 1)
            rows.append(row)
            print("sweep", json.dumps(row), flush=True)
    timed = [r for r in rows if "attn_ms" in r and r["rel_vs_f32"] < 1e-2]
    for key in ("attn_ms", "fused_ms"):
        if timed:
            best = min(timed, key=lambda r: r[key])
            print(f"sweep best {key}: {json.dumps(best)}", flush=True)
    return rows


def check_model(args) -> list[dict]:
    from pipeline.bench import gpu, measure
    from pipeline.bench.settings import BenchSettings
    from policies import Budget, make_policy

    device = torch.device("cuda")
    settings = BenchSettings(model=args.shapes, contexts=(args.context,))
    bm = measure.build_model(settings, device, torch.bfloat16, layers=args.layers)
    ids = measure.random_ids(bm, 1, args.context, 0)
    gen = measure.make_generator(bm, make_policy("spindlekv"), Budget(ratio=args.ratio))
    measure.use_kvpipe_attention(bm)
    rows = []
    was = spindlekv.FUSED_MATCH
    with torch.inference_mode():
        pre = measure.kvpipe_prefill(gen, ids, 4096, 3 + args.steps + 2)
        for batch in [int(x) for x in args.batches.split(",")]:
            runs = {}
            for fused in (True, False):
                spindlekv.FUSED_MATCH = fused
                gen.decode.mode = "graphs"
                gen.decode.release()
                gen.decode.counts = {"eager": 0, "captured": 0, "replayed": 0}
                gpu.cleanup(device)
                state = measure.tile(pre, batch)
                measure.decode_steps(gen, state, 3)  # 2 eager static steps, then the capture
                marks = gpu.Marks(device)
                marks.mark()
                logits = []
                for _ in range(args.steps):
                    out = gen.decode_step(state.cache, state.logits.argmax(-1), state.next_pos, state.budgets)
                    state.next_pos = state.next_pos + 1
                    state.logits = out
                    marks.mark()
                    logits.append(out.float().clone())
                torch.cuda.synchronize()
                step_ms = gpu.summary(marks.intervals())["median_ms"]
                runs[fused] = (step_ms, torch.stack(logits), dict(gen.decode.counts))
                del state
            gen.decode.release()
            (t_on, l_on, c_on), (t_off, l_off, c_off) = runs[True], runs[False]
            rel = [((a - b).norm() / b.norm()).item() for a, b in zip(l_on, l_off)]
            row = {
                "batch": batch, "layers": args.layers, "context": args.context,
                "fused_step_ms": round(t_on, 3), "separate_step_ms": round(t_off, 3),
                "counts_fused": c_on, "counts_separate": c_off,
                "logits_rel_first": rel[0], "logits_rel_max": max(rel),
                "tokens_agree": float((l_on.argmax(-1) == l_off.argmax(-1)).float().mean()),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    spindlekv.FUSED_MATCH = was
    return rows


def _union_storage(b, rows, share, gen, dev):
    """A deep (evicted) layer both ways: per kv head `rows` union rows, each kept by each of its query
    heads with probability `share` (by at least one): member bits for `union_decode`, and each query
    head's indices into the rows for the per-head kernel."""
    heads = HK * GROUP
    keep = torch.rand(b, HK, rows, GROUP, generator=gen, device=dev) < share
    first = torch.randint(0, GROUP, (b, HK, rows, 1), generator=gen, device=dev)
    keep |= torch.arange(GROUP, device=dev) == first  # at least one head a row
    selected = keep.permute(0, 1, 3, 2).reshape(b, heads, rows)
    count, (index,) = compact(selected, torch.arange(rows, device=dev).expand(b, heads, rows))
    books = [torch.randn(b, HK, rows, D, generator=gen, device=dev).to(torch.bfloat16) for _ in range(2)]
    query = torch.randn(b, heads, D, generator=gen, device=dev).to(torch.bfloat16)
    per_head = dict(query=query, kbook=books[0], vbook=books[1], rk=index.to(torch.int16), rv=None, mk=None,
                    mv=None, pos=None, n=count, scaling=D**-0.5, rope_theta=None)  # fmt: skip
    member = sk.member_bits(index, count, rows, GROUP)
    union = dict(query=query, kbook=books[0], vbook=books[1], member=member,
                 n=torch.full((b, HK), rows, device=dev), scaling=D**-0.5)  # fmt: skip
    return per_head, union


def check_union(batch: int, rows: int, share: float, copy_bps: float, dev=None, timing: bool = True) -> dict:
    """An evicted layer's decode: the union kernel (each kept row once per kv head) against the
    per-head kernel (each query head's rows through its indices): agreement, times, bandwidth shares
    (bytes each reads: book rows, member bits or indices, queries and output)."""
    dev = dev or torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(batch + rows)
    per_head, union = _union_storage(batch, rows, share, gen, dev)
    io = 2 * per_head["query"].numel() * 2
    row_bytes = 2 * D * 2
    head_rows = int(per_head["n"].sum())
    nbytes = {"per_head": head_rows * (row_bytes + 2) + io, "union": batch * HK * rows * (row_bytes + 1) + io}
    out = {
        "batch": batch,
        "union_rows": rows,
        "share": share,
        "head_rows_per_union_row": head_rows / (batch * HK * rows),
    }
    ref = sk.spindle_decode(**per_head)
    got = sk.union_decode(**union)
    out["rel_union_vs_per_head"] = _rel(got, ref)
    out["ok"] = bool(torch.isfinite(got).all()) and out["rel_union_vs_per_head"] < 1e-2
    if not timing:
        return out
    for name, fn in (
        ("per_head", partial(sk.spindle_decode, **per_head)),
        ("union", partial(sk.union_decode, **union)),
    ):
        ms = time_ms(fn)["median_ms"]
        out[f"{name}_ms"] = round(ms, 4)
        out[f"{name}_bw_pct"] = round(100 * nbytes[name] / (ms * 1e-3) / copy_bps, 1)
    return out


def _summary(row: dict) -> str:
    """One line per kernel case: ms (bandwidth %) of each timed run."""
    names = ("attn_f32", "attn_mma", "fused_f32", "fused_mma", "best_match_both", "separate")
    parts = [f"{n} {row[n + '_ms']:.3f} ms ({row[n + '_bw_pct']:.0f}%)" for n in names if n + "_ms" in row]
    head = f"batch {row['batch']}, {row['tokens']} tokens{', rope' if row['rope'] else ''}:"
    return " ".join([head, " | ".join(parts), "| ok" if row["ok"] else "| DISAGREE"])


def main(argv=None) -> int:
    from pipeline.bench import gpu

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batches", default="4,48,109")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="the tensor-core path's launch alternatives")
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default="llama8b", choices=sorted(SHAPES), help="the model whose shapes")
    ap.add_argument(
        "--union", default=None, help="ROWS:SHARE,...: only the evicted layers' union kernel check"
    )
    ap.add_argument(
        "--order", default="random", choices=["random", "sequential"], help="how tokens read book entries"
    )
    args = ap.parse_args(argv)
    global HK, GROUP, D, ORDER
    HK, GROUP, D = SHAPES[args.shapes]
    ORDER = args.order
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the kernel tests run under TRITON_INTERPRET=1)")
        return 0
    gpu.prefer_expandable_segments()
    device = torch.device("cuda")
    copy = gpu.copy_bandwidth(device)
    print(f"device copy bandwidth: {copy['tb_per_s']:.3f} TB/s ({copy['method']})", flush=True)
    result = {"device": torch.cuda.get_device_name(), "copy": copy, "kernel": [], "sweep": [], "model": []}
    batches = [int(x) for x in args.batches.split(",")]
    if args.union:
        for case in args.union.split(","):
            rows, share = case.split(":")
            for batch in batches:
                row = check_union(batch, int(rows), float(share), copy["bytes_per_s"])
                result["union"] = [*result.get("union", []), row]
                print(json.dumps(row), flush=True)
                gpu.cleanup(device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0 if all(r["ok"] for r in result["union"]) else 1
    cases = [(b, args.context, None) for b in batches] + [(4, 8192, 500000.0)]
    for batch, tokens, rope in cases:
        row = check_kernel(batch, tokens, rope, copy["bytes_per_s"])
        result["kernel"].append(row)
        print(json.dumps(row), flush=True)
        print(_summary(row), flush=True)
        gpu.cleanup(device)
    if args.sweep:
        result["sweep"] = sweep(max(batches), args.context, copy["bytes_per_s"])
        gpu.cleanup(device)
    if not args.no_model:
        result["model"] = check_model(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    failed = sum(not r["ok"] for r in result["kernel"])
    mma_rows = [r for r in result["kernel"] if "attn_mma_ms" in r]
    print("kernel checks failed:", failed)
    for num, den in (("attn_f32", "attn_mma"), ("fused_mma", "attn_mma"), ("separate", "fused_mma")):
        if mma_rows:
            ratio = statistics.median(r[num + "_ms"] / r[den + "_ms"] for r in mma_rows)
            print(f"median {num} / {den}: {ratio:.3f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
