"""Static-shape decode steps, replayed as CUDA graphs where that is safe.

A small-batch decode step is host-bound: a Llama-8B step at batch 4 launches about a thousand
kernels whose Python and launch costs exceed their run time. A CUDA graph replays the whole
forward with one launch, but only if nothing in it depends on host values that change per
step. The dynamic step does: it writes the new token at a host-side slot index and attends
over a slot count that grows every step. The static step (`StepContext.static_slots`) does not:

- every layer writes its token with `index_copy_` at a slot held in a device tensor (one
  int64 per layer: its used count) and attends over its whole `SlotBuffer` capacity with the
  count read on the device (`pipeline.decode_kernels`); EMPTY slots stay masked by position;
- token ids, positions (hence RoPE) and those slot indices live in static device tensors that
  are refreshed before each replay; the graph itself advances the slot indices; the host
  advances the layers' used counts after the step (`CompressedCache.commit_static`).

One capture therefore serves every step while the batch and the buffers stay the same. The
runner keys a capture on (cache, batch, each layer's buffer tensors and `has_empty`): a row
leaving the batch (`select_rows`) or a reallocation makes new buffers, so the next steps run
eagerly for `warmup` steps and a new graph is captured. Before every static step, replayed or
not, the runner calls `CompressedCache.prepare_static`: host work a replay cannot do (a no-op for
dense layers), which changes what it must in place. Storage forms take the static step where
they implement the layer protocol for their own form: AdaKV's ragged layers (the tail as a dense
layer's, the ragged kernel reading its length on the device; CUDA or the interpreter only),
SpindleKV's layers (`SpindleLayer`: counts advanced on the device) and kivi's packed layers
(`QuantizedKVLayer`: the token written at each (row, head)'s count on the device, the fused
kernel over the whole packed store; `prepare_static` quantises the groups the rings completed,
the counts advanced in place; the kernel's scratch buffer is one of the keyed tensors; CUDA or
the interpreter, shapes the kernel tiles). Steps the static form cannot take run the dynamic
path: per-slot statistics, policies that compress during decode (h2o, tova: the caller never
asks), no spare capacity. Sampling stays outside the graph.

Modes (`Generator(decode_mode=...)`, else the `KVPIPE_DECODE` environment variable):
"graphs" (static steps, captured; the default on one CUDA device), "static" (static steps run
eagerly: the form the CPU tests check against the dynamic step), "eager" (the dynamic step
only; the default on CPU and under tensor parallelism). `KVPIPE_CUDA_GRAPHS=0` also means eager.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable

import torch

MODES = ("eager", "static", "graphs")
ENV_MODE = "KVPIPE_DECODE"


def default_mode(device: torch.device) -> str:
    """The decode mode when the caller names none: the environment's, else graphs on one CUDA device."""
    env = os.environ.get(ENV_MODE, "").strip().lower()
    if env:
        if env not in MODES:
            raise ValueError(f"{ENV_MODE} must be one of {MODES}, got {env!r}")
        return env
    if device.type != "cuda":
        return "eager"
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "eager"  # tensor-parallel collectives inside the forward: not captured here
    return "graphs"


# forward(cache, ids [b, 1], positions [b, 1], budgets, static_slots) -> logits [b, vocab]
StaticForward = Callable[[object, torch.Tensor, torch.Tensor, torch.Tensor, list], torch.Tensor]


class _Captured:
    """One captured step: the graph, its static inputs/outputs and what it was captured over."""

    def __init__(self, cache, batch: int, layers) -> None:
        self.cache_ref = weakref.ref(cache)
        self.batch = batch
        # weak references: the graph must not keep a freed cache alive, and a dead reference
        # (or another tensor in its place) means the graph's addresses are stale
        self.buffers = [tuple(weakref.ref(t) for t in layer.static_buffers()) for layer in layers]
        self.has_empty = [layer.has_empty for layer in layers]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.device_slots: list[int] = []  # what `slots` holds on the device before the next replay
        self.logits: torch.Tensor | None = None

    def matches(self, cache, batch: int, layers) -> bool:
        if self.cache_ref() is not cache or self.batch != batch or len(layers) != len(self.buffers):
            return False
        for layer, refs, empty in zip(layers, self.buffers, self.has_empty):
            tensors = layer.static_buffers()
            if layer.has_empty != empty or len(refs) != len(tensors):
                return False
            for ref, tensor in zip(refs, tensors):
                if ref() is not tensor:
                    return False
        return True


def _key(cache, batch: int, layers) -> tuple:
    return (
        id(cache),
        batch,
        tuple((*map(id, layer.static_buffers()), layer.has_empty) for layer in layers),
    )


class DecodeRunner:
    """Runs decode steps in the static form, eagerly or as a replayed CUDA graph (see the module)."""

    def __init__(self, forward: StaticForward, mode: str, warmup: int = 2) -> None:
        if mode not in MODES:
            raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
        self.forward = forward
        self.mode = mode
        self.warmup = warmup  # eager static steps over the same buffers before a capture
        self._graph: _Captured | None = None
        self._key: tuple | None = None
        self._seen = 0
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}  # static steps, for checks and logs

    def release(self) -> None:
        """Drop the captured graph (and its memory pool) and the warm-up count."""
        self._graph = None
        self._key, self._seen = None, 0

    def step(self, cache, tokens: torch.Tensor, next_pos: torch.Tensor, budgets) -> torch.Tensor | None:
        """One decode step in the static form, or None when the caller must take the dynamic step.

        The logits returned by a replay are the graph's output tensor: valid until the next step.
        """
        if self.mode != "eager":
            cache.prepare_static()  # host work a replay cannot do (kivi's flushes), before the checks
        if self.mode == "eager" or not cache.static_decode_ready():
            if self._graph is not None:
                self.release()
            return None
        layers = cache.layers
        batch = tokens.shape[0]
        graph = self._graph
        if graph is not None and graph.matches(cache, batch, layers):
            return self._replay(graph, cache, layers, tokens, next_pos)
        self._graph = None
        key = _key(cache, batch, layers)
        if key != self._key:
            self._key, self._seen = key, 0
        self._seen += 1
        slots_host = [layer.slots_used for layer in layers]
        if self.mode == "graphs" and tokens.is_cuda and self._seen > self.warmup:
            graph = self._capture(cache, batch, layers, tokens, next_pos, budgets, slots_host)
            if graph is not None:
                self._graph = graph
                return self._replay(graph, cache, layers, tokens, next_pos)
            self.mode = "eager"  # a failed capture: not capturable here; the dynamic step from now on
        slots = torch.tensor(slots_host, dtype=torch.long, device=tokens.device)
        logits = self.forward(cache, tokens[:, None], next_pos[:, None], budgets, list(slots.split(1)))
        cache.commit_static()
        self.counts["eager"] += 1
        return logits

    def _capture(self, cache, batch, layers, tokens, next_pos, budgets, slots_host) -> _Captured | None:
        captured = _Captured(cache, batch, layers)
        captured.ids = tokens[:, None].clone()
        captured.positions = next_pos[:, None].clone()
        captured.slots = torch.tensor(slots_host, dtype=torch.long, device=tokens.device)
        captured.device_slots = list(slots_host)
        views = list(captured.slots.split(1))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = self.forward(cache, captured.ids, captured.positions, budgets, views)
                captured.slots.add_(1)  # the next replay's slots, advanced on the device
        except Exception as exc:  # noqa: BLE001 - any capture failure: this step runs eagerly
            warnings.warn(
                f"decode step not captured as a CUDA graph ({type(exc).__name__}: {exc}); "
                "eager decode from now on",
                stacklevel=3,
            )
            del graph
            return None
        captured.graph = graph
        captured.logits = logits
        self.counts["captured"] += 1
        return captured

    def _replay(self, captured: _Captured, cache, layers, tokens, next_pos) -> torch.Tensor:
        slots_host = [layer.slots_used for layer in layers]
        if slots_host != captured.device_slots:  # something else appended since the last replay
            captured.slots.copy_(torch.tensor(slots_host, dtype=torch.long), non_blocking=True)
        captured.ids.copy_(tokens[:, None])
        captured.positions.copy_(next_pos[:, None])
        captured.graph.replay()
        captured.device_slots = [s + 1 for s in slots_host]
        cache.commit_static()
        self.counts["replayed"] += 1
        return captured.logits
