"""SpindleKV prefill on the GPU: the Triton similarity kernels against the exact float32 torch path.

    python -m pipeline.bench.check_spindle_prefill [--tokens 8192]

Builds codebooks for clustered bf16 data (`build_codebooks`: kernel degrees on CUDA) and compares
with the torch path run on the CPU (same data, float32 cosines); appends a chunk to a codebook layer
on both devices and compares the stored entries; then times codebook building and a chunk append
at Llama-8B shapes (8 kv heads, head_dim 128) on random (unmerged) and clustered data.
"""

from __future__ import annotations

import argparse
import time

import torch

from policies.spindlekv import SpindleLayer, build_codebooks


def clustered(P, n, d, dirs, gen, dev, dtype):
    base = torch.randn(dirs, d, generator=gen, device=dev)
    which = torch.randint(0, dirs, (P, n), generator=gen, device=dev)
    noise = torch.randn(P, n, d, generator=gen, device=dev) * 0.08
    return ((base[which] + noise) * (torch.rand(P, n, 1, generator=gen, device=dev) + 0.5)).to(dtype)


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def time_case(label: str, xs: torch.Tensor, n: int, dev) -> None:
    """Time codebook building over xs [8, n, 128], a chunk append and a decode append."""
    ln = torch.full((8,), n, device=dev)
    build_codebooks(xs[:, :256], torch.full((8,), 256, device=dev), 0.98, torch.bfloat16)  # compile
    out, t = timed(lambda: build_codebooks(xs, ln, 0.98, torch.bfloat16))
    entries = out[3].float().mean()
    print(f"build_codebooks {label}: 8 heads x {n} tokens: {t * 1e3:.1f} ms, entries {entries:.0f}")
    layer = SpindleLayer()
    h = n // 2
    layer.append(xs[None, :, :h], xs[None, :, :h], torch.arange(h, device=dev)[None])
    layer.to_codebook(0.98, 0.95, None)
    q = min(4096, h)
    pos = torch.arange(h, h + q, device=dev)[None]
    _, t = timed(lambda: layer.append(xs[None, :, h : h + q], xs[None, :, h : h + q], pos))
    entries = layer.kbook_n.float().mean()
    print(f"chunk append {label}: {q} tokens onto {h}: {t * 1e3:.1f} ms; entries {entries:.0f}")
    one = torch.tensor([[n]], device=dev)
    _, t = timed(lambda: layer.append(xs[None, :, :1], xs[None, :, :1], one))  # first: compiles
    _, t = timed(lambda: layer.append(xs[None, :, 1:2], xs[None, :, 1:2], one + 1))
    print(f"decode append {label}: {t * 1e3:.2f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the kernel tests run under TRITON_INTERPRET=1)")
        return 0
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    failed = 0
    # -- agreement with the torch path ------------------------------------------------------
    x = clustered(6, 700, 128, 40, gen, dev, torch.bfloat16)
    lengths = torch.tensor([700, 650, 1, 300, 699, 512], device=dev)
    for theta in (0.98, 0.95):
        g_out = build_codebooks(x, lengths, theta, torch.bfloat16)
        c_out = build_codebooks(x.cpu(), lengths.cpu(), theta, torch.bfloat16)
        same = [torch.equal(a.cpu(), b) for a, b in zip(g_out, c_out)]
        same[2] = torch.allclose(g_out[2].cpu(), c_out[2], rtol=1e-5)  # norms: reduction order differs
        counts = g_out[3].tolist()
        print(f"codebooks theta={theta}: counts {counts}; book/index/mag/counts as on the CPU: {same}")
        failed += not all(same)
    layers = []
    for device in (dev, torch.device("cpu")):
        layer = SpindleLayer()
        g2 = torch.Generator(device=dev).manual_seed(5)
        k0, v0 = (
            clustered(2, 600, 128, 30, g2, dev, torch.bfloat16),
            clustered(2, 600, 128, 30, g2, dev, torch.bfloat16),
        )
        layer.append(
            k0.reshape(2, 1, 600, 128).expand(2, 8, 600, 128).to(device),
            v0.reshape(2, 1, 600, 128).expand(2, 8, 600, 128).to(device),
            torch.arange(600, device=device).expand(2, 600),
        )
        layer.to_codebook(0.98, 0.95, 500000.0)
        k, v = (
            clustered(2, 256, 128, 40, g2, dev, torch.bfloat16),
            clustered(2, 256, 128, 40, g2, dev, torch.bfloat16),
        )
        layer.append(
            k.reshape(2, 1, 256, 128).expand(2, 8, 256, 128).to(device),
            v.reshape(2, 1, 256, 128).expand(2, 8, 256, 128).to(device),
            torch.arange(600, 856, device=device).expand(2, 256),
        )
        layers.append(layer)
    for name in ("kbook_n", "vbook_n", "_n"):
        ok = torch.equal(getattr(layers[0], name).cpu(), getattr(layers[1], name))
        print(f"chunk append {name}: {getattr(layers[0], name)[0].tolist()} equal to CPU: {ok}")
        failed += not ok
    for name in ("keys", "values"):
        a, b = getattr(layers[0], name).cpu().float(), getattr(layers[1], name).float()
        err = ((a - b).norm() / b.norm()).item()
        print(f"chunk append {name}: rel err vs CPU {err:.2e}")
        failed += err > 1e-2
    # -- timing at Llama-8B shapes --------------------------------------------------------
    n = args.tokens
    for label, dirs in (("random", None), ("clustered", 200)):
        xs = (
            torch.randn(8, n, 128, generator=gen, device=dev)
            if dirs is None
            else clustered(8, n, 128, dirs, gen, dev, torch.float32)
        )
        time_case(label, xs.to(torch.bfloat16), n, dev)
    print("checks failed:", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
