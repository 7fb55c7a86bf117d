"""Device helpers for the benchmark: timing, memory, OOM handling, copy bandwidth, environment.

Everything here works on CPU too (timings by `time.perf_counter`, memory figures `None`), so
the benchmark's structure is testable without a GPU.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

GIB = 1024**3
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
DEFAULT_ALLOC_CONF = "expandable_segments:True"  # less fragmentation as caches grow and shrink


def prefer_expandable_segments() -> str | None:
    """Ask the CUDA caching allocator for expandable segments unless the user chose a config.

    Must run before CUDA is initialised; returns the config in force (None: the default).
    """
    if ALLOC_CONF not in os.environ and not torch.cuda.is_initialized():
        os.environ[ALLOC_CONF] = DEFAULT_ALLOC_CONF
    return os.environ.get(ALLOC_CONF)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def sync(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "cuda error: out of memory" in text)


def cleanup(device: torch.device) -> None:
    """Free what the last measurement left (cycles included) before the next one; CUDA only."""
    if is_cuda(device):
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if is_cuda(device) else None


def allocated_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if is_cuda(device) else None


def free_bytes(device: torch.device) -> int | None:
    if not is_cuda(device):
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


class Marks:
    """Timestamps on the device's timeline (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = is_cuda(device)
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks (synchronises)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def timed(fn, device: torch.device):
    """Run `fn()` between a synchronise and device marks; returns (result, seconds)."""
    sync(device)
    marks = Marks(device)
    marks.mark()
    out = fn()
    marks.mark()
    return out, marks.intervals()[0]


def summary(seconds: list[float]) -> dict:
    """Median, p10, p90 of a list of durations, in milliseconds."""
    if not seconds:
        return {"median_ms": None, "p10_ms": None, "p90_ms": None, "n": 0}
    ms = sorted(s * 1e3 for s in seconds)

    def pick(q: float) -> float:
        return ms[min(len(ms) - 1, max(0, round(q * (len(ms) - 1))))]

    return {"median_ms": statistics.median(ms), "p10_ms": pick(0.1), "p90_ms": pick(0.9), "n": len(ms)}


def copy_bandwidth(device: torch.device, gib: float = 1.0, reps: int = 20) -> dict:
    """Device-to-device copy bandwidth: (bytes read + bytes written) / time, median of `reps`."""
    n = int(gib * GIB) // 2
    if not is_cuda(device):
        n = min(n, 64 * 1024**2 // 2)  # 64 MiB on CPU: a figure, not a ceiling
    nbytes, med = _copy_times(device, n, reps)
    cleanup(device)
    return {
        "bytes_moved": nbytes,
        "median_ms": med * 1e3,
        "bytes_per_s": nbytes / med,
        "tb_per_s": nbytes / med / 1e12,
        "method": "dst.copy_(src) of a bf16 buffer, bytes read + written / median time",
    }


def _copy_times(device: torch.device, n: int, reps: int) -> tuple[int, float]:
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), device)[1] for _ in range(reps)]
    return 2 * src.numel() * src.element_size(), statistics.median(times)


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001 - an absent optional library is a fact to record, not an error
        return None


def _git(*args: str) -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None
    except Exception:  # noqa: BLE001 - no git on the device machine is fine
        return None


def _git_state() -> dict:
    """The code's commit. KVPIPE_GIT_COMMIT, when set, names it and wins: a `git archive` copy
    run on a GPU machine may sit inside some other checkout, whose HEAD is not this code's."""
    named = os.environ.get("KVPIPE_GIT_COMMIT")
    if named:
        return {"git_commit": named, "git_dirty": False, "git_commit_from": "KVPIPE_GIT_COMMIT"}
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "git_commit_from": "git",
    }


def environment(device: torch.device) -> dict:
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device_type": device.type,
        "alloc_conf": os.environ.get(ALLOC_CONF),
        # the decode step's form (pipeline.decode_graph): graphs on one CUDA GPU unless overridden
        "decode_mode": os.environ.get("KVPIPE_DECODE") or "default",
        **_git_state(),
        "cpu_threads": torch.get_num_threads(),
    }
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            device_memory_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
            driver=_nvidia_smi_driver(),
        )
    else:
        env.update(device_name=platform.processor() or "cpu", device_memory_bytes=None)
    return env


def _nvidia_smi_driver() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except Exception:  # noqa: BLE001
        return None
