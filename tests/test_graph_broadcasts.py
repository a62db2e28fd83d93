"""No broadcasting elementwise arithmetic on feature maps in our networks' compiled graphs.

MindSpore 2.10's CPU kernels for a broadcasting Add / Sub / Mul (an operand neither full-shaped nor a single
element) keep about 16 bytes per output element for as long as the compiled graph lives and run slower than
``broadcast_to`` + a same-shape op (``ms_diffusion.nn.layers.expand_as``): at Stable Diffusion's size they held
0.3 GB of a UNet step. The networks' forward graphs are compiled with MindSpore's IR dumps on, in a child
process with our CPU kernels off (every layer then runs its own arithmetic; the kernels' layers have none in the
graph), and every broadcasting binary op in the final kernel graphs is listed with the source line that made it.
A deliberate ``x + e`` is the control that the dumps are read right. Run on the code before the fix it lists 94
such ops (30 distinct) in ldm's ResBlocks, the VAE's, lucidrains' and the tutorial's blocks, the norms, LPIPS
and the discriminator's ActNorm.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "broadcast_worker.py"
_BINARY = re.compile(r"= (?:PrimFunc_)?(Add|Sub|Mul|RealDiv|Div|Maximum|Minimum|SquaredDifference)\(")
_SHAPE = re.compile(r"<Tensor\[\w+\], \(([\d, ]*)\)>")
_SOURCE = re.compile(r"# In file (\S+?):(\d+)")


def _numel(shape):
    return math.prod(shape) if shape else 1


def broadcasting_ops(ir_text: str) -> Counter:
    """{(op, input shapes, innermost source file:line): count} of binary ops whose inputs differ in shape and
    are all larger than one element, in a kernel-graph IR dump."""
    lines = ir_text.split("\n")
    found = Counter()
    for i, line in enumerate(lines):
        m = _BINARY.search(line)
        if not m or i + 1 >= len(lines):
            continue
        shapes = [tuple(int(v) for v in s.split(",") if v.strip())
                  for s in _SHAPE.findall(lines[i + 1].split("->")[0])]
        if len(shapes) < 2 or len(set(shapes)) == 1 or min(map(_numel, shapes)) == 1:
            continue
        source = "?"
        for follow in lines[i + 2:i + 60]:
            if follow.lstrip().startswith("%") or follow.startswith("}"):
                break
            s = _SOURCE.search(follow)
            if s and "site-packages" not in s.group(1):
                source = f"{Path(s.group(1)).name}:{s.group(2)}"
        found[(m.group(1), tuple(shapes), source)] += 1
    return found


def test_no_broadcasting_arithmetic_in_network_graphs(tmp_path):
    env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=str(tmp_path / "ir"),
               MS_DEV_DUMP_IR_PASSES="hwopt_comm_after_eliminate_nopnode",    # the final kernel graphs only
               MS_DIFFUSION_CPU_KERNELS="0")
    run = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads((tmp_path / "graphs.json").read_text())) == 11
    dumps = sorted((tmp_path / "ir").glob("hwopt_comm_after_eliminate_nopnode_kernel_graph*.ir"))
    assert dumps, f"no kernel-graph IR dumps in {tmp_path / 'ir'}: {sorted(os.listdir(tmp_path / 'ir'))[:20]}"
    found = Counter()
    for f in dumps:
        found.update(broadcasting_ops(f.read_text()))
    control = {k: n for k, n in found.items() if k[2].startswith("broadcast_worker.py")}
    assert control and all(k[0] == "Add" and k[1] == ((2, 32, 8, 8), (2, 32, 1, 1)) for k in control), found
    rest = {k: n for k, n in found.items() if k not in control}
    assert not rest, "broadcasting arithmetic in the networks' graphs (wrap the small operand in " \
                     "nn.layers.expand_as):\n" + "\n".join(f"{n} x {op} {shapes} at {src}"
                                                          for (op, shapes, src), n in rest.items())
