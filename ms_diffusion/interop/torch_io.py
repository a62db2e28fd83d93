"""Safe reading and writing of PyTorch weight files. torch is imported only inside these functions.

Reading never unpickles arbitrary objects: ``.safetensors`` files are read with the safetensors
library (no torch needed), PyTorch pickles (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) with
``torch.load(..., weights_only=True)``, which accepts only tensors and plain containers. Tensors
come back as numpy arrays (bfloat16 widened to float32, which is exact).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from ms_diffusion.io.safetensors_io import read_safetensors
from ms_diffusion.io.state import ConversionError

__all__ = ["read_weights", "write_weights", "read_diffusers_folder", "flat_arrays", "contiguous", "PathLike"]

PathLike = Union[str, os.PathLike]
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _kind(path: Path) -> str:
    """'safetensors', 'torch' or raise: decided by the file's first bytes, not its name."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"        # torch.save's zip archive, or a legacy pickle
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    raise ConversionError(f"{path} is neither a PyTorch checkpoint (.pt/.pth/.ckpt/.bin) nor a .safetensors file")


def _to_numpy(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def read_weights(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Read a weight file safely: (content with tensors as numpy arrays, safetensors header metadata or {}).

    A .safetensors file gives a flat {name: array}; a PyTorch pickle whatever containers it holds.
    """
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"checkpoint {str(p)!r} does not exist" if not p.exists()
                              else f"{str(p)!r} is a folder; pass a weights file (or a diffusers folder with "
                                   f"--from diffusers)")
    kind = _kind(p)
    if kind == "safetensors":
        try:
            return read_safetensors(p)        # bfloat16 tensors come back as float32
        except (OSError, ValueError) as err:
            raise ConversionError(f"cannot read safetensors file {p}: {err}") from None
    try:
        import torch
    except ImportError:
        raise ConversionError(f"reading the PyTorch pickle {p} needs torch (pip install torch), or convert it to "
                              f".safetensors first") from None
    try:
        content = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise ConversionError(f"{p} cannot be loaded safely: it holds objects other than tensors and plain "
                                  f"containers, which torch.load(weights_only=True) refuses to unpickle. Re-save "
                                  f"only its state dict (e.g. torch.save(ckpt['state_dict'], 'weights.pt')) in an "
                                  f"environment you trust") from None
        raise ConversionError(f"cannot read {p} (truncated or corrupt PyTorch file?): {first}") from None
    if not isinstance(content, Mapping):
        raise ConversionError(f"{p} holds a {type(content).__name__}, not a state dict or a checkpoint dict")
    return _to_numpy(content), {}


def flat_arrays(content: Mapping[str, Any], what: str) -> Dict[str, np.ndarray]:
    """``content`` as {name: array}, or ConversionError if it is not a flat state dict."""
    bad = sorted(k for k, v in content.items() if not isinstance(v, np.ndarray))
    if bad:
        raise ConversionError(f"{what} is not a flat state dict: entries {bad[:5]} are not tensors")
    return dict(content)


def contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` C-contiguous with its shape kept (``np.ascontiguousarray`` turns a 0-d array into shape (1,),
    which would change scalar buffers such as ``scale_factor`` or ema-pytorch's ``step``)."""
    a = np.asarray(array)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(a.shape)


def _to_torch(obj: Any) -> Any:
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(contiguous(obj))
    if isinstance(obj, Mapping):
        return {k: _to_torch(v) for k, v in obj.items()}
    return obj


def write_weights(path: PathLike, content: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write numpy weights for PyTorch: ``.safetensors`` (flat {name: array}, no torch needed) or a torch
    pickle (``.pt``/``.pth``/``.ckpt``/``.bin``; nested dicts allowed) written with ``torch.save``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: contiguous(v) for k, v in flat_arrays(content, str(p)).items()}, str(tmp),
                      metadata=dict(metadata or {}))
        elif p.suffix in _TORCH_SUFFIXES:
            try:
                import torch
            except ImportError:
                raise ConversionError(f"writing {p.suffix} needs torch (pip install torch); write .safetensors "
                                      f"instead") from None
            torch.save(_to_torch(dict(content)), str(tmp))
        else:
            raise ConversionError(f"unknown output type {p.suffix!r} for {p}: use .safetensors or .pt")
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def read_diffusers_folder(path: PathLike, subfolder: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """A diffusers model folder (config.json + diffusion_pytorch_model[.fp16].safetensors, sharded or not,
    or .bin) or a transformers one (model[.fp16].safetensors, pytorch_model.bin: a pipeline's
    ``text_encoder/``): (config, state dict). ``subfolder`` picks e.g. ``unet`` / ``vae`` in a pipeline folder."""
    root = Path(path)
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder (a diffusers model folder holds config.json and "
                              f"diffusion_pytorch_model.safetensors)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        subs = sorted(d.name for d in folder.iterdir() if (d / "config.json").is_file())
        hint = f"; it looks like a pipeline folder: pass --subfolder one of {subs}" if subs else ""
        raise ConversionError(f"{folder} has no config.json{hint}")
    config = json.loads(config_file.read_text())
    for stem in ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16", "model", "model.fp16", "pytorch_model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            state: Dict[str, np.ndarray] = {}
            for shard in sorted(set(weight_map.values())):
                content, _ = read_weights(folder / shard)
                state.update(flat_arrays(content, str(folder / shard)))
            return config, state
        for suffix in (".safetensors", ".bin"):
            f = folder / f"{stem}{suffix}"
            if f.is_file():
                content, _ = read_weights(f)
                return config, flat_arrays(content, str(f))
    raise ConversionError(f"{folder} has no weights (diffusion_pytorch_model.safetensors or model.safetensors, "
                          f"or their .bin)")
