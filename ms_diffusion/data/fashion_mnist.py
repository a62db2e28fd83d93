"""Fashion-MNIST: find (or fetch) the IDX files, then read them with ``mindspore.dataset.FashionMnistDataset``.

Where the data comes from, in order (``locate_fashion_mnist``):

1. ``data_dir`` when given -- raw or gzipped IDX files in it or up to two folders below it; an
   error if there are none (no fallback: the user asked for that folder). Gzipped files are
   decompressed into ``<their folder>/raw`` (or, read-only, ``$MS_DIFFUSION_DATA/unpacked/...``):
   MindSpore would also try to read a .gz lying beside the raw file;
2. the default data folder ``$MS_DIFFUSION_DATA/fashion-mnist`` (``./data/fashion-mnist``);
3. the Debian package location (``apt-get install dataset-fashion-mnist``), whose gzipped files
   are decompressed once into the default data folder (MindSpore reads only uncompressed IDX);
4. the MindSpore tutorial's archive, downloaded with the ``download`` package into the default
   data folder (URL overridable with ``url=`` or ``$MS_DIFFUSION_FASHION_MNIST_URL``).

Every file written to the default folder appears atomically (written under a temporary name, then
renamed), so an interrupted run never leaves a half file that a later run would trust; the IDX
headers and sizes are checked before MindSpore reads them.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import mindspore.dataset as ds
import mindspore.dataset.transforms as dtrans
import mindspore.dataset.vision as vision

from ms_diffusion.data.source import (DEFAULT_DATA_ROOT, BadDataError, DataError, DataNotFoundError, ImageSource,
                                      PathLike, data_root)
from ms_diffusion.data.transforms import SizeLike, array_channel_ops, as_channels, as_size, resize_crop_ops

__all__ = ["FashionMnistSource", "locate_fashion_mnist", "split_files", "default_fashion_mnist_dir",
           "FASHION_MNIST_URL", "FASHION_MNIST_URL_ENV", "DEBIAN_FASHION_MNIST_DIR", "DEFAULT_FASHION_MNIST_DIR",
           "FASHION_MNIST_CLASSES", "FASHION_MNIST_SPLITS"]

#: The archive of the MindSpore "Diffusion Model" tutorial (Fashion-MNIST as raw IDX files).
FASHION_MNIST_URL = "https://mindspore-website.obs.cn-north-4.myhuaweicloud.com/notebook/datasets/dataset.zip"
#: Environment variable that overrides the download URL (e.g. a mirror).
FASHION_MNIST_URL_ENV = "MS_DIFFUSION_FASHION_MNIST_URL"
#: Where Debian's ``dataset-fashion-mnist`` package puts the gzipped IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Folder name of Fashion-MNIST under the data root.
FASHION_MNIST_DIRNAME = "fashion-mnist"
#: The default data folder when $MS_DIFFUSION_DATA is unset (see ``default_fashion_mnist_dir``).
DEFAULT_FASHION_MNIST_DIR = os.path.join(DEFAULT_DATA_ROOT, FASHION_MNIST_DIRNAME)

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_FILES: Dict[str, Tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_SPLITS = ("train", "test", "all")
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
_SIDE = 28
_SEARCH_DEPTH = 2


def default_fashion_mnist_dir() -> Path:
    """``$MS_DIFFUSION_DATA/fashion-mnist``, or ``./data/fashion-mnist`` when the variable is unset."""
    return Path(data_root()) / FASHION_MNIST_DIRNAME


def split_files(split: str) -> List[str]:
    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {FASHION_MNIST_SPLITS}, got {split!r}")
    pairs = [_FILES["train"], _FILES["test"]] if split == "all" else [_FILES[split]]
    return [name for pair in pairs for name in pair]


def _has_files(folder: Path, names: Sequence[str]) -> bool:
    return all((folder / n).is_file() or (folder / (n + ".gz")).is_file() for n in names)


def _find_idx_dir(root: Path, names: Sequence[str]) -> Optional[Path]:
    """The first folder at or below ``root`` (depth <= 2, sorted) holding every file in ``names`` (raw or .gz)."""
    if not root.is_dir():
        return None
    level = [root]
    for _ in range(_SEARCH_DEPTH + 1):
        for folder in level:
            if _has_files(folder, names):
                return folder
        level = [sub for folder in level for sub in sorted(folder.iterdir())
                 if sub.is_dir() and not sub.name.startswith(".")]
    return None


def _reader_files(folder: Path, split: str) -> List[str]:
    """The files ``FashionMnistDataset(folder, usage=split)`` would read, by MindSpore's own rule.

    MindSpore takes *every* file whose name contains "<prefix>-images" and "idx3-ubyte" (or
    "-labels" and "idx1-ubyte"), prefix "train", "t10k" or "" for "all" -- a ``.gz`` or a backup
    copy next to the raw file breaks it -- and reads them in sorted order (so "all" is test, then train).
    """
    prefix = {"train": "train", "test": "t10k", "all": ""}[split]
    return sorted(p.name for p in folder.iterdir() if p.is_file() and (
        (f"{prefix}-images" in p.name and "idx3-ubyte" in p.name)
        or (f"{prefix}-labels" in p.name and "idx1-ubyte" in p.name)))


def _readable_as_is(folder: Path, split: str) -> bool:
    return folder.is_dir() and _reader_files(folder, split) == sorted(split_files(split))


def _idx_header(path: Path) -> Tuple[int, int]:
    """(magic, count) of an IDX file, after checking its size; raises BadDataError."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise BadDataError(f"{path} is not an IDX file (only {len(head)} bytes)")
    magic, count = struct.unpack(">II", head[:8])
    if magic == _IMAGE_MAGIC:
        if len(head) < 16 or struct.unpack(">II", head[8:16]) != (_SIDE, _SIDE):
            raise BadDataError(f"{path} does not hold 28x28 images; is it Fashion-MNIST?")
        size = 16 + count * _SIDE * _SIDE
    elif magic == _LABEL_MAGIC:
        size = 8 + count
    else:
        raise BadDataError(f"{path} is not an uncompressed IDX file (magic number {magic:#x}); "
                           f"gzipped files must end in .gz")
    actual = path.stat().st_size
    if actual != size:
        raise BadDataError(f"{path} is truncated or damaged: {actual} bytes, the header says {size}. "
                           f"Delete it and run again to re-create it, or get a fresh copy")
    return magic, count


def _count_samples(folder: Path, split: str) -> int:
    names = sorted(split_files(split))  # MindSpore's order: t10k before train
    images, labels = [n for n in names if "-images-" in n], [n for n in names if "-labels-" in n]
    total = 0
    for images_name, labels_name in zip(images, labels):
        (m_img, n_img), (m_lab, n_lab) = _idx_header(folder / images_name), _idx_header(folder / labels_name)
        if (m_img, m_lab) != (_IMAGE_MAGIC, _LABEL_MAGIC) or n_img != n_lab:
            raise BadDataError(f"{folder}: {images_name} ({n_img} images) and {labels_name} ({n_lab} labels) "
                               f"do not match")
        total += n_img
    return total


def _atomic_write(dest: Path, fill) -> None:
    """Create ``dest`` through ``fill(file_object)`` on a temporary sibling, then rename it into place.

    The temporary name (".partial-*") is one MindSpore's reader ignores, so a reader in another
    process (another rank) never sees a half-written file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _materialise(src: Path, split: str, dest: Path) -> Tuple[Path, str]:
    """A folder MindSpore can read ``split`` from: ``src`` itself when it holds exactly the raw files,
    else ``dest`` after copying the raw files and decompressing the .gz ones from ``src`` into it (each
    file once, atomically). Also says what was done."""
    if _readable_as_is(src, split):
        return src, ""
    actions = set()
    created = []    # folders this call creates (dest and missing parents), deepest first
    folder = dest
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    written: List[Path] = []
    try:
        for name in split_files(split):
            target, raw, packed = dest / name, src / name, src / (name + ".gz")
            if target.is_file():
                continue
            if raw.is_file():
                def copy(f, raw=raw):
                    with open(raw, "rb") as r:
                        shutil.copyfileobj(r, f, length=1 << 20)
                _atomic_write(target, copy)
                actions.add("copied")
            else:
                def gunzip(f, packed=packed):
                    try:
                        with gzip.open(packed, "rb") as g:
                            shutil.copyfileobj(g, f, length=1 << 20)
                    except (OSError, EOFError) as exc:
                        raise BadDataError(f"{packed} is not a valid gzip file ({exc}); replace it") from exc
                _atomic_write(target, gunzip)
                actions.add("decompressed")
            written.append(target)
        if not _readable_as_is(dest, split):
            extra = sorted(set(_reader_files(dest, split)) - set(split_files(split)))
            raise DataError(f"{dest} holds other files that MindSpore would also read as Fashion-MNIST "
                            f"({', '.join(extra)}); move them out of that folder")
    except BaseException:
        # leave the data folder as it was: no partial set of copies, no empty raw/ folder
        for target in written:
            target.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return dest, (" and ".join(sorted(actions)) + f" from {src}") if actions else ""


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _unpack_dir(src: Path) -> Path:
    """Where raw copies of the files in ``src`` go: ``src/raw`` if ``src`` is writable, else a folder of the
    data root named after ``src`` (never a folder that could already hold another copy's files)."""
    if _writable(src):
        return src / "raw"
    key = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:12]
    return Path(data_root()) / "unpacked" / f"{FASHION_MNIST_DIRNAME}-{key}"


def _download(url: str, dest: Path, split: str) -> None:
    """Fetch the zip at ``url`` with the ``download`` package and place the raw IDX files of ``split`` in ``dest``."""
    try:
        from download import download
    except ImportError as exc:  # a declared dependency, but say so plainly if it is missing
        raise RuntimeError("the 'download' package is not installed (pip install download)") from exc
    names = split_files(split)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fashion-mnist-download-", dir=dest.parent))
    try:
        download(url, str(staging), kind="zip", replace=True, progressbar=True, verbose=False)
        found = _find_idx_dir(staging, names)
        if found is None:
            raise RuntimeError(f"the archive at {url} holds no {', '.join(names)}")
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:  # raw files: an atomic rename (the staging folder is on the same file system)
            if (found / name).is_file():
                os.replace(found / name, dest / name)
        _materialise(found, split, dest)  # gzipped ones, if the archive had those
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def locate_fashion_mnist(data_dir: Optional[PathLike] = None, split: str = "train", *, download: bool = True,
                         url: Optional[str] = None) -> Tuple[Path, str]:
    """A folder MindSpore can read the raw IDX files of ``split`` ("train", "test", "all") from, and their origin.

    Tries ``data_dir``, the default data folder, the Debian package folder, then a download (see the
    module docstring). Raises ``DataNotFoundError`` naming every place tried and the ways to provide
    the data.
    """
    names = split_files(split)
    default = default_fashion_mnist_dir()
    wanted = " and ".join(names)
    if data_dir is not None:
        given = Path(data_dir).expanduser()
        found = _find_idx_dir(given, names)
        if found is None:
            why = "does not exist" if not given.exists() else "has no such files (raw or .gz), nor its subfolders"
            raise DataNotFoundError(
                f"Fashion-MNIST {split} data not found: --data-dir {given} {why}. Expected {wanted} "
                f"(optionally .gz). Point --data-dir at the folder holding them, or leave it out to use "
                f"{default} / the Debian package / the download.")
        folder, done = _materialise(found, split, _unpack_dir(found))
        return folder, str(folder) + (f" ({done})" if done else "")

    looked: List[str] = []
    debian = Path(DEBIAN_FASHION_MNIST_DIR)
    for folder, label in ((default, "default data folder"), (debian, "Debian package dataset-fashion-mnist")):
        found = _find_idx_dir(folder, names)
        if found is not None:  # never write under the system folder, even when we could (root)
            dest = default if folder == debian else _unpack_dir(found)
            folder, done = _materialise(found, split, dest)
            return folder, str(folder) + (f" ({done})" if done else "")
        looked.append(f"{folder} ({label}): {'no ' + wanted if folder.is_dir() else 'does not exist'}")

    url = url or os.environ.get(FASHION_MNIST_URL_ENV) or FASHION_MNIST_URL
    if download:
        try:
            _download(url, default, split)
            return default, f"{default} (downloaded from {url})"
        except DataError:
            raise
        except Exception as exc:  # network, HTTP, archive: all reported in one message below
            looked.append(f"download from {url}: failed ({type(exc).__name__}: {exc})")
    else:
        looked.append(f"download from {url}: not attempted (download disabled)")
    raise DataNotFoundError(
        f"Fashion-MNIST {split} data not found. Looked in:\n"
        + "".join(f"  - {entry}\n" for entry in looked)
        + "Provide it in one of two ways:\n"
        + f"  1. --data-dir DIR, a folder holding {wanted} (raw or .gz), e.g. from "
          "https://github.com/zalandoresearch/fashion-mnist;\n"
        + "  2. install it: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or allow the automatic "
          f"download (needs internet access to {url}; set ${FASHION_MNIST_URL_ENV} for a mirror).")


class FashionMnistSource(ImageSource):
    """Fashion-MNIST (10 classes) read by ``mindspore.dataset.FashionMnistDataset``.

    Native 1x28x28; other ``image_size``/``channels`` are produced by resizing (shorter side, center
    crop) and gray->RGB conversion in the pipeline. Yields images float32 (B, C, H, W) in [0, 1] and
    labels int32 (B,) in [0, 10).
    """

    title = "Fashion-MNIST"

    def __init__(self, data_dir: Optional[PathLike] = None, *, split: str = "train",
                 image_size: Optional[SizeLike] = None, channels: Optional[int] = None, random_flip: bool = False,
                 seed: int = 0, num_shards: int = 1, shard_id: int = 0, num_workers: Optional[int] = None,
                 download: bool = True, url: Optional[str] = None):
        folder, origin = locate_fashion_mnist(data_dir, split, download=download, url=url)
        self.folder, self.split = folder, split
        self.title = f"Fashion-MNIST {split}"
        super().__init__(total_samples=_count_samples(folder, split),
                         channels=as_channels(1 if channels is None else channels),
                         image_size=as_size(_SIDE if image_size is None else image_size),
                         num_classes=len(FASHION_MNIST_CLASSES), class_names=FASHION_MNIST_CLASSES, origin=origin,
                         random_flip=random_flip, seed=seed, num_shards=num_shards, shard_id=shard_id,
                         num_workers=num_workers)

    def _pipeline(self, sampler: ds.Sampler) -> ds.Dataset:
        data = ds.FashionMnistDataset(str(self.folder), usage=self.split, sampler=sampler,
                                      num_parallel_workers=self.num_workers)
        image_ops = (resize_crop_ops((_SIDE, _SIDE), self.image_size, pil=False)
                     + array_channel_ops(1, self.channels) + [vision.ToTensor()])
        data = data.map(image_ops, input_columns="image", num_parallel_workers=self.num_workers)
        return data.map(dtrans.TypeCast(ms.int32), input_columns="label", num_parallel_workers=1)
