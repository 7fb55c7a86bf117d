"""Whether a Triton kernel may run here: the one rule the kernel modules share.

A kernel runs on CUDA tensors. On CPU tensors it runs only under Triton's interpreter, and only
when the caller's module opted in (each kernel module's `CPU_INTERPRET` flag, which tests set):
the pipeline itself never interprets a kernel (interpreted decode is far slower than the exact
torch paths). The interpreter is chosen by TRITON_INTERPRET=1, which must be set before triton is
first imported in the process (triton.language's own helpers are jit functions made then).

`multiprocessors` is the one launch-sizing fact they share (split-K grids fill the SMs).

Triton is optional: `triton_available` asks without importing it (importing triton is slow), and
`import_triton` imports it for the modules that define their kernels at import.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Triton is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def import_triton():
    """(triton, triton.language), or (None, None) where triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - depends on the machine
        return None, None
    return triton, tl


def interpreting() -> bool:
    """TRITON_INTERPRET=1 is set (kernels launched now run in Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_may_run(device: torch.device, cpu_opt_in: bool) -> bool:
    """A kernel may run on tensors of `device`: CUDA, or CPU when the caller's module opted in
    (`cpu_opt_in`, its CPU_INTERPRET flag) and the interpreter is on. Triton itself is the
    caller's check."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_opt_in and interpreting()


@functools.lru_cache(maxsize=16)
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device, on_cpu: int) -> int:
    """Streaming multiprocessors of a CUDA device; `on_cpu` for CPU tensors (the interpreter in
    tests: a small figure, so that test grids stay small yet have several splits)."""
    if device.type != "cuda":
        return on_cpu
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
