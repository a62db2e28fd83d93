"""Load the PyTorch anchors for parity tests without their heavy package-level imports.

denoising-diffusion-pytorch's package ``__init__`` imports its Trainer stack (torchvision, accelerate,
pytorch_fid). Its ``Unet`` / ``GaussianDiffusion`` module needs only torch, einops, scipy and
ema-pytorch, so we stub the Trainer-only modules and load that one file.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _stub(name: str, **attrs) -> bool:
    """Put a stand-in for ``name`` in sys.modules unless the real one imports; True if stubbed."""
    if name in sys.modules:
        return False
    try:
        importlib.import_module(name)
        return False
    except Exception:
        pass
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    sys.modules[name] = mod
    return True


def lucidrains():
    """The ``denoising_diffusion_pytorch.denoising_diffusion_pytorch`` module (skips if not installed)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")
    name = "denoising_diffusion_pytorch.denoising_diffusion_pytorch"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("denoising_diffusion_pytorch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("denoising-diffusion-pytorch is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    stubbed = [name for name, ok in (
        ("torchvision", _stub("torchvision", transforms=types.SimpleNamespace(), utils=types.SimpleNamespace())),
        ("accelerate", _stub("accelerate", Accelerator=object)),
        ("ema_pytorch", _stub("ema_pytorch", EMA=object))) if ok]
    pkg = types.ModuleType("denoising_diffusion_pytorch")
    pkg.__path__ = [str(root)]
    sys.modules.setdefault("denoising_diffusion_pytorch", pkg)
    for sub in ("version", "attend", "denoising_diffusion_pytorch"):
        full = f"denoising_diffusion_pytorch.{sub}"
        if full in sys.modules:
            continue
        s = importlib.util.spec_from_file_location(full, root / f"{sub}.py")
        module = importlib.util.module_from_spec(s)
        sys.modules[full] = module
        s.loader.exec_module(module)
    for stub in stubbed:   # stand-ins only for that import: later find_spec calls (diffusers) must not see them
        sys.modules.pop(stub, None)
    torch.set_num_threads(2)
    return sys.modules[name]


def open_clip(module: str):
    """``open_clip.<module>`` (``tokenizer``, ``transformer``) without the package ``__init__``, which imports
    torchvision and timm for the image towers (skips if open-clip-torch is not installed)."""
    pytest.importorskip("torch")
    pytest.importorskip("ftfy")
    full = f"open_clip.{module}"
    if full in sys.modules:
        return sys.modules[full]
    loaded = sys.modules.get("open_clip")
    spec = loaded.__spec__ if loaded is not None else importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed")
    misc = types.SimpleNamespace(FrozenBatchNorm2d=object)
    stubbed = [name for name, ok in (
        ("torchvision", _stub("torchvision", ops=types.SimpleNamespace(misc=misc))),
        ("torchvision.ops", _stub("torchvision.ops", misc=misc)),
        ("torchvision.ops.misc", _stub("torchvision.ops.misc", FrozenBatchNorm2d=object))) if ok]
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec          # find_spec("open_clip") keeps answering as for the real package
    sys.modules.setdefault("open_clip", pkg)
    try:
        return importlib.import_module(full)
    finally:
        for stub in stubbed:
            sys.modules.pop(stub, None)
