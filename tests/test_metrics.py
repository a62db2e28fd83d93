"""Metrics: Fréchet distance vs scipy and known answers, KID unbiasedness, precision/recall and memorisation on
constructed data, the classifier, the reference cache, evaluate.py end to end, and the FID Inception network
against torch-fidelity's pure-torch implementation (random weights). No real data: tiny synthetic IDX files."""
import gzip
import importlib
import json
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ms_diffusion.metrics import (TooFewSamplesError, bootstrap_frechet_distance, frechet_distance,
                                  frechet_distance_from_features, gaussian_stats, kernel_inception_distance,
                                  memorization, mmd2_unbiased, nearest_training_distances, polynomial_kernel,
                                  paired_bootstrap_ratios, precision_recall, sqrtm_psd, trace_sqrt_product)
from ms_diffusion.metrics.classifier import (ClassifierConfig, FashionClassifier, accuracy, classifier_outputs,
                                             load_classifier, save_classifier)
from ms_diffusion.training.classifier import train_classifier

scipy_linalg = pytest.importorskip("scipy.linalg")

TINY = ClassifierConfig(widths=(4, 8, 8))


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def _fd_scipy(mu1, s1, mu2, s2):
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------------------------- Fréchet distance

def test_fd_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (2, 16, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert not ours.regularised
        assert ours.value == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)
        assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(np.real(scipy_linalg.sqrtm(s1 @ s2))), rel=1e-8)
    s = _random_cov(rng, 8)
    np.testing.assert_allclose(sqrtm_psd(s), np.real(scipy_linalg.sqrtm(s)), atol=1e-10)
    np.testing.assert_allclose(sqrtm_psd(s) @ sqrtm_psd(s), s, atol=1e-10)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32))
    st = gaussian_stats(f)
    assert frechet_distance(st.mu, st.sigma, st.mu, st.sigma).value == pytest.approx(0.0, abs=1e-7)
    shifted = gaussian_stats(f + 0.5)
    assert frechet_distance(shifted.mu, shifted.sigma, st.mu, st.sigma).value == pytest.approx(32 * 0.25, rel=1e-6)


def test_fd_known_answers():
    # diagonal (commuting) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 0.0, 0.0]), np.array([1.0, 2.0, 2.0])
    expected = 9.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)).value == pytest.approx(expected, rel=1e-12)
    # rotated copies of the same Gaussian: distance = |dmu|^2 only
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    s = q @ np.diag(a) @ q.T
    assert frechet_distance(mu1, s, mu2, s).value == pytest.approx(9.0, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]).value == pytest.approx(9.0 + 1.0)


def test_fd_singular_covariances_are_exact_without_regularisation():
    # orthogonal rank-1 covariances: the product is 0, tr sqrt = 0, FD = tr S1 + tr S2
    r = frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([0.0, 1.0]))
    assert r.value == pytest.approx(2.0) and not r.regularised
    rng = np.random.default_rng(3)
    l1, l2 = rng.standard_normal((20, 5)), rng.standard_normal((20, 7))  # rank 5 and 7 in 20-D (N < D)
    s1, s2 = l1 @ l1.T, l2 @ l2.T
    # exact: S1 S2 = L1 (L1' L2 L2') has the eigenvalues of (L1' L2)(L1' L2)', so tr sqrt = nuclear norm of L1' L2
    exact = np.linalg.svd(l1.T @ l2, compute_uv=False).sum()
    assert trace_sqrt_product(s1, s2) == pytest.approx(exact, rel=1e-8)
    mu = rng.standard_normal(20)
    ours = frechet_distance(mu, s1, mu, s2).value
    assert ours == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * exact, rel=1e-8)
    # pytorch-fid's retry (eps on both diagonals, scipy sqrtm) lands close, off by O(sqrt(eps)) per null direction
    offset = np.eye(20) * 1e-6
    assert frechet_distance(mu, s1, mu, s2, eps=1e-6).value == pytest.approx(
        _fd_scipy(mu, s1 + offset, mu, s2 + offset), rel=1e-6)
    assert ours == pytest.approx(_fd_scipy(mu, s1 + offset, mu, s2 + offset), rel=1e-3)


def test_fd_rejects_matrices_that_are_not_covariances():
    with pytest.raises(ValueError, match="sigma1 is not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -0.5]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma2 is not positive semi-definite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -0.5]))
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(2, 2\)"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_too_few_samples_for_the_covariance():
    with pytest.raises(TooFewSamplesError, match="too few for the covariance of 16-dimensional features: need at least 17"):
        gaussian_stats(np.zeros((16, 16)))
    with pytest.raises(TooFewSamplesError, match="need at least 2"):
        gaussian_stats(np.zeros((1, 4)), allow_singular=True)
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(np.full((5, 2), np.nan))


def test_paired_bootstrap_ratio_cancels_the_shared_noise():
    """Rows from the same noise: a small systematic change shows in the ratio with a spread far below
    the distances' own bootstrap spread."""
    rng = np.random.default_rng(0)
    ref = gaussian_stats(rng.standard_normal((5000, 6)))
    base = rng.standard_normal((300, 6)) * 1.2 + 0.3          # a biased generator
    better = base * 0.95 + 0.02 * rng.standard_normal((300, 6))  # the same images, slightly closer
    (r0, s0), (r1, s1), (r2, s2) = paired_bootstrap_ratios([base, better, base.copy()], ref, base=0, rounds=40)
    assert r0 == 1.0 and s0 == 0.0 and r2 == 1.0 and s2 == 0.0
    fd_base = frechet_distance_from_features(base, ref).value
    assert r1 == pytest.approx(frechet_distance_from_features(better, ref).value / fd_base)
    sd_base, _ = bootstrap_frechet_distance(base, ref, rounds=40)
    assert r1 < 1 and 0 < s1 < 0.25 * sd_base / fd_base
    with pytest.raises(ValueError, match="same number of images"):
        paired_bootstrap_ratios([base, base[:200]], ref)
    with pytest.raises(ValueError, match="base must index"):
        paired_bootstrap_ratios([base], ref, base=1)


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampler_quality_bench_configs_and_table():
    sq = _bench("sampler_quality")
    assert sq.parse_configs("ddpm-1000, DPM-Solver++-20:karras=true:order=3,pndm-20") == [
        ("ddpm", 1000, {}), ("dpmpp", 20, {"karras": True, "order": 3}), ("plms", 20, {})]
    for bad in ("ddim", "ddim-0", "dpmpp-20:karras", ""):
        with pytest.raises(ValueError):
            sq.parse_configs(bad)
    assert sq.config_label("dpmpp", 20, {"karras": True}) == "DPM-Solver++-20 (karras=True)"
    assert sq.label_slug("DPM-Solver++-20 (karras=True)") == "dpm-solver++-20_karras=true"
    rng = np.random.default_rng(3)
    ref = gaussian_stats(rng.standard_normal((2000, 4)))
    noise = rng.standard_normal((200, 4))
    feats = [rng.standard_normal((200, 4)) * 1.3, noise * 1.2, noise * 1.25, noise * 1.2 + 0.1]
    configs = sq.parse_configs("ddpm-1000,ddim-50,plms-20,dpmpp-20:karras=true")
    rows = [dict(label=sq.config_label(n, k, o), sampler=n, steps=k, options=o, nfe=k + (n == "plms"), fd=f,
                 ms_per_image=1234.5) for (n, k, o), f in zip(configs, (2.0, 1.0, 1.5, 1.2))]
    assert sq.ratio_bases(rows) == [0, 1]   # DDPM, and the deterministic row with the most evaluations
    columns = sq.add_bootstrap(rows, feats, ref, rounds=10, seed=0)
    assert columns == ["DDPM-1000", "DDIM-50"] and rows[1]["vs"]["DDIM-50"] == (1.0, 0.0)
    # each row's own spread is the ordinary bootstrap of its distance (the same resampling)
    for r, f in zip(rows, feats):
        assert r["fd_bootstrap_sd"] == bootstrap_frechet_distance(f, ref, rounds=10, seed=0)[0]
    # rows 1-3 come from the same noise: their ratio is resolved far better against DDIM than against DDPM
    assert rows[2]["vs"]["DDIM-50"][1] < 0.5 * rows[2]["vs"]["DDPM-1000"][1]
    table = sq.format_table(rows, columns, 200).splitlines()
    assert table[0] == "| sampler | NFE | FD (classifier features, N=200) | vs DDPM-1000 | vs DDIM-50 | ms / image |"
    assert table[2].startswith(f"| DDPM | 1000 | 2.000 ± {rows[0]['fd_bootstrap_sd']:.3f} | — | ")
    assert table[2].endswith(" | 1,234 |")
    assert table[4].startswith("| PLMS | 21 |") and table[5].startswith("| DPM-Solver++-20 (karras=True) | 20 |")


# --------------------------------------------------------------------------------------------- KID

def test_mmd2_unbiased_matches_the_definition():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 1
    k = polynomial_kernel
    m = 6
    within = sum(k(x[i:i + 1], x[j:j + 1])[0, 0] + k(y[i:i + 1], y[j:j + 1])[0, 0]
                 for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i:i + 1], y[j:j + 1])[0, 0] for i in range(m) for j in range(m)) / (m * m)
    assert mmd2_unbiased(k(x, x), k(x, y), k(y, y)) == pytest.approx(within - 2 * cross, rel=1e-12)


def test_kid_is_unbiased_on_identical_distributions_and_detects_a_shift():
    rng = np.random.default_rng(5)
    values = []
    for _ in range(40):
        a, b = rng.standard_normal((100, 8)), rng.standard_normal((100, 8))
        values.append(kernel_inception_distance(a, b, subsets=1, subset_size=100, seed=0).mean)
    values = np.asarray(values)
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(values.mean()) < 3 * se  # a biased (V-statistic) estimate would sit well above 0
    assert (values < 0).any()  # unbiased: negative values occur
    biased_gap = np.mean(np.diag(polynomial_kernel(a, a))) / 100  # what the diagonal would add
    assert se < biased_gap
    shifted = kernel_inception_distance(rng.standard_normal((200, 8)) + 0.5, rng.standard_normal((200, 8)),
                                        subsets=10, subset_size=100)
    assert shifted.mean > 10 * max(se, 1e-12) and shifted.subset_size == 100 and shifted.subsets == 10
    capped = kernel_inception_distance(rng.standard_normal((30, 8)), rng.standard_normal((50, 8)), subsets=3)
    assert capped.subset_size == 30


# --------------------------------------------------------------------------------------------- precision / recall

def test_precision_recall_on_constructed_clouds():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((100, 2)) * 0.1
    b = rng.standard_normal((100, 2)) * 0.1 + [10.0, 0.0]
    c = rng.standard_normal((100, 2)) * 0.1 + [0.0, 10.0]
    real = np.concatenate([a, b])
    same = precision_recall(real, real.copy())
    assert same.precision == 1.0 and same.recall == 1.0
    half = precision_recall(real, np.concatenate([a + 1e-6, c]))  # covers mode A only, half off-manifold
    assert half.precision == pytest.approx(0.5) and half.recall == pytest.approx(0.5)
    collapsed = precision_recall(real, a[:50] + 1e-6)  # good samples, half the modes missing
    assert collapsed.precision == 1.0 and collapsed.recall <= 0.5
    with pytest.raises(TooFewSamplesError):
        precision_recall(real, a[:3], k=3)


# --------------------------------------------------------------------------------------------- memorisation

def test_memorization_flags_training_copies():
    rng = np.random.default_rng(7)
    train = rng.random((200, 1, 8, 8)).astype(np.float32)
    held_out = rng.random((100, 1, 8, 8)).astype(np.float32)
    ref = nearest_training_distances(held_out, train)
    fresh = held_out[np.argsort(ref)[-15:]]  # new images, all farther than the 1% quantile
    samples = np.concatenate([train[:5], fresh])
    d = nearest_training_distances(samples, train)
    assert np.allclose(d[:5], 0.0, atol=1e-3) and (d[5:] > 0.2).all()
    memo = memorization(d, ref)
    assert memo.fraction_below == pytest.approx(5 / 20)
    assert memo.reference_fraction == pytest.approx(0.01)
    assert memo.threshold == pytest.approx(np.quantile(ref, 0.01))
    assert memorization(d, threshold=0.05).fraction_below == pytest.approx(0.25)
    with pytest.raises(ValueError, match="give a threshold"):
        memorization(d)


# --------------------------------------------------------------------------------------------- classifier

def _two_class_images(rng, n):
    labels = rng.integers(0, 2, n).astype(np.int32)
    images = rng.random((n, 1, 28, 28)).astype(np.float32) * 0.3
    images[labels == 1, :, 8:20, 8:20] += 0.7  # class 1: a bright square
    return np.clip(images, 0, 1), labels


def test_classifier_shapes_and_training_reduces_the_loss():
    rng = np.random.default_rng(8)
    net = FashionClassifier(TINY)
    feats, logits = classifier_outputs(net, rng.random((7, 1, 28, 28)).astype(np.float32), batch_size=4)
    assert feats.shape == (7, 8) and logits.shape == (7, 10) and (feats >= 0).all()
    with pytest.raises(ValueError, match=r"shape \(N, 1, 28, 28\)"):
        classifier_outputs(net, np.zeros((2, 3, 32, 32), np.float32))
    images, labels = _two_class_images(rng, 256)
    logs = []
    _, history = train_classifier(images, labels, config=TINY, epochs=3, batch_size=32, lr=1e-2, log_every=4,
                                  log=logs.append)
    losses = [loss for _, loss in history]
    assert len(history) == 6 and losses[-1] < 0.5 * losses[0]
    assert logs and "loss" in logs[0]


def test_classifier_checkpoint_round_trip_and_errors(tmp_path):
    net = FashionClassifier(TINY)
    path = save_classifier(net, tmp_path / "c.ckpt", {"test_accuracy": 0.5})
    loaded, meta = load_classifier(path)
    x = np.random.default_rng(9).random((3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(classifier_outputs(loaded, x)[0], classifier_outputs(net, x)[0], rtol=1e-6)
    assert meta["test_accuracy"] == 0.5 and len(meta["sha256"]) == 64 and loaded.config == TINY
    from ms_diffusion.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist; train one"):
        load_classifier(tmp_path / "missing.ckpt")


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def test_shipped_classifier_accuracy_on_the_fashion_mnist_test_split():
    """Measured here on all 10,000 test images (read straight from the Debian package's IDX files), not read
    from the accuracy the weights file stores: README's 90.69% is this number."""
    files = [DEBIAN_FASHION_MNIST / f"t10k-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
    if not all(f.is_file() for f in files):
        pytest.skip("Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
    images = np.frombuffer(gzip.open(files[0]).read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    labels = np.frombuffer(gzip.open(files[1]).read(), np.uint8, offset=8)
    assert images.shape == (10_000, 1, 28, 28) and labels.shape == (10_000,)
    net, meta = load_classifier()
    measured = accuracy(net, images.astype(np.float32) / 255.0, labels.astype(np.int64))
    assert measured >= 0.90 and net.config.feature_dim == 96
    assert measured == pytest.approx(meta["test_accuracy"], abs=1e-4)  # the stored figure is this measurement


# --------------------------------------------------------------------------------------------- reference cache / CLI

def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(images)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.astype(np.uint8).tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    """A tiny Fashion-MNIST look-alike (64 train / 40 test blobs) and a private metrics cache."""
    rng = np.random.default_rng(10)
    folder = tmp_path / "fmnist"
    for prefix, n in (("train", 64), ("t10k", 40)):
        images, labels = _two_class_images(rng, n)
        _write_idx(folder, prefix, np.round(images[:, 0] * 255), labels)
    monkeypatch.setenv("MS_DIFFUSION_CACHE", str(tmp_path / "cache"))
    from ms_diffusion.metrics import reference

    monkeypatch.setattr(reference, "_MEMO", {})
    return folder


def test_reference_cache_is_reused_and_invalidated_by_new_weights(tmp_path, fake_fmnist):
    from ms_diffusion.metrics.features import classifier_extractor
    from ms_diffusion.metrics.reference import cache_dir, reference_features

    ckpt = tmp_path / "cls.ckpt"
    save_classifier(FashionClassifier(TINY), ckpt)
    ext = classifier_extractor(ckpt)
    calls = []
    counted = ext.fn

    def counting(images):
        calls.append(len(images))
        return counted(images)

    ext.fn = counting
    first = reference_features(ext, "fashion-mnist", data_dir=fake_fmnist)
    assert calls == [64] and first.count == 64 and first.features.shape == (64, 8)
    files = sorted(p.name for p in cache_dir().iterdir())
    assert len(files) == 1 and ext.key in files[0] and files[0].startswith("ref-fashion_mnist-train-")
    from ms_diffusion.metrics import reference

    reference._MEMO.clear()  # a new process: read back from disk
    again = reference_features(ext, "fashion-mnist", data_dir=fake_fmnist)
    assert calls == [64] and np.array_equal(again.stats.mu, first.stats.mu)

    ms_net = FashionClassifier(TINY)  # new weights under the same path
    import mindspore as ms

    for p in ms_net.trainable_params():
        p.set_data(ms.Tensor(np.full(p.shape, 0.01, np.float32)))
    save_classifier(ms_net, ckpt)
    ext2 = classifier_extractor(ckpt)
    assert ext2.weights_sha256 != ext.weights_sha256
    third = reference_features(ext2, "fashion-mnist", data_dir=fake_fmnist)
    assert len(list(cache_dir().iterdir())) == 2 and not np.allclose(third.stats.mu, first.stats.mu)


def test_samples_of_another_size_are_compared_through_the_same_resize(tmp_path, fake_fmnist):
    """32x32 samples (a latent model's) vs a 28x28 classifier: the reference is loaded at 32x32 and both go
    through fit_to_extractor, so real images evaluated as 'samples' sit at distance ~0."""
    from ms_diffusion.metrics import evaluate_samples, fit_to_extractor
    from ms_diffusion.metrics.data import load_dataset_arrays
    from ms_diffusion.metrics.features import classifier_extractor
    from ms_diffusion.metrics.reference import reference_features

    ckpt = tmp_path / "cls.ckpt"
    save_classifier(FashionClassifier(TINY), ckpt)
    ext = classifier_extractor(ckpt)
    real32 = load_dataset_arrays("fashion-mnist", "train", data_dir=fake_fmnist, image_size=32).images
    assert real32.shape[1:] == (1, 32, 32)
    result = evaluate_samples(real32, "fashion-mnist", metrics=("fd",), extractor=ext, data_dir=fake_fmnist)
    assert abs(result["fd"]) < 1e-4
    ref32 = reference_features(ext, "fashion-mnist", data_dir=fake_fmnist, image_shape=(1, 32, 32))
    np.testing.assert_allclose(ref32.features, ext(fit_to_extractor(real32, ext)), rtol=1e-5, atol=1e-6)
    ref28 = reference_features(ext, "fashion-mnist", data_dir=fake_fmnist)
    assert ref28.path != ref32.path and not np.allclose(ref28.features, ref32.features)   # cached apart


def _cli(argv, capsys):
    from ms_diffusion.cli.evaluate import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_evaluate_cli_end_to_end(tmp_path, fake_fmnist, capsys):
    ckpt = tmp_path / "cls.ckpt"
    save_classifier(FashionClassifier(TINY), ckpt)
    rng = np.random.default_rng(11)
    images, _ = _two_class_images(rng, 40)
    train_images = np.fromfile(fake_fmnist / "train-images-idx3-ubyte", np.uint8, offset=16).reshape(-1, 1, 28, 28)
    images[:4] = train_images[:4] / 255.0  # four copies of training images
    images = (np.round(images * 255) / 255).astype(np.float32)  # exactly representable as 8-bit PNGs
    np.savez(tmp_path / "s.npz", images=images)
    code, out, err = _cli(["--samples", str(tmp_path / "s.npz"), "--dataset", "fashion-mnist", "--data-dir",
                           str(fake_fmnist), "--classifier-weights", str(ckpt), "--json", str(tmp_path / "r.json"),
                           "--bootstrap", "5", "--kid-subsets", "5"], capsys)
    assert code == 0, err
    for row in ("FD (classifier features)", "KID (x1000, subsets of 40)", "precision (k=3)", "recall (k=3)",
                "memorised", "median NN distance"):
        assert row in out
    assert "samples: " in out and "(40 images)" in out and "fashion_mnist train (64 images)" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_samples"] == 40 and result["fd"] > 0 and result["fd_std"] > 0
    assert result["memorization"] >= 4 / 40 and result["pr_num_real"] == 40
    # a folder of PNGs with the same images gives the same FD
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(np.round(images * 255).astype(np.uint8)):
        Image.fromarray(im[0]).save(folder / f"{i:03d}.png")
    code, out2, err = _cli(["--samples", str(folder), "--data-dir", str(fake_fmnist), "--classifier-weights",
                            str(ckpt), "--metric", "fd", "--num", "40", "--bootstrap", "0"], capsys)
    assert code == 0, err
    assert f"FD (classifier features)  {result['fd']:.4g}" in out2 and "KID" not in out2


def test_evaluate_cli_errors(tmp_path, fake_fmnist, capsys):
    ckpt = tmp_path / "cls.ckpt"
    save_classifier(FashionClassifier(TINY), ckpt)
    base = ["--data-dir", str(fake_fmnist), "--classifier-weights", str(ckpt)]
    np.savez(tmp_path / "nhwc.npz", images=np.zeros((10, 28, 28, 1), np.float32))
    code, _, err = _cli(["--samples", str(tmp_path / "nhwc.npz")] + base, capsys)
    assert code == 2 and "looks like (N, H, W, C)" in err and len(err.strip().splitlines()) == 1
    np.savez(tmp_path / "few.npz", images=np.zeros((5, 1, 28, 28), np.float32))
    code, _, err = _cli(["--samples", str(tmp_path / "few.npz"), "--metric", "fd"] + base, capsys)
    assert code == 2 and "too few for the covariance of 8-dimensional features" in err
    np.savez(tmp_path / "range.npz", images=np.full((10, 1, 28, 28), -1.0, np.float32))
    code, _, err = _cli(["--samples", str(tmp_path / "range.npz")] + base, capsys)
    assert code == 2 and "(x + 1) / 2" in err
    np.savez(tmp_path / "nokey.npz", x=np.zeros(3))
    code, _, err = _cli(["--samples", str(tmp_path / "nokey.npz")] + base, capsys)
    assert code == 2 and "no 'images' array" in err
    code, _, err = _cli(["--samples", str(tmp_path / "few.npz"), "--features", "inception"] + base, capsys)
    assert code == 2 and "--inception-weights" in err
    code, _, err = _cli(["--samples", str(tmp_path / "few.npz"), "--features", "inception", "--inception-weights",
                         str(tmp_path / "nope.ckpt")] + base, capsys)
    assert code == 2 and "convert pytorch-fid's" in err
    code, _, err = _cli(["--samples", str(tmp_path / "missing.npz")] + base, capsys)
    assert code == 2 and "do not exist" in err
    code, _, err = _cli(["--samples", str(tmp_path / "few.npz"), "--metric", "fid,bogus"] + base, capsys)
    assert code == 2 and "unknown metric 'bogus'" in err


# --------------------------------------------------------------------------------------------- FID Inception

def _torch_fidelity_inception(monkeypatch):
    """torch-fidelity's pure-torch FID Inception module, imported without its package __init__ (which pulls
    torchvision, not importable beside torch 2.13 CPU here). Install: pip install --no-deps torch-fidelity."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    for name in [m for m in sys.modules if m.startswith("torch_fidelity.")]:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # removed again at teardown
    return torch, module


@pytest.mark.torch
def test_fid_inception_matches_torch_fidelity_with_random_weights(tmp_path, monkeypatch, capsys):
    torch, tf_module = _torch_fidelity_inception(monkeypatch)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    ref_cls = tf_module.FeatureExtractorInceptionV3
    path = tmp_path / "random_fid_inception.pth"
    # torch-fidelity's constructor insists on a weights file: write a random one in the FID weights' layout
    twin_layers = _FidInceptionLayers(tf_module, torch)
    sd = twin_layers.state_dict()
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if k.endswith("running_mean") or k.endswith("bn.bias"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("running_var") or k.endswith("bn.weight"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
    torch.save(sd, path)
    ref = ref_cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))

    from ms_diffusion.metrics.inception import InceptionV3FID, load_fid_inception

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        convert = importlib.import_module("convert_fid_inception")
    finally:
        sys.path.pop(0)
    out = tmp_path / "fid_inception.ckpt"
    assert convert.main([str(path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    net, meta = load_fid_inception(out)
    assert isinstance(net, InceptionV3FID) and meta["source"] == path.name

    import mindspore as ms

    u8 = np.random.default_rng(12).integers(0, 256, (2, 3, 299, 299)).astype(np.uint8)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(u8))[0].numpy()
    ours = net.trunk(ms.Tensor((u8.astype(np.float32) - 128.0) / 128.0)).asnumpy()
    assert ours.shape == (2, 2048) and (ours >= 0).all()
    scale = np.abs(theirs).max()
    assert scale > 0 and np.abs(ours - theirs).max() <= 1e-4 * scale

    # input handling is pytorch-fid's: bilinear resize to 299 (align_corners=False), then 2x - 1
    x = np.random.default_rng(13).random((2, 1, 28, 28)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x).repeat(1, 3, 1, 1), size=(299, 299),
                                               mode="bilinear", align_corners=False).numpy() * 2 - 1
    np.testing.assert_allclose(net.preprocess(ms.Tensor(x)).asnumpy(), expected, atol=1e-5)


class _FidInceptionLayers:
    """Only to obtain a correctly shaped, randomly initialised state dict of torch-fidelity's network (its
    constructor insists on loading a weights file): the same layer list, built from its own block classes."""

    def __new__(cls, tf_module, torch):
        m = torch.nn.Module()
        B = tf_module.BasicConv2d
        m.Conv2d_1a_3x3 = B(3, 32, kernel_size=3, stride=2)
        m.Conv2d_2a_3x3 = B(32, 32, kernel_size=3)
        m.Conv2d_2b_3x3 = B(32, 64, kernel_size=3, padding=1)
        m.Conv2d_3b_1x1 = B(64, 80, kernel_size=1)
        m.Conv2d_4a_3x3 = B(80, 192, kernel_size=3)
        m.Mixed_5b = tf_module.InceptionA(192, pool_features=32)
        m.Mixed_5c = tf_module.InceptionA(256, pool_features=64)
        m.Mixed_5d = tf_module.InceptionA(288, pool_features=64)
        m.Mixed_6a = tf_module.InceptionB(288)
        m.Mixed_6b = tf_module.InceptionC(768, channels_7x7=128)
        m.Mixed_6c = tf_module.InceptionC(768, channels_7x7=160)
        m.Mixed_6d = tf_module.InceptionC(768, channels_7x7=160)
        m.Mixed_6e = tf_module.InceptionC(768, channels_7x7=192)
        m.Mixed_7a = tf_module.InceptionD(768)
        m.Mixed_7b = tf_module.InceptionE_1(1280)
        m.Mixed_7c = tf_module.InceptionE_2(2048)
        m.fc = torch.nn.Linear(2048, 1008)
        return m
