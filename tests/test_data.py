"""ms_diffusion.data: locating/fetching data, image folders, CIFAR-10, bad data, sharding, exact resume.

All data is generated here (tiny IDX files, image folders, one CIFAR-10 batch file); nothing
depends on the Debian package or the internet (the download runs against a loopback server).
"""
from __future__ import annotations

import functools
import gzip
import http.server
import io
import os
import socket
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ms_diffusion.data.fashion_mnist as fm
from ms_diffusion.data import (BadDataError, Cifar10Source, DataError, DataNotFoundError, FashionMnistSource,
                               ImageFolderSource, build_source, resolve_workers)
from ms_diffusion.data.source import DATA_ROOT_ENV

N_FM = 50  # tiny Fashion-MNIST: 50 train, 20 test images
TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --- generated data ----------------------------------------------------------------------------

def _idx_bytes(images: np.ndarray, labels: np.ndarray):
    n = len(images)
    return (struct.pack(">IIII", 2051, n, 28, 28) + images.astype(np.uint8).tobytes(),
            struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: Path, *, gz: bool = False, seed: int = 0, n_train: int = N_FM, n_test: int = 20):
    """Write train+test IDX files (raw or .gz) into ``folder``; returns {split: (images (N,28,28), labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    for split, names, n in (("train", TRAIN, n_train), ("test", TEST, n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for name, payload in zip(names, _idx_bytes(images, labels)):
            if gz:
                with gzip.open(folder / (name + ".gz"), "wb") as f:
                    f.write(payload)
            else:
                (folder / name).write_bytes(payload)
        data[split] = (images, labels)
    return data


def save_image(path: Path, array: np.ndarray, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **kw)


def solid(h: int, w: int, color) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, np.uint8), (h, w, 3)).copy()


def collect(source, epoch: int, batch: int, start: int = 0):
    out = list(source.epoch(epoch, batch, start_batch=start))
    return np.concatenate([x for x, _ in out]), np.concatenate([y for _, y in out])


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Default data root, Debian folder and download URL all pointed into tmp_path (all empty)."""
    root = tmp_path / "root"
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    monkeypatch.setattr(fm, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "debian"))
    monkeypatch.delenv(fm.FASHION_MNIST_URL_ENV, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    return folder, write_fashion_mnist(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Fashion-MNIST: locating, gz, download, errors ---------------------------------------------

def test_data_dir_raw_files_in_exact_sampled_order(fmnist_dir):
    folder, data = fmnist_dir
    src = FashionMnistSource(folder, num_workers=2, seed=3)
    assert (src.num_samples, src.num_classes, src.channels, src.image_size) == (N_FM, 10, 1, (28, 28))
    assert src.folder == folder
    images, labels = collect(src, epoch=1, batch=7)
    order = src.epoch_indices(1)[: 7 * 7]
    assert images.dtype == np.float32 and labels.dtype == np.int32 and images.shape == (49, 1, 28, 28)
    np.testing.assert_allclose(images[:, 0], data["train"][0][order] / np.float32(255), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(labels, data["train"][1][order])
    assert 0.0 <= images.min() and images.max() <= 1.0
    test = FashionMnistSource(folder, split="test", num_workers=1)
    assert test.num_samples == 20 and "Fashion-MNIST test: 20 images, 10 classes" in test.describe()


def test_data_dir_without_data_is_an_error_with_no_fallback(isolated):
    write_fashion_mnist(isolated / "root" / "fashion-mnist")  # the default folder has data, but data_dir wins
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match=f"--data-dir {empty} has no such files"):
        FashionMnistSource(empty)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        FashionMnistSource(isolated / "missing")


def test_gz_in_data_dir_is_decompressed_next_to_it(isolated):
    folder = isolated / "given" / "dataset"  # found one level below data_dir
    data = write_fashion_mnist(folder, gz=True)
    src = FashionMnistSource(isolated / "given", num_workers=1)
    # MindSpore would read the .gz files too if the raw ones were put beside them: they go into raw/
    assert src.folder == folder / "raw" and sorted(p.name for p in src.folder.iterdir()) == sorted(TRAIN)
    assert src.origin == f"{folder / 'raw'} (decompressed from {folder})"
    assert FashionMnistSource(isolated / "given", num_workers=1).origin == str(folder / "raw")  # only once
    images, labels = collect(src, 0, 10)
    np.testing.assert_array_equal(labels, data["train"][1][src.epoch_indices(0)[:50]])


def test_read_only_gz_data_dir_is_unpacked_into_a_folder_of_its_own(isolated, monkeypatch):
    folder = isolated / "ro"
    data = write_fashion_mnist(folder, gz=True)
    write_fashion_mnist(isolated / "root" / "fashion-mnist", seed=5)  # other data in the default folder
    monkeypatch.setattr(fm, "_writable", lambda path: path != folder)  # as if read-only (tests may run as root)
    src = FashionMnistSource(folder, num_workers=1)
    assert not (folder / "raw").exists()
    assert src.folder.parent == isolated / "root" / "unpacked" and src.folder.name.startswith("fashion-mnist-")
    np.testing.assert_array_equal(collect(src, 0, 25)[1], data["train"][1][src.epoch_indices(0)])


def test_default_folder_from_env_var_and_from_working_directory(isolated, tmp_cwd, monkeypatch):
    write_fashion_mnist(isolated / "root" / "fashion-mnist")
    assert FashionMnistSource().folder == isolated / "root" / "fashion-mnist"
    monkeypatch.delenv(DATA_ROOT_ENV)
    write_fashion_mnist(tmp_cwd / "data" / "fashion-mnist", seed=1)
    src = FashionMnistSource()
    assert src.folder == Path("data") / "fashion-mnist" and src.origin == "data/fashion-mnist"


def test_debian_gz_is_decompressed_once_into_default_folder(isolated):
    data = write_fashion_mnist(isolated / "debian", gz=True)
    default = isolated / "root" / "fashion-mnist"
    src = FashionMnistSource(num_workers=1)
    assert src.folder == default and f"decompressed from {isolated / 'debian'}" in src.origin
    assert sorted(p.name for p in default.iterdir()) == sorted(TRAIN)  # no temporary files left behind
    assert oct((default / TRAIN[0]).stat().st_mode & 0o777) != oct(0o600)
    mtime = (default / TRAIN[0]).stat().st_mtime_ns
    again = FashionMnistSource(num_workers=1, split="train")
    assert again.origin == str(default) and (default / TRAIN[0]).stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(collect(again, 0, 25)[1], data["train"][1][again.epoch_indices(0)])


def test_download_from_loopback_server(isolated, monkeypatch):
    staging = isolated / "zip"
    data = write_fashion_mnist(staging / "dataset")
    serve = isolated / "www"
    serve.mkdir()
    with zipfile.ZipFile(serve / "dataset.zip", "w") as z:
        for name in TRAIN + TEST:
            z.write(staging / "dataset" / name, f"dataset/{name}")
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dataset.zip"
        monkeypatch.setenv(fm.FASHION_MNIST_URL_ENV, url)  # the override the user would set
        src = FashionMnistSource(num_workers=1, split="all")
    finally:
        server.shutdown()
        server.server_close()
    default = isolated / "root" / "fashion-mnist"
    assert src.folder == default and src.origin == f"{default} (downloaded from {url})"
    assert sorted(p.name for p in default.parent.iterdir()) == ["fashion-mnist"]  # staging folder removed
    assert src.num_samples == N_FM + 20
    labels = collect(src, 0, 10)[1]
    all_labels = np.concatenate([data["test"][1], data["train"][1]])  # MindSpore reads t10k first
    np.testing.assert_array_equal(labels, all_labels[src.epoch_indices(0)])


def test_not_found_message_lists_places_and_fixes(isolated):
    dead = f"http://127.0.0.1:{_free_port()}/dataset.zip"
    with pytest.raises(DataNotFoundError) as info:
        FashionMnistSource(url=dead)
    msg = str(info.value)
    assert str(isolated / "root" / "fashion-mnist") in msg and str(isolated / "debian") in msg
    assert f"download from {dead}: failed" in msg
    assert "--data-dir" in msg and "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(DataNotFoundError, match="not attempted"):
        build_source("fashion-mnist", download=False)
    assert list((isolated / "root").iterdir()) == []  # the failed download left nothing behind


def test_damaged_idx_file_is_named(isolated):
    folder = isolated / "bad"
    write_fashion_mnist(folder)
    path = folder / TRAIN[0]
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(BadDataError, match=f"{path} is truncated or damaged"):
        FashionMnistSource(folder)


def test_resize_and_gray_to_rgb(fmnist_dir):
    folder, data = fmnist_dir
    src = build_source("fashion_mnist", data_dir=folder, image_size=32, channels=3, num_workers=2)
    images, labels = next(src.epoch(0, 8))
    assert images.shape == (8, 3, 32, 32) and images.dtype == np.float32
    np.testing.assert_array_equal(images[:, 0], images[:, 2])
    assert 0.0 <= images.min() and images.max() <= 1.0


# --- image folders -----------------------------------------------------------------------------

def _class_folder(root: Path):
    """3 classes, nested subfolders, all extensions; each image one solid colour. Returns {relpath: rgb}."""
    colors = {}
    specs = [("cat/a.png", "PNG"), ("cat/deep/er/b.JPG", "JPEG"), ("cat/c.bmp", "BMP"),
             ("dog/d.tiff", "TIFF"), ("dog/e.jpeg", "JPEG"), ("dog/f.tif", "TIFF"),
             ("zebra/g.png", "PNG"), ("zebra/sub/h.png", "PNG")]
    for i, (rel, fmt) in enumerate(specs):
        color = (20 * i + 10, 255 - 25 * i, (60 * i) % 256)
        save_image(root / rel, solid(40, 48, color), format=fmt, **({"quality": 98} if fmt == "JPEG" else {}))
        colors[rel] = color
    (root / "dog" / "notes.txt").write_text("not an image")
    save_image(root / "cat" / ".hidden.png", solid(40, 40, (0, 0, 0)), format="PNG")
    return colors


def test_image_folder_recursion_extensions_labels_and_colours(tmp_path):
    colors = _class_folder(tmp_path)
    src = ImageFolderSource(tmp_path, image_size=16, num_workers=2)
    assert src.class_names == ["cat", "dog", "zebra"] and src.num_classes == 3 and src.num_samples == 8
    rels = [str(p.relative_to(tmp_path)) for p in src.scan.files]
    assert sorted(rels) == sorted(colors)
    images, labels = collect(src, 0, 4)
    order = src.epoch_indices(0)
    assert images.shape == (8, 3, 16, 16) and labels.dtype == np.int32
    for row, index in enumerate(order):
        rel = rels[index]
        assert labels[row] == ["cat", "dog", "zebra"].index(rel.split("/")[0])
        np.testing.assert_allclose(images[row].mean(axis=(1, 2)) * 255, colors[rel], atol=3)
    assert "8 images, 3 classes (cat, dog, zebra), 3x16x16" in src.describe()
    assert "ignored 1 non-image file" in src.describe()


def test_flat_folder_has_no_labels_and_gray_rgb_conversions(tmp_path):
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    save_image(tmp_path / "gray.png", gray)
    save_image(tmp_path / "more" / "rgb.png", solid(32, 32, (200, 100, 50)))
    rgba = np.concatenate([solid(32, 32, (10, 20, 30)), np.full((32, 32, 1), 7, np.uint8)], axis=-1)
    save_image(tmp_path / "rgba.png", rgba)
    save_image(tmp_path / "palette.png", solid(32, 32, (0, 255, 0)), format="PNG")
    Image.open(tmp_path / "palette.png").convert("P").save(tmp_path / "palette.png")
    save_image(tmp_path / "deep16.png", (gray.astype(np.uint16) * 257))
    rgb_src = ImageFolderSource(tmp_path, image_size=32, channels=3, num_workers=1)
    assert rgb_src.num_classes is None and rgb_src.class_names is None
    assert "no class labels" in rgb_src.describe()
    images, labels = collect(rgb_src, 0, 5)
    assert (labels == 0).all()
    by_name = {rgb_src.scan.files[i].name: images[row] for row, i in enumerate(rgb_src.epoch_indices(0))}
    np.testing.assert_allclose(by_name["gray.png"][0], gray / 255, atol=1e-6)
    np.testing.assert_array_equal(by_name["gray.png"][0], by_name["gray.png"][2])
    np.testing.assert_allclose(by_name["deep16.png"], by_name["gray.png"], atol=1e-6)  # 16-bit scaled, not clipped
    np.testing.assert_allclose(by_name["rgba.png"].mean(axis=(1, 2)) * 255, (10, 20, 30), atol=1e-3)
    np.testing.assert_allclose(by_name["palette.png"].mean(axis=(1, 2)) * 255, (0, 255, 0), atol=1e-3)
    gray_src = ImageFolderSource(tmp_path, image_size=32, channels=1, num_workers=1)
    images, _ = collect(gray_src, 0, 5)
    by_name = {gray_src.scan.files[i].name: images[row] for row, i in enumerate(gray_src.epoch_indices(0))}
    assert images.shape == (5, 1, 32, 32)
    luma = (200 * 299 + 100 * 587 + 50 * 114) / 1000  # ITU-R 601-2, PIL's convert("L")
    assert abs(by_name["rgb.png"].mean() * 255 - luma) < 1


def test_resize_shorter_side_then_center_crop(tmp_path):
    band = np.zeros((40, 120), np.uint8)
    band[:, 40:80] = 255  # dark | bright | dark, 40 columns each
    save_image(tmp_path / "wide.png", band)
    tall = np.zeros((90, 30), np.uint8)
    tall[30:60] = 255
    save_image(tmp_path / "tall.png", tall)
    src = ImageFolderSource(tmp_path, image_size=20, channels=1, num_workers=1)
    images, _ = collect(src, 0, 2)
    by_name = {src.scan.files[i].name: images[row, 0] for row, i in enumerate(src.epoch_indices(0))}
    # shorter side 40 -> 20 makes 60x20, the center 20 columns are the bright band
    assert by_name["wide.png"].shape == (20, 20) and by_name["wide.png"][:, 2:-2].min() > 0.95
    assert by_name["tall.png"][2:-2, :].min() > 0.95
    rect = ImageFolderSource(tmp_path, image_size=(10, 20), channels=1, num_workers=1)
    assert next(rect.epoch(0, 2))[0].shape == (2, 1, 10, 20)


def _truncated_jpeg(path: Path):
    """A truncated JPEG of a smooth gradient: MindSpore's C++ decoder dies with SIGFPE on this one."""
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_corrupt_and_too_small_images_error_or_counted_skip(tmp_path):
    for i in range(4):
        save_image(tmp_path / "ok" / f"{i}.png", solid(32, 32, (i, i, i)))
    _truncated_jpeg(tmp_path / "ok" / "broken.jpg")
    (tmp_path / "ok" / "garbage.png").write_bytes(b"this is not a png" * 10)
    (tmp_path / "ok" / "empty.bmp").write_bytes(b"")
    save_image(tmp_path / "ok" / "tiny.png", solid(8, 40, (1, 2, 3)))
    with pytest.raises(BadDataError) as info:
        ImageFolderSource(tmp_path, image_size=32)
    msg = str(info.value)
    assert "4 of 8 images cannot be used" in msg and "skip_bad=True" in msg
    for name in ("broken.jpg", "garbage.png", "empty.bmp"):
        assert f"{tmp_path / 'ok' / name}: cannot be decoded" in msg
    assert f"{tmp_path / 'ok' / 'tiny.png'}: is 40x8 (WxH), smaller than the requested 32x32" in msg

    src = ImageFolderSource(tmp_path, image_size=32, skip_bad=True, num_workers=2)
    assert src.num_samples == 4 and len(src.skipped) == 4
    assert "skipped 4 unusable file(s)" in src.describe()
    images, _ = collect(src, 0, 2)  # the pipeline never sees the bad files: no crash, no hang
    assert images.shape == (4, 3, 32, 32)
    assert ImageFolderSource(tmp_path, image_size=8, skip_bad=True).num_samples == 5  # tiny.png fits at 8x8


def test_file_vanishing_after_the_scan_is_named_not_wrapped(tmp_path):
    for i in range(6):
        save_image(tmp_path / f"{i}.png", solid(8, 8, (i, i, i)))
    src = ImageFolderSource(tmp_path, image_size=8, num_workers=2)
    (tmp_path / "3.png").unlink()
    with pytest.raises(BadDataError, match=f"{tmp_path / '3.png'} could not be read during training"):
        collect(src, 0, 2)


def test_missing_empty_and_imageless_folders(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="it is empty"):
        ImageFolderSource(tmp_path / "empty")
    (tmp_path / "docs" / "a").mkdir(parents=True)
    (tmp_path / "docs" / "a" / "readme.md").write_text("x")
    with pytest.raises(DataNotFoundError, match=r"no images with a supported extension .*1 other files"):
        ImageFolderSource(tmp_path / "docs")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(BadDataError, match="No usable image is left"):
        ImageFolderSource(tmp_path / "bad", skip_bad=True)
    with pytest.raises(DataNotFoundError, match="needs a folder"):
        build_source("image_folder")


# --- CIFAR-10 ----------------------------------------------------------------------------------

def test_cifar10_binary_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    records = rng.integers(0, 256, (10_000, 3073), dtype=np.uint8)
    records[:, 0] %= 10
    (folder / "data_batch_1.bin").write_bytes(records.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n\n")
    src = build_source("cifar-10", data_dir=tmp_path, num_workers=2, random_flip=True, seed=5)
    assert (src.num_samples, src.num_classes, src.channels, src.image_size) == (10_000, 10, 3, (32, 32))
    assert src.class_names[3] == "class3" and src.folder == folder
    batches = src.epoch(2, 16)
    got = [next(batches) for _ in range(3)]
    batches.close()  # stopping early must release the pipeline
    order = src.epoch_indices(2)[:48]
    flips = src.flip_mask(2)[order]
    expected = records[order, 1:].reshape(48, 3, 32, 32) / np.float32(255)
    expected[flips] = expected[flips][..., ::-1]
    np.testing.assert_allclose(np.concatenate([x for x, _ in got]), expected, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), records[order, 0])
    gray = Cifar10Source(tmp_path, channels=1, image_size=16, num_workers=1)
    assert next(gray.epoch(0, 4))[0].shape == (4, 1, 16, 16)
    with pytest.raises(DataNotFoundError, match="CIFAR-10 test data not found"):
        Cifar10Source(tmp_path, split="test")
    (folder / "data_batch_2.bin").write_bytes(records[:10].tobytes())
    with pytest.raises(BadDataError, match="data_batch_2.bin has 30,730 bytes"):
        Cifar10Source(tmp_path)


# --- order, sharding, resume, flips ------------------------------------------------------------

def test_sharding_is_disjoint_equal_and_covering(fmnist_dir):
    folder, data = fmnist_dir
    shards = [FashionMnistSource(folder, num_shards=3, shard_id=r, seed=9, num_workers=1) for r in range(3)]
    for epoch in (0, 1):
        parts = [s.epoch_indices(epoch) for s in shards]
        assert [len(p) for p in parts] == [N_FM // 3] * 3
        union = np.concatenate(parts)
        assert len(set(union.tolist())) == len(union) == 3 * (N_FM // 3)
    assert [s.batches_per_epoch(4) for s in shards] == [4, 4, 4]
    assert not np.array_equal(shards[0].epoch_indices(0), shards[0].epoch_indices(1))
    labels = collect(shards[1], 1, 4)[1]
    np.testing.assert_array_equal(labels, data["train"][1][shards[1].epoch_indices(1)[:16]])
    with pytest.raises(ValueError, match="shard_id"):
        FashionMnistSource(folder, num_shards=2, shard_id=2)


def test_exact_resume_mid_epoch_fashion_mnist(fmnist_dir):
    folder, _ = fmnist_dir
    src = FashionMnistSource(folder, random_flip=True, seed=11, num_workers=2, image_size=32, channels=3)
    full = list(src.epoch(4, 6))
    assert len(full) == src.batches_per_epoch(6) == 8
    fresh = FashionMnistSource(folder, random_flip=True, seed=11, num_workers=1, image_size=32, channels=3)
    for k in (1, 5, 8):
        tail = list(fresh.epoch(4, 6, start_batch=k))
        assert len(tail) == 8 - k
        for (x, y), (xt, yt) in zip(full[k:], tail):
            np.testing.assert_array_equal(x, xt)
            np.testing.assert_array_equal(y, yt)


def test_exact_resume_image_folder_and_flips_are_per_sample(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(12):
        save_image(tmp_path / ("a" if i % 2 else "b") / f"{i:02d}.png", rng.integers(0, 256, (24, 30, 3), np.uint8))
    src = ImageFolderSource(tmp_path, image_size=16, random_flip=True, seed=2, num_workers=2)
    full = list(src.epoch(1, 3))
    tail = list(ImageFolderSource(tmp_path, image_size=16, random_flip=True, seed=2, num_workers=1).epoch(1, 3, 2))
    for (x, y), (xt, yt) in zip(full[2:], tail):
        np.testing.assert_array_equal(x, xt)
        np.testing.assert_array_equal(y, yt)
    plain = ImageFolderSource(tmp_path, image_size=16, random_flip=False, seed=2, num_workers=1)
    flips = src.flip_mask(1)[src.epoch_indices(1)]
    assert 0 < flips.sum() < len(flips) and not plain.flip_mask(1).any()
    flipped, unflipped = np.concatenate([x for x, _ in full]), collect(plain, 1, 3)[0]
    np.testing.assert_array_equal(flipped[flips], unflipped[flips][..., ::-1])
    np.testing.assert_array_equal(flipped[~flips], unflipped[~flips])
    assert not np.array_equal(src.flip_mask(1), src.flip_mask(2))


def test_batch_and_worker_arguments(fmnist_dir):
    folder, _ = fmnist_dir
    src = FashionMnistSource(folder, num_workers=10_000)
    assert src.num_workers == resolve_workers(10_000) == (os.cpu_count() or 1)
    assert src.batches_per_epoch(7) == 7 and next(src.epoch(0, 7))[0].shape == (7, 1, 28, 28)
    with pytest.raises(DataError, match="larger than the 50 images"):
        src.batches_per_epoch(64)
    with pytest.raises(ValueError, match="start_batch"):
        src.epoch(0, 7, start_batch=8)
    assert list(src.epoch(0, 7, start_batch=7)) == []
    with pytest.raises(ValueError, match="Did you mean 'cifar10'"):
        build_source("cifar100")
