import os

import ms_diffusion  # noqa: F401  (applies the CPU workaround before MindSpore makes kernels)
import mindspore as ms
import numpy as np
import pytest

ms.set_device("CPU")


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    ms.set_seed(0)
    yield


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
