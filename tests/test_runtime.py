"""runtime.setup's process-wide choices, each checked in a fresh process (they cannot be undone)."""
import subprocess
import sys

import pytest

_LAUNCH_MODE = """
import sys
import ms_diffusion
from mindspore._c_expression import RuntimeConf
ms_diffusion.setup("CPU", sys.argv[1])
print(RuntimeConf.get_instance().is_launch_blocking())
"""


@pytest.mark.parametrize("mode,blocking", [("pynative", "True"), ("graph", "False")])
def test_pynative_on_cpu_launches_each_op_synchronously(mode, blocking, tmp_path):
    """PyNative on CPU runs its ops as they come (the asynchronous launch pipeline cost a small tutorial half its
    time); graph mode keeps the asynchronous launches that compiled graphs gain from."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCH_MODE, mode], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == blocking
