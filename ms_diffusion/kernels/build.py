"""Build-once cache of the CPU kernel library.

The C++ source (``src/msd_kernels.cc``) is compiled at first use with the system C++ compiler against
oneDNN's headers (the ``onednn-devel-cpu-gomp`` wheel, header files only) and linked to the
``libdnnl.so.3`` MindSpore ships -- the one already loaded in the process. The result lives in a
per-user cache, one folder per key: the hash of the source, the compiler's version and flags, the
oneDNN headers' version, MindSpore's version and this CPU's feature flags (it is compiled for the CPU
it runs on). A file lock serialises parallel builders (msrun workers,
pytest processes); the library is compiled into a temporary file and renamed into place, so a killed
build never leaves a half-written library behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

SOURCE = Path(__file__).resolve().parent / "src" / "msd_kernels.cc"
LIB_NAME = "libmsd_kernels.so"
ABI = 3   # must match MsdKernelsAbi() in the source
# -fno-trapping-math / -fno-math-errno change no result; they let GCC vectorise loops with selects and sqrt.
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC",
         "-pthread")


class BuildError(RuntimeError):
    """The kernel library cannot be built here; the message says why."""


def cache_root() -> Path:
    env = os.environ.get("MS_DIFFUSION_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ms_diffusion" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise BuildError("no C++ compiler found (install g++, or set CXX)")


def _include_dirs() -> List[Path]:
    env = os.environ.get("MS_DIFFUSION_DNNL_INCLUDE")
    if env:
        return [Path(env)]
    return [Path(sysconfig.get_paths()["data"]) / "include", Path(sys.prefix) / "include",
            Path("/usr/include"), Path("/usr/local/include")]


def dnnl_include() -> Path:
    """The first folder with oneDNN 3.x's C++ headers (MindSpore's library is 3.x; oneDNN keeps its ABI
    within a major version, so any 3.x headers fit)."""
    for d in _include_dirs():
        if ((d / "dnnl.hpp").is_file() and (d / "oneapi" / "dnnl" / "dnnl_threadpool_iface.hpp").is_file()
                and _header_version(d).startswith("3.")):
            return d
    raise BuildError("oneDNN 3.x headers were not found (pip install onednn-devel-cpu-gomp==2023.2.0, or set "
                     "MS_DIFFUSION_DNNL_INCLUDE to the folder holding dnnl.hpp)")


def _header_version(include: Path) -> str:
    try:
        text = (include / "oneapi" / "dnnl" / "dnnl_version.h").read_text()
    except OSError:
        return "?"
    parts = [re.search(rf"#define DNNL_VERSION_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


def mindspore_dnnl() -> Path:
    import mindspore
    lib = Path(mindspore.__file__).resolve().parent / "lib" / "libdnnl.so.3"
    if not lib.is_file():
        raise BuildError(f"this MindSpore has no bundled oneDNN ({lib} is missing)")
    return lib


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"the C++ compiler {cxx} does not run: {e}") from None
    return out.splitlines()[0] if out else cxx


def _cpu_flags() -> str:
    """The CPU's model and feature flags: the library is compiled for this CPU (-march=native)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def build_key(cxx: str, include: Path, dnnl: Path) -> str:
    import mindspore
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _compiler_version(cxx).encode(), _header_version(include).encode(),
                 mindspore.__version__.encode(), str(dnnl).encode(), str(ABI).encode(), _cpu_flags().encode(),
                 " ".join(FLAGS).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_library(force: bool = False, cache: Optional[Path] = None) -> Path:
    """The path of the compiled library, compiling it first if this key has not been built."""
    cxx, include, dnnl = _compiler(), dnnl_include(), mindspore_dnnl()
    folder = (cache or cache_root()) / build_key(cxx, include, dnnl)
    lib = folder / LIB_NAME
    if lib.is_file() and not force:
        return lib
    with _locked(folder.parent / (folder.name + ".lock")):
        if lib.is_file() and not force:          # built by another process while we waited
            return lib
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
        os.close(fd)
        cmd = [cxx, *FLAGS, f"-I{include}", str(SOURCE),
               "-o", tmp, str(dnnl), f"-Wl,-rpath,{dnnl.parent}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
                raise BuildError(f"compiling {SOURCE.name} failed:\n{tail}")
            os.replace(tmp, lib)
        except subprocess.SubprocessError as e:
            raise BuildError(f"compiling {SOURCE.name} failed: {e}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return lib
