"""Atomic, self-describing checkpoints in MindSpore's format.

A checkpoint file holds named tensors in groups (``online.*`` model, ``ema.*`` EMA copy,
``optimizer.*``, ``loss_scaler.*``) and one JSON string of metadata: the experiment config, the
step, the data position and RNG state. Writes go to a temporary file in the same folder, are
fsynced and renamed over the target, so a crash or kill at any moment leaves either the old file
or the new one, never half of one. ``keep_last`` prunes older step checkpoints after each save.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import mindspore as ms
import numpy as np

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
           "prune_checkpoints", "checkpoint_path", "export_safetensors", "load_safetensors", "META_KEY"]

META_KEY = "ms_diffusion_meta"
_STEP_RE = re.compile(r"^step_(\d+)\.ckpt$")
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


def checkpoint_path(directory: PathLike, step: int) -> Path:
    return Path(directory) / f"step_{int(step):08d}.ckpt"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, tmp_name: str, write) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it and rename it over ``path``.

    A crash at any point leaves the old ``path`` (or none) and no temporary file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: PathLike, tensors: Mapping[str, Union[ms.Parameter, ms.Tensor, np.ndarray]],
                    meta: Mapping) -> Path:
    """Atomically write ``tensors`` (name -> value) and JSON-serialisable ``meta`` to ``path``."""
    path = Path(path)
    items = []
    for name, value in tensors.items():
        if isinstance(value, ms.Parameter):
            data = value
        else:
            data = ms.Parameter(ms.Tensor(np.asarray(value.asnumpy() if isinstance(value, ms.Tensor) else value)),
                                name=name, requires_grad=False)
        items.append({"name": name, "data": data})
    # MindSpore appends ".ckpt" to names without it, so the temporary name keeps the suffix
    _atomic_write(path, f".{path.stem}.tmp-{os.getpid()}.ckpt",
                  lambda tmp: ms.save_checkpoint(items, str(tmp), append_dict={META_KEY: json.dumps(meta)}))
    return path


def load_checkpoint(path: PathLike) -> Tuple[Dict[str, np.ndarray], Dict]:
    """Read a checkpoint written by ``save_checkpoint``: ({name: array}, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        raw = ms.load_checkpoint(str(path))
    except Exception as err:  # MindSpore raises ValueError/RuntimeError with long messages
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} (corrupt or not a MindSpore checkpoint): "
                              f"{first}") from err
    if META_KEY not in raw:
        raise CheckpointError(f"{str(path)!r} is a MindSpore checkpoint but not an ms_diffusion one (no metadata); "
                              f"convert foreign weights with scripts/convert_checkpoint.py")
    meta = json.loads(str(raw.pop(META_KEY)))
    arrays = {name: (value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)) for name, value in raw.items()}
    return arrays, meta


def list_checkpoints(directory: PathLike) -> List[Tuple[int, Path]]:
    """(step, path) of every step checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: PathLike, keep_last: int) -> List[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints; returns the deleted paths."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(directory)
    doomed = [p for _, p in found[:-keep_last]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def export_safetensors(path: PathLike, tensors: Mapping[str, np.ndarray], meta: Mapping) -> Path:
    """Write inference weights as a .safetensors file (atomic); ``meta`` goes into its header as JSON."""
    from safetensors.numpy import save_file  # installed with MindSpore

    # np.ascontiguousarray makes 0-d arrays 1-d; scalars (a latent scale_factor) must keep shape ()
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}
    path = Path(path)
    _atomic_write(path, f".{path.name}.tmp-{os.getpid()}",
                  lambda tmp: save_file(arrays, str(tmp), metadata={META_KEY: json.dumps(meta)}))
    return path


def load_safetensors(path: PathLike) -> Tuple[Dict[str, np.ndarray], Dict]:
    """Read a file written by ``export_safetensors``: ({name: array}, meta)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {err}") from err
    if META_KEY not in header:
        raise CheckpointError(f"{str(path)!r} has no ms_diffusion metadata; convert foreign weights with "
                              f"scripts/convert_checkpoint.py")
    return arrays, json.loads(header[META_KEY])
