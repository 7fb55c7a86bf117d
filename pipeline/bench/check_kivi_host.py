"""Host time of one KIVI layer's decode step on a GPU (`python -m pipeline.bench.check_kivi_host`).

Builds one `QuantizedKVLayer` at Llama-8B shapes (8 kv heads, head_dim 128, 32 query heads,
bf16), `--tokens` per row, `--batch` rows, then runs decode steps the way the cache does
(append + note_padding + attend) and prints: the host time of each part per step (time.perf_counter,
no synchronisation inside the loop), the wall time per step with the GPU kept busy, the time of
`decode_attention` alone (host launch cost and GPU time), and cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from pipeline.kv_cache import StepContext
from policies.kivi import QuantizedKVLayer
from policies.kivi_kernels import decode_attention

H, HKV, D = 32, 8, 128
DT = torch.bfloat16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    b, n = args.batch, args.tokens
    dev = "cuda"
    layer = QuantizedKVLayer(2, 32, 128)
    pos = torch.arange(n, device=dev)[None].expand(b, n)
    for lo in range(0, n, 8192):
        k = torch.randn((b, HKV, min(8192, n - lo), D), device=dev, dtype=DT)
        layer.append(k, torch.randn_like(k), pos[:, lo : lo + 8192])
        layer.note_padding(False)
        layer.flush()
    layer.reserve(4 * args.steps + 8)
    q = torch.randn((b, H, 1, D), device=dev, dtype=DT)
    kn = torch.randn((b, HKV, 1, D), device=dev, dtype=DT)
    scaling = D**-0.5
    t = {"append": 0.0, "note_padding": 0.0, "attend": 0.0}
    p = n

    def step(timed: bool):
        nonlocal p
        positions = torch.full((b, 1), p, device=dev)
        ctx = StepContext(cache=None, positions=positions, padded=False)
        t0 = time.perf_counter()
        layer.append(kn, kn, ctx.positions)
        t1 = time.perf_counter()
        layer.note_padding(False)
        t2 = time.perf_counter()
        layer.attend(q, ctx, scaling)
        t3 = time.perf_counter()
        if timed:
            t["append"] += t1 - t0
            t["note_padding"] += t2 - t1
            t["attend"] += t3 - t2
        p += 1

    for _ in range(8):
        step(False)
    torch.cuda.synchronize()
    w0 = time.perf_counter()
    for _ in range(args.steps):
        step(True)
    host = time.perf_counter() - w0
    torch.cuda.synchronize()
    wall = time.perf_counter() - w0
    per = {k: round(v / args.steps * 1e6, 1) for k, v in t.items()}
    print(f"batch {b}, {n} tokens: host us/step {per}; host total {host / args.steps * 1e6:.0f} us, "
          f"wall {wall / args.steps * 1e6:.0f} us/step")  # fmt: skip
    store = layer._store_for_kernel()
    out = torch.empty_like(q)
    torch.cuda.synchronize()
    w0 = time.perf_counter()
    for _ in range(100):
        decode_attention(q, store, scaling, max_tokens=layer._slots(), out=out)
    host = time.perf_counter() - w0
    torch.cuda.synchronize()
    wall = time.perf_counter() - w0
    print(f"decode_attention alone: host {host * 1e4:.0f} us/call, wall {wall * 1e4:.0f} us/call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step(False)
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print("\n".join(s.getvalue().splitlines()[:40]))


if __name__ == "__main__":
    main()
