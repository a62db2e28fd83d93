"""Output files named on a command line, checked before any work: a run must not fail at its very end.

``check_output_file(path, flag, kind)`` raises a ``UsageError`` naming the flag, the path and the fix
when the file could not be written: it names a folder, its extension is not one the writer
understands (``kind``: image, gif, npz, json), a parent is a file, or the nearest existing folder
is not writable (tested by creating and deleting a temporary file there, so it is right for root
and read-only file systems too). Nothing is left behind: missing parent folders are not created
here (the writers create them when they write).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from ms_diffusion.cli.common import UsageError

__all__ = ["check_output_file", "check_distinct", "OUTPUT_SUFFIXES"]


def _image_suffixes() -> Tuple[str, ...]:
    """Extensions PIL can write a grid to (of the usual ones)."""
    from PIL import Image

    Image.init()
    known = Image.registered_extensions()
    wanted = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
    return tuple(s for s in wanted if known.get(s) in Image.SAVE)


#: kind -> (accepted extensions: None for the image formats PIL writes, () for any; what it is; an example)
OUTPUT_SUFFIXES: Dict[str, Tuple[Optional[Sequence[str]], str, str]] = {
    "image": (None, "an image", "samples.png"),
    "gif": ((".gif",), "an animated GIF", "denoise.gif"),
    "npz": ((".npz",), "a NumPy archive", "samples.npz"),
    "json": ((), "a JSON file", "result.json"),
}


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output_file(path: str, flag: str, kind: str) -> Path:
    """``path`` given to ``flag`` as a writable file of ``kind`` ("image", "gif", "npz", "json"), or a UsageError."""
    suffixes, what, example = OUTPUT_SUFFIXES[kind]
    suffixes = _image_suffixes() if suffixes is None else tuple(suffixes)
    p = Path(path).expanduser()
    shown = f"{flag} {path!r}"
    if str(path).endswith(("/", os.sep)) or p.is_dir():
        raise UsageError(f"{shown} is a folder; {flag} takes a file name, e.g. {flag} {p / example}")
    suffix = p.suffix.lower()
    if suffixes and suffix not in suffixes:
        has = f"has the extension {p.suffix!r}" if suffix else "has no extension"
        raise UsageError(f"{shown} {has}; {flag} writes {what}: end the name with {' '.join(suffixes)}, "
                         f"e.g. {flag} {p.with_suffix(suffixes[0]) if p.name else example}")
    parent = p.parent if str(p.parent) else Path(".")
    existing = _nearest_existing(parent.absolute())
    if not existing.is_dir():
        raise UsageError(f"{shown}: {existing} is a file, not a folder, so {parent} cannot be created; choose "
                         f"another path for {flag}")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{shown}: the file exists and is not writable; choose another path for {flag} or "
                         f"make it writable")
    try:  # create and delete a file where the output will go: permissions, read-only file systems, root
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = f"write in {existing}" if existing == parent.absolute() else f"create {parent} in {existing}"
        raise UsageError(f"{shown}: cannot {where}: {reason}; choose a writable location for {flag}") from None
    return p


def check_distinct(paths: Dict[str, Optional[str]]) -> None:
    """No two of the given outputs ({flag: path}, None for absent) are the same file."""
    seen: Dict[Path, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        key = Path(path).expanduser().absolute()
        if key in seen:
            raise UsageError(f"{seen[key]} and {flag} both name {path!r}; give them different files")
        seen[key] = flag
