"""Our own CPU kernels, run through MindSpore's ``ops.Custom(func_type="aot")`` (layer 0).

MindSpore's CPU convolutions ask oneDNN for plain NCHW and get its slow GEMM kernels; ours ask for
the layouts oneDNN prefers (blocked, as PyTorch's CPU convolutions do) and reorder at the edges.
``bench/cpu_kernels.py`` times them against the built-in ops and PyTorch.

When they are used: on CPU, x86-64, fp32, when the library builds (once per machine and version; see
``build.py``). Anything else -- Ascend / GPU, ``MS_DIFFUSION_CPU_KERNELS=0``, no compiler, no oneDNN
headers, a failed build -- falls back to MindSpore's built-in ops, with one notice on stderr saying
why (none for the variable or a non-CPU device).
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ms_diffusion.kernels.build import ABI, BuildError, build_library

__all__ = ["enabled", "library", "require_library", "disabled_reason", "reset", "float_settings", "BuildError", "ENV"]

ENV = "MS_DIFFUSION_CPU_KERNELS"
_X86 = {"x86_64", "amd64"}
_state: dict = {}


def _device_target() -> str:
    import mindspore as ms
    return str(ms.get_context("device_target")).upper()


THREADS_ENV = "MS_DIFFUSION_KERNEL_THREADS"


def _default_threads() -> None:
    """The kernels' thread count, fixed before the library starts its pool: the user's OMP_NUM_THREADS as
    Python sees it (the test runner sets 1 per process), else the cores this process may use."""
    if os.environ.get(THREADS_ENV, "").strip():
        return
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    try:
        n = int(omp) if omp else len(os.sched_getaffinity(0))
    except (ValueError, AttributeError, OSError):
        n = os.cpu_count() or 1
    os.environ[THREADS_ENV] = str(max(1, n))


def _switched_off() -> bool:
    if os.environ.get(ENV, "1").strip().lower() in {"0", "off", "false", "no"}:
        _state["reason"] = f"{ENV}=0"
        return True
    return False


def _load() -> Optional[Path]:
    if _switched_off():
        return None
    if platform.machine().lower() not in _X86:
        _state["reason"] = f"not an x86-64 CPU ({platform.machine()})"
        return None
    _default_threads()
    try:
        lib = build_library()
        import ctypes
        handle = ctypes.CDLL(str(lib))
        abi = handle.MsdKernelsAbi()
        if abi != ABI:
            raise BuildError(f"{lib} has interface version {abi}, expected {ABI}")
    except (BuildError, OSError, AttributeError) as e:
        _state["reason"] = str(e)
        print(f"ms_diffusion: CPU kernels off, using MindSpore's built-in ops: {e}", file=sys.stderr)
        return None
    return lib


def library() -> Optional[Path]:
    """The compiled kernel library, or None where the built-in ops are used (see ``disabled_reason``)."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"]


def enabled() -> bool:
    """True when layers built now use our kernels: CPU device, kernels not disabled, library built."""
    if _switched_off() or _device_target() != "CPU":
        return False
    return library() is not None


def require_library(lib: Optional[str] = None) -> str:
    """``lib``, else the built library; an error when there is none (callers check ``enabled()`` first)."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError(f"the CPU kernel library is not available: {disabled_reason()}")
    return str(lib)


def disabled_reason() -> Optional[str]:
    """Why the kernels are off (None when they are on or not yet asked for)."""
    return _state.get("reason")


def reset() -> None:
    """Forget the cached decision (tests change the environment between cases)."""
    _state.clear()


def float_settings(values: Sequence[float]) -> "mindspore.Tensor":
    """A kernel's settings that hold non-integers (a GroupNorm's eps, an attention's scale) as the int64 tensor
    carrying their float64 bit patterns, which the kernels read back as doubles. Mixed precision
    (``Cell.to_float``, amp O2 keeps norms in float32 with it) casts the floating-point tensors inside a cell: a
    float64 settings tensor arrived as float32, was read as doubles, and its group count came out 0 (SIGFPE)."""
    from mindspore import Tensor
    return Tensor(np.asarray(values, np.float64).view(np.int64))
