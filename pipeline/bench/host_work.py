"""`python -m pipeline.bench.host_work`: device syncs and torch ops of a prefill's compressions, on the CPU.

    python -m pipeline.bench.host_work [--shapes smollm2] [--context 8192] [--chunk 4096] [--layers 30]
        [--policies kivi] [--modes chunked] [--small] [--interpret] [--ops]

A random-weight model of the named shapes (float32) prefills one row of random ids exactly as
`kvpipe bench` does (`measure.kvpipe_prefill`: one shot, or chunks compressed after each), once
per policy. `HostWork` (a torch dispatch mode plus a few patched `Tensor` methods) watches every
torch op, so a CPU run shows what a GPU run would wait for:

- syncs: calls that make the host wait for the device (item / bool / int of a tensor, `tolist`,
  `cpu`, `numpy`, ops whose output shape depends on the data (nonzero, masked_select, boolean
  indexing, repeat_interleave without `output_size`), and tensors built from host data straight
  on the device (`torch.tensor(..., device=...)`, a blocking copy); each with where it was called.
  Reads of host copies queued without a wait (`policies.ragged_heads.DeferredRead`) are counted
  apart, as deferred reads: they wait for a copy queued a forward earlier, long done by then;
- kernels: ops that launch device work (views, aliases and allocations without a fill excluded;
  a few ops launch more than one kernel on a GPU, so this is a floor).

Per policy and mode it prints the syncs per `compress_layer` call, the kernels and CPU time of
each call that compressed, the syncs of the whole prefill outside the compressions and the
deferred reads. It also counts each layer's whole path in a forward, for storage forms whose
cost is not only the compression (kivi: de-quantising the earlier chunks for attention, the
residual rings): the layer path is the cache's `update` (the layer's append and `note_padding`)
plus the attention hook (`attend`, then `compress_layer` in a compressing forward), reported per
layer-forward for the first forward and for the later ones (chunks after the first attend over
stored tokens), with a digest of what the prefill stored (`stored`: each layer's positions,
keys and values, kivi's packed store, scales and zero points, and the last logits), so that two
code versions can be shown to store and compute the same. `--interpret` runs kivi's Triton
kernels on CPU under Triton's interpreter and counts each launch as one kernel, its time left
out: kivi's counts as on a GPU (the CPU's torch forms of those kernels are several ops each);
with `--device cuda` each launch is counted too (host time included).

The CPU time is this thread's (steady on a shared machine), CPU kernels included: compare two
code versions on one machine, not with a GPU's host time. `--small` (SmolLM2 heads at
1024 tokens, chunk 256) makes the CPU kernels small, so that more of it is host time. With
`--device cuda` the counts are the GPU's (kernels launched by torch ops; bfloat16 adds the float32
up-casts a CPU float32 run does not need) and the time is the host's, a sync's wait included
(CUDA's default spin-wait burns CPU time).

Measured 2026-12-03 (2-core shared CPU, torch 2.13, float32), SmolLM2 shapes, 30 layers, ratio 0.25,
af48c20 (the code before) -> 7cce3bc, same kept tokens in every case (digests equal). Syncs per
`compress_layer` call and kernels per compressing call at 8192 tokens (chunk 4096); CPU ms per
compressing call at 256 tokens (chunk 64), where the kernels are small and most of it is host time:

    policy          syncs/call (1-shot, chunked)  kernels (1-shot, chunked)   CPU ms (1-shot, chunked)
    streaming_llm   1.03, 1.03 -> 0, 0             41, 41 -> 15, 15            0.51, 0.35 -> 0.30, 0.20
    snapkv          1.03, 1.03 -> 0, 0             55, 55 -> 25, 25            0.84, 0.68 -> 0.72, 0.50
    pyramidkv       1.07, 1.07 -> 0, 0             55, 55 -> 25, 25            0.99, 0.67 -> 0.86, 0.51
    adakv           1.03, 1.03 -> 0, 0             109, 133 -> 92, 109         1.17, 1.15 -> 1.20, 1.11
    h2o             133, 69 -> 0, 0                1084, 573 -> 350, 191       3.12, 1.00 -> 2.55, 0.71
    tova            1.03, 1.03 -> 0, 0             63, 63 -> 23, 23            0.77, 0.59 -> 0.46, 0.43

The syncs before: `KVLayer.keep`'s facts (one per layer compression), the row budgets and
pyramidkv's windows (one per forward), AdaKV's segment lengths (one per layer), h2o's per-block
slot bounds (3 + 1 per 256 queries) and recent counts. After: none in a compression; the
prefill's only one is `row_budgets` building its tensor before the first forward; adakv's segment
lengths are one deferred read per layer compression, taken a forward later. The kernel counts are
a floor for a bfloat16 GPU run (float32 up-casts are no-ops here). At 8192 tokens the CPU time is
mostly CPU kernels (snapkv chunked 8.0 -> 6.8 ms), not the GPU's host time.

kivi's layer path, measured 2026-12-03 (same machine and settings), 8061607 (before) -> this code,
same stored digests (`--interpret`: 81e3cba31656 chunked, aef20658be28 one-shot; plain CPU at
8192/4096: ebb5606bdd5c), `--policies kivi --context 1024 --chunk 128 --interpret` (8 forwards,
as 32K in chunks of 4K): per later layer-forward 69.0 -> 14.7 kernels (full: 9.0), 3 -> 0 syncs
(reads of the CPU count mirror), 4.6 -> 3.8 ms CPU (full 3.0; CPU attention is most of it); first
forward 53 -> 12 kernels; per compression 21.5 -> 3.2 kernels, 0.51 -> 0.21 ms; syncs outside
the compressions 751 -> 1. One-shot: 99 -> 18 kernels per layer-forward. At 512 tokens, chunk 64:
64.9 -> 15.3 kernels (full 9.0), 2.0-2.1 -> 1.3-1.5 ms CPU (full 0.8-1.0). What is left beyond a
full cache's append: one de-quantisation and one quantisation launch, the value residual copied
into the wide ring and back (1-2 copies each way).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_ROOT = Path(__file__).resolve().parents[2]
_HERE = Path(__file__).resolve()

aten = torch.ops.aten
# a tensor's value read on the host (item, bool, int...); under inference mode the composite
# item / is_nonzero reach the mode undecomposed
_SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
# outputs whose shape depends on the data: the host reads a count from the device
_DATA_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default}
_NO_KERNEL = {
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.empty_strided.default,
    aten.new_empty_strided.default,
    aten.lift_fresh.default,
    aten.detach.default,
}


def _caller() -> str:
    """`file:line function` of the innermost repository frame outside this module."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path != _HERE and _ROOT in path.parents and "tests" not in path.parts:
            return f"{path.relative_to(_ROOT)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _is_sync(func, args, kwargs) -> bool:
    if func in _SCALAR_READS or func in _DATA_SHAPED:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None and (len(args) < 2 or args[1] is None)
    if func is aten.index.Tensor:  # boolean indexing runs nonzero
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return False


class HostWork(TorchDispatchMode):
    """Counts torch ops (`kernels`, `views`) and device syncs (`syncs`: where -> calls) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.views = 0
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        # reads of host copies queued earlier without a wait (`policies.ragged_heads.DeferredRead`):
        # a wait for a copy queued a forward before, not for the work just issued
        self.deferred: Counter = Counter()

    def sync(self, what: str) -> None:
        self.syncs[f"{what} @ {_caller()}"] += 1

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.sync(func.__name__)
        elif func.is_view or func in _NO_KERNEL:
            self.views += 1
        else:
            self.kernels += 1
            self.ops[func.__name__] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._patches = _patch_host_reads(self)
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        for owner, name, original in self._patches:
            setattr(owner, name, original)
        return super().__exit__(*exc)


_ACTIVE: list[HostWork] = []  # the counters now active (nested: each counts)
# CPU seconds spent in kernels run under Triton's interpreter (`triton_launches`), which the
# timings leave out: a GPU runs them, the host only launches them
_KERNEL_SECONDS = [0.0]


@contextmanager
def triton_launches(module, names: tuple[str, ...], interpreted: bool):
    """Count `module`'s Triton launch functions `names` as one kernel each in every active counter
    (a Triton launch bypasses torch's dispatcher: a dispatch mode does not see it). `interpreted`
    (Triton's interpreter on CPU tensors, the module's CPU_INTERPRET opt-in set): their own torch
    ops and their time are not counted either, so that the counts and CPU times are a GPU run's;
    on a GPU the launch is host time and stays in."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def launch(*args, **kwargs):
            for work in _ACTIVE:
                work.kernels += 1
                work.ops[f"triton:{name}"] += 1
            if not interpreted:
                return fn(*args, **kwargs)
            t0 = time.thread_time()
            with _disable_current_modes():
                out = fn(*args, **kwargs)
            _KERNEL_SECONDS[0] += time.thread_time() - t0
            return out

        return launch

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def _thread_time() -> float:
    """This thread's CPU time less the time spent in interpreted kernels."""
    return time.thread_time() - _KERNEL_SECONDS[0]


def _patch_host_reads(mode: HostWork) -> list:
    """Count the reads that never reach the dispatcher on a CPU tensor (`tolist`, `cpu`, `numpy`)
    and tensors made from host data on a named device (a blocking host-to-device copy on a GPU)."""
    patches = []

    def wrap(owner, name, counts):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if counts(*args, **kwargs):
                if getattr(args[0], "deferred_read", False):  # a host copy made without waiting
                    mode.deferred[f"{name} @ {_caller()}"] += 1
                else:
                    mode.sync(name)
            return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, wrapper)

    for name in ("tolist", "cpu", "numpy"):
        wrap(torch.Tensor, name, lambda *a, **k: True)
    wrap(torch, "tensor", lambda *a, **k: k.get("device") is not None)
    # a tensor subclass (attention's CausalBias) cannot be made under a dispatch mode: made without
    import pipeline.attention_math as attention_math

    original = attention_math.causal_lower_right

    def causal_lower_right(*args):
        with _disable_current_modes():
            return original(*args)

    patches.append((attention_math, "causal_lower_right", original))
    attention_math.causal_lower_right = causal_lower_right
    return patches


class LayerPath:
    """One layer's work in one forward: its `CompressedCache.update` (the storage form's append and
    `note_padding`) and the attention hook (`attend`, plus `compress_layer` when the forward
    compresses), counted (`kernels`, `syncs`, `ops`) and timed (CPU seconds of this thread)."""

    def __init__(self) -> None:
        self.kernels = 0
        self.sync_count = 0
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.seconds = 0.0

    def add(self, work: HostWork | None, seconds: float) -> None:
        self.seconds += seconds
        if work is not None:
            self.kernels += work.kernels
            self.sync_count += work.sync_count
            self.ops += work.ops
            self.syncs += work.syncs


@contextmanager
def wrapped_layer_paths(count: bool):
    """Count (with `count`) and time each layer's whole path in each forward: `CompressedCache.update`
    and the registered attention function (attention, then the compression of a compressing
    forward). Yields a list of forwards, each a list of `LayerPath` by layer index."""
    from transformers import AttentionInterface

    from pipeline import attention
    from pipeline.kv_cache import CompressedCache

    forwards: list[list[LayerPath]] = []
    update, attend = CompressedCache.update, attention.kvpipe_attention

    def timed(layer_idx: int, fn, *args, **kwargs):
        if layer_idx == 0 and fn is update:  # a forward's first layer stores first
            forwards.append([])
        paths = forwards[-1]
        while len(paths) <= layer_idx:
            paths.append(LayerPath())
        work = HostWork() if count else None
        t0 = _thread_time()
        with work or nullcontext():
            out = fn(*args, **kwargs)
        paths[layer_idx].add(work, _thread_time() - t0)
        return out

    def wrapped_update(cache, key_states, value_states, layer_idx, *args, **kwargs):
        return timed(layer_idx, update, cache, key_states, value_states, layer_idx, *args, **kwargs)

    def wrapped_attention(module, *args, **kwargs):
        return timed(module.layer_idx, attend, module, *args, **kwargs)

    CompressedCache.update = wrapped_update
    AttentionInterface.register(attention.ATTN_NAME, wrapped_attention)
    try:
        yield forwards
    finally:
        CompressedCache.update = update
        AttentionInterface.register(attention.ATTN_NAME, attend)


def path_summary(forwards: list[list[LayerPath]], first: bool) -> dict:
    """Per layer-forward means over the first forward (`first`) or the later ones (None if none)."""
    paths = [p for f in (forwards[:1] if first else forwards[1:]) for p in f]
    if not paths:
        return None
    n = len(paths)
    return {
        "n": n,
        "kernels": sum(p.kernels for p in paths) / n,
        "syncs": sum(p.sync_count for p in paths) / n,
        "ms": 1e3 * sum(p.seconds for p in paths) / n,
        "ops": sum((p.ops for p in paths), Counter()),
        "sync_where": sum((p.syncs for p in paths), Counter()),
    }


@contextmanager
def wrapped_compressions(policy, count: bool):
    """Wrap `policy.compress_layer` to time each call (CPU time of this thread: steady on a shared
    machine; with one torch thread it holds every CPU kernel too) (and, with `count`, count it into its own
    `HostWork`); yields the list of (HostWork or None, wall seconds) the calls append to."""
    calls = []
    original = policy.compress_layer

    def wrapped(*args):
        work = HostWork() if count else None
        t0 = _thread_time()
        with work or nullcontext():
            original(*args)
        calls.append((work, _thread_time() - t0))

    policy.compress_layer = wrapped
    try:
        yield calls
    finally:
        del policy.compress_layer


def _prefill(bm, policy, ratio, ids, chunk, count: bool):
    """(compression calls, prefill HostWork or None, prefill seconds, kept digest, layer paths,
    stored digest) of one prefill.

    Counting runs under `no_grad`, where composite ops reach the dispatcher decomposed (closer to
    the kernels a GPU launches); timing runs as the benchmark does, under `inference_mode`."""
    from pipeline.bench import measure
    from policies.base import Budget

    gen = measure.make_generator(bm, policy, Budget(ratio=ratio))
    whole = HostWork() if count else None
    grad = torch.no_grad() if count else torch.inference_mode()
    with (
        grad,
        wrapped_layer_paths(count) as paths,
        wrapped_compressions(policy, count) as calls,
        whole or nullcontext(),
    ):
        t0 = time.perf_counter()
        pre = measure.kvpipe_prefill(gen, ids, chunk)
        seconds = time.perf_counter() - t0
    return calls, whole, seconds, _kept_digest(pre.cache), paths, stored_digest(pre.cache, pre.logits)


def run_policy(bm, name: str, context: int, chunk: int | None, ratio: float, seed: int = 0) -> dict:
    """Syncs and kernels per compression (a counting prefill), then host time (a plain prefill)."""
    from pipeline.bench import measure
    from policies.registry import make_policy

    policy = make_policy(name)
    ids = measure.random_ids(bm, 1, context, seed)
    calls, whole, _, counted_digest, counted_paths, counted_store = _prefill(
        bm, policy, ratio, ids, chunk, count=True
    )
    timed, _, seconds, digest, timed_paths, store = _prefill(bm, policy, ratio, ids, chunk, count=False)
    if digest != counted_digest or store != counted_store:
        raise RuntimeError(f"{name}: the counting and the timed prefill kept different tokens")
    paths = {}
    for key, first in (("first", True), ("later", False)):
        counted, timed_ = path_summary(counted_paths, first), path_summary(timed_paths, first)
        if counted is not None:
            paths[key] = dict(counted, ms=timed_["ms"])
    compress_syncs = sum((w.syncs for w, _ in calls), Counter())
    # calls that compressed (a layer within its budget returns before any kernel)
    working = [i for i, (w, _) in enumerate(calls) if w.kernels]
    n = max(len(working), 1)
    return {
        "policy": name,
        "calls": len(calls),
        "compressions": len(working),
        "syncs_per_call": sum(w.sync_count for w, _ in calls) / max(len(calls), 1),
        "kernels_per_compression": sum(calls[i][0].kernels for i in working) / n,
        "ms_per_compression": 1e3 * sum(timed[i][1] for i in working) / n,
        "compress_syncs": compress_syncs,
        "prefill_syncs": whole.syncs,  # the compressions' included (nested modes both count)
        "deferred_reads": whole.deferred,
        "prefill_s": seconds,
        "kept": digest,
        "stored": store,
        "ops": sum((calls[i][0].ops for i in working), Counter()),
        "paths": paths,
    }


def _kept_digest(cache) -> str:
    from pipeline.bench.profile_compress import kept_digest

    return kept_digest(cache.layers)


def stored_digest(cache, logits: torch.Tensor) -> str:
    """md5 of everything a prefill leaves: each layer's positions, keys and values (a storage
    form's view), its stored tensors where it has them (kivi: counts and the used parts of the
    packed store, scales and zero points), and the last logits (every layer's attention)."""
    import hashlib

    h = hashlib.md5()

    def put(x: torch.Tensor) -> None:
        x = x.detach().contiguous().cpu()
        h.update(str((x.dtype, tuple(x.shape))).encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")

    for layer in cache.layers:
        for name in ("positions", "keys", "values"):
            x = getattr(layer, name, None)
            if isinstance(x, torch.Tensor):
                put(x)
        for name in ("_n", "_nk", "_nv", "_kq", "_kscale", "_kzero", "_vq", "_vscale", "_vzero"):
            x = getattr(layer, name, None) if getattr(layer, "_ready", False) else None
            if isinstance(x, torch.Tensor):
                put(x)
    put(logits)
    return h.hexdigest()[:12]


# kivi's Triton launches (`--interpret`)
_KIVI_KERNELS = ("dequantize_into", "quantize_from_rings", "decode_attention")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shapes')")
    ap.add_argument("--policies", default="streaming_llm,snapkv,pyramidkv,adakv,h2o,tova")
    ap.add_argument("--modes", default="oneshot,chunked")
    ap.add_argument("--small", action="store_true", help="1024 tokens, chunk 256: mostly host time")
    ap.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time = host thread)")
    ap.add_argument("--ops", action="store_true", help="list the kernels of the compressions by op")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="kivi's Triton kernels on CPU under Triton's interpreter, one kernel each, their time left out",
    )
    args = ap.parse_args(argv)
    if args.small:
        args.context, args.chunk = 1024, 256
    if args.interpret:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

    from pipeline.bench import measure
    from pipeline.bench.settings import BenchSettings

    torch.set_num_threads(args.threads)
    settings = BenchSettings(model=args.shapes, contexts=(args.context,))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bm = measure.build_model(settings, device, dtype, layers=args.layers)
    print(
        f"# {args.shapes} shapes, {bm.config.num_hidden_layers} layers, {args.context} tokens, "
        f"chunk {args.chunk}, ratio {args.ratio}, {device} {dtype}"
    )
    kernels = nullcontext()
    if args.interpret or device.type == "cuda":
        from policies import kivi, kivi_kernels

        if kivi_kernels.triton is None and args.interpret:
            raise SystemExit("--interpret: triton is not installed")
        kivi.CPU_INTERPRET = args.interpret
        kernels = triton_launches(kivi_kernels, _KIVI_KERNELS, interpreted=args.interpret)
    with kernels:
        _report(bm, args)


def _report(bm, args) -> None:
    for name in args.policies.split(","):
        for mode in args.modes.split(","):
            chunk = args.chunk if mode == "chunked" else None
            r = run_policy(bm, name, args.context, chunk, args.ratio)
            outside = r["prefill_syncs"] - r["compress_syncs"]
            print(
                f"{name:13s} {mode:8s} {r['calls']:3d} calls, {r['compressions']:3d} compressing: "
                f"{r['syncs_per_call']:5.2f} syncs per call, {r['kernels_per_compression']:6.1f} kernels and "
                f"{r['ms_per_compression']:7.3f} ms CPU per compression; {sum(outside.values())} syncs "
                f"outside; prefill {r['prefill_s']:.2f} s; kept {r['kept']}"
            )
            for key, p in r["paths"].items():
                print(
                    f"    layer path ({key} forward{'s' if key == 'later' else ''}: update + attention"
                    f" + compression, {p['n']} layer-forwards): {p['syncs']:5.2f} syncs, "
                    f"{p['kernels']:6.1f} kernels, {p['ms']:7.3f} ms CPU per layer-forward; "
                    f"stored {r['stored']}"
                )
                for where, c in sorted(p["sync_where"].items()):
                    print(f"        sync {c:4d}x {where}")
                if args.ops:
                    per = p["n"]
                    print("        " + ", ".join(f"{op} {c / per:g}" for op, c in p["ops"].most_common()))
            for where, count in sorted(r["compress_syncs"].items()):
                print(f"    compress {count:4d}x {where}")
            for where, count in sorted(outside.items()):
                print(f"    prefill  {count:4d}x {where}")
            for where, count in sorted(r["deferred_reads"].items()):
                print(f"    deferred {count:4d}x {where}")
            if args.ops:
                per = r["compressions"] or 1
                print("    " + ", ".join(f"{op} {c / per:g}" for op, c in r["ops"].most_common()))


if __name__ == "__main__":
    main()
