"""A folder of image files (recursive), optionally with one subfolder per class.

Layout and labels:

* images under class subfolders ``root/<class>/**/*.png`` -> labels are the indices of the sorted
  class-folder names (``num_classes`` = number of such folders);
* images directly in ``root`` (a "flat" folder, possibly with more images in subfolders) -> no
  labels: every label is 0 and ``num_classes`` is None.

Extensions .jpg .jpeg .png .bmp .tif .tiff (any case); names starting with "." are ignored. Any PIL
mode (gray, RGB, RGBA, palette, 16-bit, CMYK) is converted to the requested channels.

Every file is decoded once up front by ``DecodeImage`` -- the very function the pipeline decodes
with (PIL) -- so a file that passes the scan cannot fail later and a damaged file is found before
training starts, never mid-epoch (see ``transforms`` for why not MindSpore's C++ decoder).
Unusable files (undecodable, or smaller than ``image_size`` in either dimension) raise one
``BadDataError`` listing them, or with ``skip_bad=True`` are left out and counted. Every rank
scans the whole folder, so all ranks agree on the file list.

Captions (for text-to-image training), in either of HuggingFace's image-folder forms:

* ``root/metadata.jsonl``, one JSON object per line with ``file_name`` (the image's path relative to
  ``root``) and ``text`` (or ``caption``);
* ``NAME.txt`` beside ``NAME.png`` (UTF-8, surrounding whitespace removed).

An image without a caption gets the empty caption (trained as the unconditional prompt) and is
counted in the dataset's description. A malformed ``metadata.jsonl`` line, or an entry naming an image
that does not exist, is a ``BadDataError`` naming the line.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import UnidentifiedImageError

import mindspore.dataset as ds
import mindspore.dataset.vision as vision

from ms_diffusion.data.source import BadDataError, DataNotFoundError, ImageSource, PathLike, resolve_workers
from ms_diffusion.data.transforms import DecodeImage, Size, SizeLike, as_channels, as_size, resize_crop_ops

__all__ = ["ImageFolderSource", "scan_image_folder", "read_folder_captions", "FolderScan", "IMAGE_EXTENSIONS",
           "DEFAULT_FOLDER_IMAGE_SIZE", "METADATA_FILE"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: the captions file of HuggingFace's image-folder layout
METADATA_FILE = "metadata.jsonl"
#: ``image_size`` when the caller gives none.
DEFAULT_FOLDER_IMAGE_SIZE = 64
_LISTED = 10  # bad files named in an error message or warning


@dataclass
class FolderScan:
    """What ``scan_image_folder`` found: usable files (sorted) with labels, and what it left out."""

    root: Path
    files: List[Path]
    labels: np.ndarray  # int32 (len(files),)
    class_names: Optional[List[str]]
    skipped: List[Tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    ignored: int = 0  # files without a supported extension


def _walk(root: Path) -> Tuple[List[Path], int]:
    """Candidate image files under ``root`` (relative, sorted) and the count of other files."""
    candidates, ignored, seen = [], 0, set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        stems = {os.path.splitext(n)[0] for n in files if n.lower().endswith(IMAGE_EXTENSIONS)}
        for name in files:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                candidates.append(Path(folder, name).relative_to(root))
            elif not (name == METADATA_FILE and real == os.path.realpath(root)
                      or name.lower().endswith(".txt") and os.path.splitext(name)[0] in stems):   # captions
                ignored += 1
    return sorted(candidates), ignored


def _problem(path: Path, min_hw: Size, decode: DecodeImage) -> Optional[str]:
    """Why ``path`` cannot be used (decoding it fully, exactly as the pipeline will), or None if it is fine."""
    try:
        width, height = decode(np.fromfile(path, dtype=np.uint8)).size
    except UnidentifiedImageError:  # its message names an in-memory buffer, not the file: say what it means
        return "cannot be decoded: PIL does not recognise it as an image (empty, damaged, or not an image file)"
    except Exception as exc:  # PIL raises many types on damaged files (OSError, SyntaxError, struct.error, ...)
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    if height < min_hw[0] or width < min_hw[1]:
        return f"is {width}x{height} (WxH), smaller than the requested {min_hw[1]}x{min_hw[0]}"
    return None


def scan_image_folder(root: PathLike, image_size: SizeLike, *, channels: int = 3, skip_bad: bool = False,
                      num_workers: Optional[int] = None) -> FolderScan:
    """List, label and validate the images under ``root``; see the module docstring for the rules.

    Raises ``DataNotFoundError`` for a missing folder or one without supported images, and
    ``BadDataError`` naming unusable files unless ``skip_bad`` (then they are in ``skipped``).
    """
    root = Path(root).expanduser()
    size = as_size(image_size)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataNotFoundError(f"image folder {root} {what}; pass --data-dir pointing at a folder of images")
    candidates, ignored = _walk(root)
    if not candidates:
        others = f" ({ignored} other files found)" if ignored else " (it is empty)"
        raise DataNotFoundError(f"image folder {root} has no images with a supported extension "
                                f"({' '.join(IMAGE_EXTENSIONS)}){others}; point --data-dir at your images")

    flat = any(len(rel.parts) == 1 for rel in candidates)
    class_names = None if flat else sorted({rel.parts[0] for rel in candidates})
    class_ids = {name: i for i, name in enumerate(class_names or [])}

    with ThreadPoolExecutor(max_workers=resolve_workers(num_workers)) as pool:  # PIL decodes without the GIL
        decode = DecodeImage(channels)
        problems = list(pool.map(lambda rel: _problem(root / rel, size, decode), candidates))

    files, labels, skipped = [], [], []
    for rel, problem in zip(candidates, problems):
        if problem is None:
            files.append(root / rel)
            labels.append(0 if flat else class_ids[rel.parts[0]])
        else:
            skipped.append((root / rel, problem))
    if skipped and (not skip_bad or not files):
        listing = "".join(f"  {path}: {why}\n" for path, why in skipped[:_LISTED])
        more = f"  ... and {len(skipped) - _LISTED} more\n" if len(skipped) > _LISTED else ""
        if files:
            fix = ("Fix: remove or replace these files, lower image_size, or leave them out (they are counted and "
                   "reported) with the config key data.skip_bad: true -- on the command line "
                   "--set data.skip_bad=true; in Python build_source(..., skip_bad=True).")
        else:
            fix = "No usable image is left: check the folder, or lower image_size if the images are small."
        raise BadDataError(f"image folder {root}: {len(skipped)} of {len(candidates)} images cannot be used "
                           f"at size {size[1]}x{size[0]} (WxH):\n{listing}{more}{fix}")
    if skipped:
        logger.warning("image folder %s: skipped %d of %d images (skip_bad=True):\n%s", root, len(skipped),
                       len(candidates), "\n".join(f"  {p}: {why}" for p, why in skipped[:_LISTED]))
    return FolderScan(root=root, files=files, labels=np.asarray(labels, dtype=np.int32),
                      class_names=class_names, skipped=skipped, ignored=ignored)


def read_folder_captions(root: PathLike, files: Sequence[Path]) -> Tuple[Optional[List[str]], int]:
    """The caption of each of ``files`` (absolute paths under ``root``) and how many have none ("").

    ``root/metadata.jsonl`` when it exists, else ``NAME.txt`` files beside the images; (None, 0) when the
    folder has neither (a folder without captions).
    """
    root = Path(root).expanduser()
    meta = root / METADATA_FILE
    if meta.is_file():
        by_name, wanted = {}, {f.relative_to(root).as_posix(): f for f in files}
        unknown = []
        with open(meta, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    name = entry["file_name"]
                    text = entry["text"] if "text" in entry else entry["caption"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise BadDataError(f"{meta} line {number}: expected a JSON object with \"file_name\" and "
                                       f"\"text\" (or \"caption\") ({type(exc).__name__}: {exc}); fix or remove "
                                       f"the line") from None
                name = Path(str(name)).as_posix()
                if name in wanted:
                    by_name[name] = str(text).strip()
                elif not (root / name).is_file():
                    unknown.append(f"  line {number}: {name}")
        if unknown:
            more = f"  ... and {len(unknown) - _LISTED} more\n" if len(unknown) > _LISTED else ""
            raise BadDataError(f"{meta} names {len(unknown)} image(s) that do not exist under {root}:\n"
                               + "".join(u + "\n" for u in unknown[:_LISTED]) + more
                               + "Fix the file_name entries (paths relative to the folder) or remove those lines.")
        captions = [by_name.get(f.relative_to(root).as_posix()) for f in files]
    else:
        sidecars = [f.with_suffix(".txt") for f in files]
        if not any(p.is_file() for p in sidecars):
            return None, 0
        captions = [p.read_text(encoding="utf-8").strip() if p.is_file() else None for p in sidecars]
    missing = sum(c is None for c in captions)
    return [c or "" for c in captions], missing


class _EncodedFiles:
    """Random-access source for ``GeneratorDataset``: (file bytes uint8 (n,), label int32 ())."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray, report: Callable[[BadDataError], None]):
        self.files, self.labels, self.report = list(files), labels, report

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        path = self.files[index]
        try:
            raw = np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            error = BadDataError(f"{path} could not be read during training ({exc}); it changed after the "
                                 f"scan at start-up: restore it, or restart to scan again")
            self.report(error)
            raise error from exc
        return raw, self.labels[index]

    def __len__(self) -> int:
        return len(self.files)


class ImageFolderSource(ImageSource):
    """Images from a folder (see the module docstring), decoded, converted, resized and cropped in the pipeline.

    Yields images float32 (B, C, H, W) in [0, 1] and labels int32 (B,) (class ids, or 0 without
    class folders), and the captions where the folder has them (``epoch(..., captions=True)``).
    ``image_size`` defaults to 64, ``channels`` to 3.
    """

    title = "Image folder"

    def __init__(self, data_dir: Optional[PathLike] = None, *, image_size: Optional[SizeLike] = None,
                 channels: Optional[int] = None, random_flip: bool = False, seed: int = 0, num_shards: int = 1,
                 shard_id: int = 0, num_workers: Optional[int] = None, skip_bad: bool = False):
        if data_dir is None:
            raise DataNotFoundError("the image_folder dataset needs a folder: pass --data-dir DIR (a folder of images, "
                                    "optionally one subfolder per class)")
        size = as_size(DEFAULT_FOLDER_IMAGE_SIZE if image_size is None else image_size)
        channels = as_channels(3 if channels is None else channels)
        self.scan = scan_image_folder(data_dir, size, channels=channels, skip_bad=skip_bad, num_workers=num_workers)
        notes = []
        if self.scan.skipped:
            notes.append(f"skipped {len(self.scan.skipped)} unusable file(s) (skip_bad)")
        if self.scan.ignored:
            notes.append(f"ignored {self.scan.ignored} non-image file(s)")
        self.captions, missing = read_folder_captions(self.scan.root, self.scan.files)
        if self.captions is not None:
            notes.append(f"captions for {len(self.captions) - missing:,} images"
                         + (f" ({missing:,} without one: the empty caption)" if missing else ""))
        super().__init__(total_samples=len(self.scan.files), channels=channels, image_size=size,
                         num_classes=None if self.scan.class_names is None else len(self.scan.class_names),
                         class_names=self.scan.class_names, origin=str(self.scan.root), random_flip=random_flip,
                         seed=seed, num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, notes=notes)

    @property
    def skipped(self) -> List[Tuple[Path, str]]:
        """Files left out by ``skip_bad``, with the reason."""
        return self.scan.skipped

    def _pipeline(self, sampler: ds.Sampler) -> ds.Dataset:
        files = _EncodedFiles(self.scan.files, self.scan.labels, self._report_failure)
        data = ds.GeneratorDataset(files, ["image", "label"], sampler=sampler, num_parallel_workers=1,
                                   python_multiprocessing=False)
        image_ops = ([DecodeImage(self.channels)] + resize_crop_ops(None, self.image_size, pil=True)
                     + [vision.ToTensor()])
        return data.map(image_ops, input_columns="image", num_parallel_workers=self.num_workers)
