"""File digests: one sha256 reader for every cache key and provenance record."""
from __future__ import annotations

import hashlib
import os
from typing import Union

__all__ = ["file_sha256", "update_with_file"]

PathLike = Union[str, "os.PathLike[str]"]
_BLOCK = 1 << 20


def update_with_file(digest: "hashlib._Hash", path: PathLike) -> "hashlib._Hash":
    """Feed the bytes of ``path`` to ``digest`` in 1 MiB blocks (constant memory); returns ``digest``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest


def file_sha256(path: PathLike) -> str:
    """The hex sha256 of a file's bytes."""
    return update_with_file(hashlib.sha256(), path).hexdigest()
