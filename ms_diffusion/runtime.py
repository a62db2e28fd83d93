"""Device, execution mode, seeds and CPU workarounds.

``apply_cpu_workarounds()`` only touches environment variables and runs when ``ms_diffusion`` is
imported, before MindSpore creates any CPU kernel. ``setup()`` is called once by entry points
(``train.py``, ``sample.py``, notebooks); models never call it at import.

The oneDNN workaround: on x86 CPUs with AVX-512, MindSpore >= 2.9 picks a oneDNN convolution that
is many times slower than the AVX2 GEMM path (``python bench/ops.py`` times a 3x3 conv 64->64 at
32x32, batch 16, with and without the cap).
Capping oneDNN's ISA at AVX2 restores the fast path. Set ``MS_DIFFUSION_ONEDNN_ISA=native`` to
keep oneDNN's own choice, or set ``ONEDNN_MAX_CPU_ISA`` yourself (it is then left alone).
"""
from __future__ import annotations

import contextlib
import os
import platform
import random
import resource
from dataclasses import dataclass
from typing import Optional

import numpy as np

ONEDNN_ENV = "ONEDNN_MAX_CPU_ISA"
OPT_OUT_ENV = "MS_DIFFUSION_ONEDNN_ISA"
_X86 = {"x86_64", "amd64", "i386", "i686"}


def apply_cpu_workarounds() -> Optional[str]:
    """Cap oneDNN at AVX2 on x86 unless the user chose otherwise. Returns the ISA set, or None.

    Must run before MindSpore's first CPU kernel; importing ``ms_diffusion`` does it.
    """
    choice = os.environ.get(OPT_OUT_ENV, "AVX2").strip()
    if choice.lower() in {"native", "0", "off", "none", ""}:
        return None
    if platform.machine().lower() not in _X86 or ONEDNN_ENV in os.environ:
        return None
    os.environ[ONEDNN_ENV] = choice
    return choice


@dataclass(frozen=True)
class RuntimeInfo:
    device: str
    mode: str
    seed: Optional[int]
    onednn_isa: Optional[str]


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ logging included) for the duration."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def available_device(preferred: str = "auto") -> str:
    """The device to run on: ``preferred`` if MindSpore was built for it, else the best available."""
    import mindspore as ms

    wanted = preferred.upper() if preferred and preferred.lower() != "auto" else None
    names = {"ASCEND": "Ascend", "GPU": "GPU", "CPU": "CPU"}
    if wanted is not None and wanted not in names:
        raise ValueError(f"unknown device {preferred!r}; choose auto, Ascend, GPU or CPU")
    candidates = [names[wanted]] if wanted else ["Ascend", "GPU", "CPU"]
    for dev in candidates:
        if dev == "CPU":
            return dev
        try:
            with _quiet_stderr():  # the probe logs a missing-plugin line for every backend not installed
                if ms.hal.is_available(dev):
                    return dev
        except Exception:  # hal missing or probe failed: treat as unavailable
            pass
    if wanted:
        raise RuntimeError(f"device {preferred!r} is not available in this MindSpore build "
                           f"({ms.__version__}); use --device CPU or install the {preferred} package")
    return "CPU"


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and MindSpore's global RNG."""
    import mindspore as ms

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    ms.set_seed(seed)


def setup(device: str = "auto", mode: str = "graph", seed: Optional[int] = None,
          num_threads: Optional[int] = None) -> RuntimeInfo:
    """Select the device and execution mode and seed the RNGs; call once per process.

    ``mode`` ``"graph"`` keeps PyNative as the global mode and compiles the hot functions with
    ``ms.jit`` (what the library does); ``"pynative"`` turns those jit wrappers off, for debugging.
    """
    isa = apply_cpu_workarounds()
    import mindspore as ms

    if mode not in {"graph", "pynative"}:
        raise ValueError(f"unknown mode {mode!r}; choose graph or pynative")
    dev = available_device(device)
    if mode == "graph" and dev == "CPU":
        refuse_compile_cache()
    ms.set_device(dev)
    if num_threads:
        ms.set_context(runtime_num_threads=int(num_threads))
    set_jit_enabled(mode == "graph")
    if mode == "pynative" and dev == "CPU":
        # PyNative's asynchronous launch pipeline hands every op to queue threads; on CPU with small ops that
        # costs more than it overlaps: a tutorial's small setting ran in 13 s instead of 30. Compiled graphs are
        # the other way round (graph-mode sampling took 40% longer blocking), so only in PyNative mode.
        ms.runtime.launch_blocking()
    if seed is not None:
        seed_everything(seed)
    return RuntimeInfo(device=dev, mode=mode, seed=seed, onednn_isa=os.environ.get(ONEDNN_ENV) or isa)


COMPILE_CACHE_ENV = "MS_COMPILER_CACHE_ENABLE"


def refuse_compile_cache() -> None:
    """Raise ValueError if MindSpore's compile cache is on. On CPU (MindSpore 2.10) a graph loaded from the cache
    runs with garbage in place of its parameters -- a second run of ``jit(nn.Dense)`` gives 1e36 where the first
    gave 1 -- so training turns to inf / NaN and samples to noise, with no error from MindSpore."""
    if os.environ.get(COMPILE_CACHE_ENV, "").strip().lower() in {"1", "true", "on", "yes"}:
        raise ValueError(f"{COMPILE_CACHE_ENV} is set: MindSpore's compile cache runs cached CPU graphs with "
                         f"uninitialised weights (losses become inf / NaN); unset {COMPILE_CACHE_ENV}, or use "
                         f"--mode pynative")


_JIT_ENABLED = True


def set_jit_enabled(enabled: bool) -> None:
    global _JIT_ENABLED
    _JIT_ENABLED = bool(enabled)


def jit_enabled() -> bool:
    return _JIT_ENABLED


def maybe_jit(fn):
    """``ms.jit(fn)`` unless graph compilation was turned off with ``setup(mode="pynative")``."""
    import mindspore as ms

    return ms.jit(fn) if _JIT_ENABLED else fn


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB.

    Linux's ``VmHWM``; not ``ru_maxrss``, which also counts the peak of the process image before ``exec``
    (a copy of the parent at fork: inflated when launched from a large process such as pytest).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20   # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux (bytes on macOS)
