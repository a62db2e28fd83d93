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
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import mindspore as ms
import numpy as np

from ms_diffusion.io.ms_checkpoint_io import read_ms_checkpoint_entries
from ms_diffusion.io.safetensors_io import read_safetensors

__all__ = ["CheckpointError", "UnreadableCheckpointError", "save_checkpoint", "load_checkpoint",
           "read_checkpoint_meta", "list_checkpoints", "latest_checkpoint", "newest_readable_checkpoint",
           "newest_readable_meta",
           "skipped_checkpoint_line", "remove_temporaries",
           "prune_checkpoints", "checkpoint_path", "export_safetensors", "load_safetensors", "META_KEY"]

META_KEY = "ms_diffusion_meta"
_STEP_RE = re.compile(r"^step_(\d+)\.ckpt$")
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


class UnreadableCheckpointError(CheckpointError):
    """The file is there but does not parse: truncated (a full disk, a copy cut short) or not a checkpoint."""


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


_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


def _write_error(err: BaseException, path: Path) -> Optional[OSError]:
    """``err`` from writing ``path`` as an ``OSError`` naming ``path`` (None if it is no I/O error). safetensors
    reports I/O errors as ``SafetensorError("... (os error 28)")``, MindSpore re-raises ``OSError(28, ...)``
    without the file name."""
    code = err.errno if isinstance(err, OSError) else None
    if not isinstance(err, OSError):
        found = _OS_ERROR_RE.search(str(err))
        if found is None:
            return None
        code = int(found.group(1))
    reason = (os.strerror(code) if code else None) or (err.strerror if isinstance(err, OSError) else None) or str(err)
    message = f"cannot write {path}: {reason}"
    return OSError(code, message, str(path)) if code else OSError(message)


def _atomic_write(path: Path, tmp_name: str, write, also_remove: Tuple[str, ...] = ()) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it and rename it over ``path``.

    A crash at any point leaves the old ``path`` (or none) and no temporary file behind (``also_remove``:
    names of the writer's own temporaries). A failed write (disk full, no permission) raises ``OSError``
    naming ``path``.
    """
    tmp = path.with_name(tmp_name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as err:
        wrapped = _write_error(err, path)
        if wrapped is None:
            raise
        raise wrapped from err
    finally:
        for name in (tmp_name,) + tuple(also_remove):
            leftover = path.with_name(name)
            if leftover.exists():
                leftover.unlink()


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
    # MindSpore appends ".ckpt" to names without it, so the temporary name keeps the suffix; MindSpore itself
    # writes "<name>.tmp" first and leaves it behind when the write fails (a full disk)
    tmp_name = f".{path.stem}.tmp-{os.getpid()}"
    _atomic_write(path, tmp_name + ".ckpt",
                  lambda tmp: ms.save_checkpoint(items, str(tmp), append_dict={META_KEY: json.dumps(meta)}),
                  also_remove=(tmp_name + ".tmp",))
    return path


def load_checkpoint(path: PathLike) -> Tuple[Dict[str, np.ndarray], Dict]:
    """Read a checkpoint written by ``save_checkpoint``: ({name: array}, meta)."""
    arrays = _read(Path(path))
    return arrays, json.loads(str(arrays.pop(META_KEY)))


def read_checkpoint_meta(path: PathLike) -> Dict:
    """Only the metadata of a checkpoint written by ``save_checkpoint`` (the tensors are skipped, not read)."""
    return json.loads(str(_read(Path(path), want=lambda name: name == META_KEY)[META_KEY]))


def _read(path: Path, want: Optional[Callable[[str], bool]] = None) -> Dict:
    """The entries of an ms_diffusion checkpoint that ``want`` keeps, with our errors."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        raw = read_ms_checkpoint_entries(path, want)
    except ValueError as err:          # UnicodeDecodeError included
        raise UnreadableCheckpointError(f"cannot read checkpoint {str(path)!r} (corrupt or not a MindSpore "
                                        f"checkpoint): {err}") from err
    if META_KEY not in raw:
        raise CheckpointError(f"{str(path)!r} is a MindSpore checkpoint but not an ms_diffusion one (no metadata); "
                              f"convert foreign weights with scripts/convert_checkpoint.py")
    return raw


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


def _newest_that_reads(directory: PathLike, read: Callable[[Path], Any]
                       ) -> Tuple[Optional[Path], Any, List[Tuple[Path, CheckpointError]]]:
    """(path, read(path)) of the newest step checkpoint in ``directory`` that ``read`` reads ((None, None) if
    none does), and the newer files that did not read, newest first, with their errors."""
    bad: List[Tuple[Path, CheckpointError]] = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, read(path), bad
        except CheckpointError as err:
            bad.append((path, err))
    return None, None, bad


def newest_readable_checkpoint(directory: PathLike, log: Callable[[str], None] = print
                               ) -> Optional[Tuple[Path, Dict[str, np.ndarray], Dict]]:
    """(path, arrays, meta) of the newest step checkpoint in ``directory`` that reads, None if there is none.

    A newer file that does not read (truncated by a full disk, a copy cut short) is skipped with one line
    through ``log`` naming it and the one used instead; if none reads, the newest one's error is raised.
    """
    path, loaded, bad = _newest_that_reads(directory, load_checkpoint)
    if path is None:
        if bad:
            raise bad[0][1]
        return None
    arrays, meta = loaded
    for bad_path, err in bad:
        log(skipped_checkpoint_line(bad_path, err, path, meta.get("step")))
    return path, arrays, meta


def newest_readable_meta(directory: PathLike) -> Optional[Dict]:
    """The metadata of the newest step checkpoint in ``directory`` whose metadata reads (no tensor is converted),
    None if there is none: what ``newest_readable_checkpoint`` will most likely resume from."""
    return _newest_that_reads(directory, read_checkpoint_meta)[1]


def skipped_checkpoint_line(bad: PathLike, err: CheckpointError, used: PathLike, step) -> str:
    """The one line that says a newer file was passed over: which, why, and what is used instead."""
    why = "is unreadable (truncated or corrupt)" if isinstance(err, UnreadableCheckpointError) else f"was skipped ({err})"
    return f"{bad} {why}; using {used} (step {step}) instead"


def remove_temporaries(directory: PathLike, pid: Optional[int] = None) -> List[Path]:
    """Delete the temporary files this process (``pid``) left in ``directory`` mid-write (an abort)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.glob(f".*.tmp-{os.getpid() if pid is None else int(pid)}*"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


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
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        arrays, header = read_safetensors(path)
    except (OSError, ValueError) as err:
        raise UnreadableCheckpointError(f"cannot read safetensors file {str(path)!r}: {err}") from err
    if META_KEY not in header:
        raise CheckpointError(f"{str(path)!r} has no ms_diffusion metadata; convert foreign weights with "
                              f"scripts/convert_checkpoint.py")
    return arrays, json.loads(header[META_KEY])
