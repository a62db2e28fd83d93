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
# runtime.setup(mode="pynative") makes every launch blocking for the rest of the process (MindSpore cannot undo it),
# which slows compiled graphs: an in-process sample.py --mode pynative must not slow the rest of a worker's tests.
# The real call is checked in fresh processes (test_runtime.py); notebooks and CLI subprocesses make it too.
ms.runtime.launch_blocking = lambda: None

#: In CI everything the suite needs is installed (README's test command), so a skip there is a failure.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


#: The files that take longest on 2 cores (README's command: two workers, whole files each), longest first.
#: They are collected first, so the run does not end with one worker on a long file while the other idles.
_LONG_FILES = ("test_tutorials.py", "test_distributed.py", "test_amp.py", "test_text_training.py",
               "test_objectives_training.py", "test_latent_diffusion.py", "test_stable_diffusion.py",
               "test_periodic_eval.py", "test_interrupts.py", "test_train_cli.py", "test_sd_formats.py",
               "test_latent_training.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file's own order stays


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
