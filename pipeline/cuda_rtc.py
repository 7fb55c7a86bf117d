"""CUDA C++ kernels compiled at run time by NVRTC, for the few kernels Triton cannot express well.

NVRTC ships with PyTorch's CUDA builds (libnvrtc), so this needs no CUDA toolkit on the machine.
Loading the compiled module and launching its kernels go through `torch.cuda._utils`, PyTorch's
own NVRTC binding behind its experimental `torch.cuda._compile_kernel`. Those are private
helpers, so `available()` probes them once, and a caller keeps another path (its Triton kernel)
for when they are missing or a compilation fails (`CudaRtcError`).

Sources are self-contained: no headers are included (NVRTC's built-in device functions and
inline PTX only), so no include path is needed either.
"""

from __future__ import annotations

import ctypes
import functools

import torch


class CudaRtcError(RuntimeError):
    """The kernel could not be compiled or loaded here."""


def _utils():
    import torch.cuda._utils as utils

    return utils


@functools.lru_cache(maxsize=1)
def _nvrtc():
    utils = _utils()
    for name in ("_get_gpu_rtc_library", "_get_nvrtc_library"):
        get = getattr(utils, name, None)
        if get is not None:
            return get()
    raise CudaRtcError("this PyTorch exposes no NVRTC library loader")


@functools.cache
def _probe(index: int) -> bool:
    try:
        _nvrtc()
        _utils()._cuda_load_module  # noqa: B018 - the module loader exists
    except Exception:  # noqa: BLE001 - any failure means: not here
        return False
    return torch.cuda.get_device_capability(index) >= (8, 0)


def available(device: torch.device) -> bool:
    """Kernels can be compiled and launched on `device` (CUDA, sm_80 or newer, helpers present)."""
    if device.type != "cuda" or torch.version.hip:
        return False
    return _probe(device.index if device.index is not None else torch.cuda.current_device())


def _check(result: int, what: str) -> None:
    if result != 0:
        raise CudaRtcError(f"NVRTC {what} failed with status {result}")


def compile_cubin(source: str, name: str, arch: str, defines: dict[str, int], nvrtc=None) -> bytes:
    """The CUBIN of `source` for `arch` (e.g. "sm_90") with macros `defines`; raises CudaRtcError
    with NVRTC's log. `nvrtc`: a loaded libnvrtc (ctypes) instead of PyTorch's."""
    lib = nvrtc if nvrtc is not None else _nvrtc()
    options = [f"-D{key}={value}" for key, value in defines.items()]
    prog = ctypes.c_void_p()
    created = lib.nvrtcCreateProgram(
        ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None
    )
    _check(created, "program creation")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", *(o.encode() for o in options)]
        result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise CudaRtcError(f"NVRTC could not compile {name}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "CUBIN size")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(prog, cubin), "CUBIN copy")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_kernel(source: str, name: str, device_index: int, defines: dict[str, int]):
    """Compile `source` (an `extern "C"` kernel `name`, macros `defines`) for the device's
    architecture and load it there; returns a launcher called as
    `kernel(grid=(x, y, z), block=(x, y, z), args=[tensors, ints, floats])` on the current stream
    (tensors pass their data pointers, ints as C int, floats as C double)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = compile_cubin(source, name, f"sm_{major}{minor}", defines)
    with torch.cuda.device(device_index):
        try:
            loaded = _utils()._cuda_load_module(cubin, [name])
        except Exception as exc:  # noqa: BLE001
            raise CudaRtcError(f"could not load {name}: {exc}") from exc
    return loaded[name] if isinstance(loaded, dict) else getattr(loaded, name)
