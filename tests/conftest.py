import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one core per test process (README's command runs two): a second kernel thread per process would only
    # contend with the other process (float16 CPU training ran ~7x slower that way). Set before MindSpore and
    # torch load; subprocesses a test starts inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import ms_diffusion  # noqa: F401  (applies the CPU workaround before MindSpore makes kernels)
import mindspore as ms
import numpy as np
import pytest

ms.set_device("CPU")

#: In CI everything the suite needs is installed (README's test command), so a skip there is a failure.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_report_header(config):
    return "CI: a skipped test counts as a failure" if IN_CI else None


def _fail_skip_in_ci(report) -> None:
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI, where everything the suite needs must be installed "
                           f"(README's test command): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    ms.set_seed(0)
    yield


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
