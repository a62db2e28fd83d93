"""The one reader of trained weights: a run folder, a step checkpoint (``.ckpt``) or an export (``.safetensors``).

A step checkpoint holds groups ``online.*``, ``ema.*`` (and training state); an export holds one
weight set, named by its metadata's ``weights``. Every file written by ms_diffusion carries the
experiment config in its metadata. A run folder gives its newest file that reads.
"""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from ms_diffusion.io.checkpoint import (META_KEY, CheckpointError, latest_checkpoint, list_checkpoints,
                                        load_checkpoint, load_safetensors, skipped_checkpoint_line)
from ms_diffusion.io.safetensors_io import read_safetensors_metadata

__all__ = ["resolve_checkpoint", "read_weights", "read_weight_groups", "WEIGHT_GROUPS"]

#: The weight groups a step checkpoint holds for inference (the rest is training state).
WEIGHT_GROUPS = ("online", "ema")


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A .ckpt / .safetensors file, or a run folder (its newest checkpoint, else model.safetensors)."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)
        if found is None and (p / "model.safetensors").is_file():
            found = p / "model.safetensors"
        if found is None:
            raise CheckpointError(f"no checkpoint in {str(p)!r} (looked for checkpoints/step_*.ckpt and "
                                  f"model.safetensors)")
        return found
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    return p


_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _pytorch_kind(p: Path) -> Optional[str]:
    """What PyTorch file ``p`` is, by its first bytes (or, failing that, its extension), or None."""
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                if any(name.endswith("data.pkl") for name in z.namelist()):
                    return "a torch.save zip archive"
        except (OSError, zipfile.BadZipFile):
            pass
        return "a zip archive" if p.suffix.lower() in _TORCH_SUFFIXES else None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a legacy torch.save pickle"
    if p.suffix.lower() in _TORCH_SUFFIXES:
        return f"a {p.suffix} file"
    return None


def _check_not_pytorch(p: Path) -> None:
    kind = _pytorch_kind(p)
    if kind is not None:
        raise CheckpointError(
            f"{p} is a PyTorch checkpoint ({kind}), not an ms_diffusion one: convert it with "
            f"scripts/convert_checkpoint.py, e.g. python scripts/convert_checkpoint.py from-lucidrains {p} "
            f"{p.stem}_ms.ckpt for a denoising-diffusion-pytorch model (from-ldm for ldm / Stable "
            f"Diffusion, from-diffusers for a diffusers folder; see docs/interop.md), then load the converted file")


def _read_weights(p: Path, weights: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """({name: array} of the ``weights`` group ("ema" / "online"), metadata) of a checkpoint or export."""
    _check_not_pytorch(p)   # MindSpore's own message for these is about its file format, not the fix
    if p.suffix == ".safetensors":
        arrays, meta = load_safetensors(p)   # an export: one set of weights, named in its metadata
        held = meta.get("weights", "ema")
        if held != weights:
            raise CheckpointError(f"{p} holds only {held.upper() if held == 'ema' else held} weights; use "
                                  f"--weights {held} or a training checkpoint")
        prefix = ""
    else:
        arrays, meta = load_checkpoint(p)
        prefix = f"{weights}."
    if "config" not in meta:
        raise CheckpointError(f"{p} has no experiment config in its metadata; it was not written by ms_diffusion")
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, meta


def _export_step(p: Path) -> int:
    """The step recorded in an export's header (-1 if it does not say or does not read), without its tensors."""
    try:
        return int(json.loads(read_safetensors_metadata(p)[META_KEY]).get("step", -1))
    except Exception:
        return -1


def is_own_file(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a file train.py wrote (an export with our metadata, or a step checkpoint) rather than
    someone else's (a Stable Diffusion .safetensors / .ckpt), without reading its tensors."""
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        try:
            return META_KEY in read_safetensors_metadata(p)
        except (OSError, ValueError):
            return False
    return p.suffix.lower() == ".ckpt" and p.is_file() and _pytorch_kind(p) is None


def _folder_candidates(folder: Path) -> List[Path]:
    """A run folder's weights, newest step first: its step checkpoints (``checkpoints/``, else the folder
    itself) and ``model.safetensors`` (after a checkpoint of the same step)."""
    found = list_checkpoints(folder / "checkpoints") or list_checkpoints(folder)
    ranked = [(step, 0, path) for step, path in found]
    export = folder / "model.safetensors"
    if export.is_file():
        ranked.append((_export_step(export), 1, export))
    return [path for _, _, path in sorted(ranked, key=lambda item: (-item[0], item[1]))]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def read_weights(path: Union[str, Path], weights: str = "ema", log: Optional[Callable[[str], None]] = None
                 ) -> Tuple[Path, Dict[str, np.ndarray], dict]:
    """(file, {name: array} of the ``weights`` group, metadata) of a checkpoint, an export or a run folder.

    A run folder gives its newest weights that read: a newer file that does not (truncated by a full disk,
    a copy cut short) is skipped with one line through ``log`` (default: stderr) naming it and the file
    used. Weights with NaN or infinite values are refused (``CheckpointError`` naming the file).
    """
    p = Path(path)
    if not p.is_dir():
        p = resolve_checkpoint(p)
        selected, meta = _read_weights(p, weights)
    else:
        candidates = _folder_candidates(p)
        if not candidates:
            resolve_checkpoint(p)   # raises: no checkpoint in the folder
        skipped: List[Tuple[Path, CheckpointError]] = []
        for candidate in candidates:
            try:
                selected, meta = _read_weights(candidate, weights)
            except CheckpointError as err:
                skipped.append((candidate, err))
                continue
            for bad, err in skipped:
                (log or _stderr)(skipped_checkpoint_line(bad, err, candidate, meta.get("step")))
            p = candidate
            break
        else:
            raise skipped[0][1]
    _check_finite(selected, p)
    return p, selected, meta


def _check_finite(arrays: Dict[str, np.ndarray], p: Path) -> None:
    bad = {name: int(np.size(a) - np.count_nonzero(np.isfinite(a))) for name, a in arrays.items()
           if np.issubdtype(np.asarray(a).dtype, np.floating) and not np.isfinite(a).all()}
    if bad:
        total = sum(int(np.size(a)) for a in arrays.values())
        names = ", ".join(sorted(bad)[:3]) + (", ..." if len(bad) > 3 else "")
        raise CheckpointError(f"{p}: {sum(bad.values())} of its {total} weights are NaN or infinite ({len(bad)} "
                              f"tensor(s): {names}); the run diverged before this was saved. Sample an earlier "
                              f"checkpoint of the run (--ckpt RUN/checkpoints/step_N.ckpt) or retrain with a lower "
                              f"train.lr")


def read_weight_groups(path: Union[str, Path]) -> Tuple[Path, Dict[str, Dict[str, np.ndarray]], dict]:
    """(file, {group: {name: array}}, metadata) of every weight set in a checkpoint, export or run folder.

    A ``.ckpt`` gives its ``online`` and ``ema`` groups (optimizer and loss-scaler state are left out); an
    export gives the one set its metadata names. Raises ``CheckpointError`` for a file without weights or
    without an experiment config.
    """
    p = resolve_checkpoint(path)
    _check_not_pytorch(p)
    if p.suffix == ".safetensors":
        arrays, meta = load_safetensors(p)
        groups = {meta.get("weights", "ema"): arrays}
    else:
        arrays, meta = load_checkpoint(p)
        groups = {}
        for group in WEIGHT_GROUPS:
            prefix = f"{group}."
            found = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            if found:
                groups[group] = found
    if "config" not in meta:
        raise CheckpointError(f"{p} has no experiment config in its metadata; it was not written by ms_diffusion")
    if not groups:
        raise CheckpointError(f"{p} holds no online or ema weights")
    return p, groups, meta
