"""The commands print a user error's whole message (every line) without a traceback; --debug adds it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ms_diffusion.cli.common import error_message

ROOT = Path(__file__).resolve().parent.parent

# train.py as a user without the data runs it: no ./data, no Debian package, no network (the download URL
# points at a closed loopback port, so it fails at once instead of waiting on a timeout).
_NO_DATA_TRAIN = """
import sys
import ms_diffusion.data.fashion_mnist as fm
fm.DEBIAN_FASHION_MNIST_DIR = sys.argv[1]
from ms_diffusion.cli.train import main
sys.exit(main(sys.argv[2:]))
"""


def _train_without_data(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MS_DIFFUSION_DATA"}
    env["MS_DIFFUSION_FASHION_MNIST_URL"] = "http://127.0.0.1:9/x.zip"
    return subprocess.run([sys.executable, "-c", _NO_DATA_TRAIN, str(tmp_path / "no-debian"),
                           "--out-dir", str(tmp_path / "run"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str):
    return [line for line in stderr.strip().splitlines() if line.strip() and "[WARNING]" not in line]


def test_missing_data_error_shows_every_line_and_no_traceback(tmp_path):
    proc = _train_without_data(tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert lines[0] == "train.py: error: Fashion-MNIST train data not found. Looked in:", proc.stderr
    text = "\n".join(lines)
    for part in ("- data/fashion-mnist (default data folder): does not exist", f"{tmp_path / 'no-debian'}",
                 "Debian package dataset-fashion-mnist", "download from http://127.0.0.1:9/x.zip: failed",
                 "Provide it in one of two ways:", "1. --data-dir DIR", "2. install it: `apt-get install "
                 "dataset-fashion-mnist`", "$MS_DIFFUSION_FASHION_MNIST_URL for a mirror"):
        assert part in text, f"{part!r} missing from:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("  2. install it:"), proc.stderr   # the message's last line reaches the user


def test_debug_keeps_the_traceback(tmp_path):
    proc = _train_without_data(tmp_path, "--debug")
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "DataNotFoundError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("  2. install it:")


def test_error_message_keeps_every_line_but_drops_mindsporess_cpp_stack():
    assert error_message(ValueError("first\n  second\nthird")) == "first\n  second\nthird"
    framework = RuntimeError("Kernel launch failed.\nInput shape is (2, 3).\n\n"
                             "----------------------------------------------------\n"
                             "- C++ Call Stack: (For framework developers)\n"
                             "----------------------------------------------------\n"
                             "mindspore/ccsrc/plugin/device/cpu/kernel.cc:42 Launch\n")
    assert error_message(framework) == "Kernel launch failed.\nInput shape is (2, 3)."
    assert error_message(ValueError("")) == ""


@pytest.mark.parametrize("script", ["train.py", "sample.py", "evaluate.py"])
def test_argparse_errors_stay_short(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--no-such-flag"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr


_CACHED_DENSE = """
import numpy as np, mindspore as ms
from mindspore import nn
ms.set_seed(0)
net = nn.Dense(4, 3)


@ms.jit
def forward(x):
    return net(x)


print(float(np.abs(forward(ms.Tensor(np.ones((2, 4), np.float32))).asnumpy()).max()))
"""


def test_train_refuses_mindsporess_compile_cache_which_loses_the_weights(tmp_path):
    """MindSpore's compile cache (MS_COMPILER_CACHE_ENABLE) on CPU: the second run of the same jit Dense loads its
    graph from the cache and computes with garbage weights. train.py refuses the variable before it writes
    anything."""
    env = dict(os.environ, MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=str(tmp_path / "cache"))
    script = tmp_path / "dense.py"          # MindSpore compiles from source files, not from ``python -c``
    script.write_text(_CACHED_DENSE)
    first, second = (float(subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                                          timeout=300, check=True).stdout) for _ in range(2))
    assert 0.1 < first < 10 and not (0.1 < second < 10), (first, second)   # the cached graph's output is garbage

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out-dir", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc.stderr) == [
        "train.py: error: MS_COMPILER_CACHE_ENABLE is set: MindSpore's compile cache runs cached CPU graphs with "
        "uninitialised weights (losses become inf / NaN); unset MS_COMPILER_CACHE_ENABLE, or use --mode pynative"]
    assert not (tmp_path / "run").exists()
