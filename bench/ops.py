#!/usr/bin/env python
"""Single operations on CPU: MindSpore's built-in ops, ms_diffusion's own kernels, and PyTorch, same work.

    python bench/ops.py                    # batch 16, the shapes of a dim-32 U-Net on 28x28 images
    python bench/ops.py --reps 9           # more timings per row (medians are less noisy)
    python bench/ops.py --no-isa-compare   # skip the conv forward without the oneDNN AVX2 cap (slow)

Each framework runs in its own process (no competing thread pools; oneDNN reads its ISA cap at
start-up). Every time is the median of --reps timed blocks, after a warm-up; MindSpore's ops run
compiled (``ms.jit``), as in training. Rows:

* convolutions (no bias): forward, backward-data (dL/dx alone), backward-weights (dL/dW alone), and
  forward + backward of the layer as training runs it; GFLOP/s counts 2*B*Cout*H*W*Cin*k*k per pass.
  MindSpore's backward passes are its Conv2DBackpropInput / Conv2DBackpropFilter primitives, ours the
  kernels of ``ms_diffusion.kernels.conv``, torch's ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``
  (aten.convolution_backward with one output);
* linear attention forward + backward: ms_diffusion's ``LinearAttention`` vs lucidrains' (same
  dim, heads 4, dim_head 32, 4 memory key/values), gradients for the input and every weight; "built-in"
  is the same layer with every kernel of ours off (its projections and norms too);
* GroupNorm forward + backward: MindSpore's fused ``ops.group_norm``, ms_diffusion's kernel, and
  ``torch.nn.GroupNorm``, and, MindSpore only, the same norm written with mean/var reductions;
* softmax forward + backward over a middle axis vs over the last axis (MindSpore only: why
  ``LinearAttention`` transposes before its softmax over features).

Forward and backward outputs of the convolutions and GroupNorm are compared between the frameworks
on the same inputs (``check`` column: largest difference relative to the largest value).
"built-in" is MindSpore's op, "ours" the op as ms_diffusion's layers run it (our kernel where one
exists; ``MS_DIFFUSION_CPU_KERNELS=0`` makes both columns the built-in op). The ratio column is
PyTorch's time / ours (1.00 = as fast; 0.20 = five times slower). The load
average is printed before and after: on a shared machine the numbers are only as good as it.
The oneDNN ISA line (conv forward with and without ms_diffusion's AVX2 cap) depends on the CPU: the
default oneDNN path is the slow one only where the CPU has AVX-512 (it prints the CPU's flags).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent

# (name, batch, c_in, c_out, kernel, size): the shapes of lucidrains' Unet(dim=32, dim_mults=(1, 2, 4)) on 28x28
CONVS = [("conv3x3 64->64 @28", 64, 64, 3, 28), ("conv3x3 64->32 @28", 64, 32, 3, 28),
         ("conv3x3 128->128 @14", 128, 128, 3, 14), ("conv1x1 64->64 @28", 64, 64, 1, 28)]
ATTENTION = [("linear attention dim 32 @28", 32, 28), ("linear attention dim 64 @14", 64, 14)]
GROUPNORM = ("GroupNorm 8 groups, 64 ch @28", 8, 64, 28)
SOFTMAX = (4, 32, 28 * 28 + 4)          # (heads, dim_head, positions + memory): linear attention's q at 28x28
NATIVE_CONV = ("conv3x3 64->64 @32", 64, 64, 3, 32)   # ms_diffusion/runtime.py's example of the slow default ISA
PASSES = ("forward", "backward-data", "backward-weights", "forward+backward")


def _conv_gflop(batch: int, cin: int, cout: int, k: int, size: int) -> float:
    return 2.0 * batch * cout * size * size * cin * k * k / 1e9


def _median_time(fn: Callable[[], object], sync: Callable[[object], None], reps: int) -> float:
    """Median seconds per call over ``reps`` blocks; a block repeats ``fn`` for ~0.2 s, then syncs once."""
    for _ in range(2):
        sync(fn())
    t0 = time.perf_counter()
    sync(fn())
    inner = max(1, min(50, int(0.2 / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def _inputs(batch: int, cin: int, cout: int, k: int, size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cin, size, size)).astype(np.float32)
    w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    dy = rng.standard_normal((batch, cout, size, size)).astype(np.float32)
    return x, w, dy


def _summary(a) -> List[float]:
    """A few numbers that pin an output down (for the cross-framework check)."""
    import numpy as np

    a = np.asarray(a, np.float64).ravel()
    return [float(np.abs(a).max()), *map(float, a[:: max(1, a.size // 64)][:64])]


# ---------------------------------------------------------------------------------------------- MindSpore

def run_ms(args) -> Dict[str, dict]:
    import ms_diffusion  # noqa: F401  (the oneDNN AVX2 cap, unless MS_DIFFUSION_ONEDNN_ISA says otherwise)
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn, ops
    from mindspore.ops.operations import _grad_ops as G

    from ms_diffusion.kernels.conv import Conv2dOp
    from ms_diffusion.nn.attention import LinearAttention
    from ms_diffusion.nn.layers import conv2d
    from ms_diffusion.nn.norms import GroupNorm

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)

    def sync(out):   # a compiled graph's outputs are ready together: wait for the first one
        while isinstance(out, (tuple, list)):
            out = out[0]
        out.asnumpy()

    results: Dict[str, dict] = {}
    grad_all = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def fwd_bwd(cell: nn.Cell):
        params = ms.ParameterTuple(cell.trainable_params())

        def step(x, dy):
            return grad_all(cell, params)(x, dy)

        return ms.jit(step)

    convs = [NATIVE_CONV] if args.child == "ms-native" else CONVS
    for name, cin, cout, k, size in convs:
        x, w, dy = _inputs(args.batch, cin, cout, k, size)
        xt, wt, dyt = Tensor(x), Tensor(w), Tensor(dy)
        pad = k // 2
        conv = ops.Conv2D(cout, k, pad_mode="pad", pad=pad)
        data = ops.Conv2DBackpropInput(cout, k, pad_mode="pad", pad=pad)
        weights = G.Conv2DBackpropFilter(cout, k, pad_mode="pad", pad=pad, pad_list=(pad,) * 4)

        def forward(x, w):
            return conv(x, w)

        def backward_data(dy, w):
            return data(dy, w, x.shape)

        def backward_weights(dy, x):
            return weights(dy, x, w.shape)

        f, bd, bw = ms.jit(forward), ms.jit(backward_data), ms.jit(backward_weights)
        row = {"forward": _median_time(lambda: f(xt, wt), sync, args.reps)}
        if args.child != "ms-native":
            layer = nn.Conv2d(cin, cout, k, pad_mode="pad", padding=pad, has_bias=False)
            layer.weight.set_data(wt)
            both = fwd_bwd(layer)
            row.update({"backward-data": _median_time(lambda: bd(dyt, wt), sync, args.reps),
                        "backward-weights": _median_time(lambda: bw(dyt, xt), sync, args.reps),
                        "forward+backward": _median_time(lambda: both(xt, dyt), sync, args.reps)})
            ours = conv2d(cin, cout, k, padding=pad, bias=False)
            ours.weight.set_data(wt)
            if ours.use_kernel:
                op = Conv2dOp(padding=pad, has_bias=False)

                def k_forward(x, w):
                    return op.prim(x, w, op.spec)

                def k_backward_data(dy, w):
                    return op.backward_data(dy, w, xt, op.spec)

                def k_backward_weights(dy, x):
                    return op.backward_weights(x, dy, wt, op.spec)

                f, bd, bw = ms.jit(k_forward), ms.jit(k_backward_data), ms.jit(k_backward_weights)
            both = fwd_bwd(ours)
            row.update({"ours:forward": _median_time(lambda: f(xt, wt), sync, args.reps),
                        "ours:backward-data": _median_time(lambda: bd(dyt, wt), sync, args.reps),
                        "ours:backward-weights": _median_time(lambda: bw(dyt, xt), sync, args.reps),
                        "ours:forward+backward": _median_time(lambda: both(xt, dyt), sync, args.reps)})
        row.update({"check_forward": _summary(f(xt, wt).asnumpy())})
        if args.child != "ms-native":
            row.update({"check_backward-data": _summary(bd(dyt, wt).asnumpy()),
                        "check_backward-weights": _summary(bw(dyt, xt).asnumpy())})
        results[name] = row
    if args.child == "ms-native":
        return results

    def builtin_ops(cell: nn.Cell) -> nn.Cell:   # every layer of the cell on MindSpore's own ops
        for _, sub in cell.cells_and_names():
            if hasattr(sub, "use_kernel"):
                sub.use_kernel = False
        return cell

    for name, dim, size in ATTENTION:
        x = Tensor(np.random.default_rng(1).standard_normal((args.batch, dim, size, size)).astype(np.float32))
        ours, builtin = fwd_bwd(LinearAttention(dim)), fwd_bwd(builtin_ops(LinearAttention(dim)))
        results[name] = {"forward+backward": _median_time(lambda: builtin(x, x), sync, args.reps),
                         "ours:forward+backward": _median_time(lambda: ours(x, x), sync, args.reps)}

    name, groups, ch, size = GROUPNORM
    x, _, dy = _inputs(args.batch, ch, ch, 1, size, seed=2)
    xt, dyt = Tensor(x), Tensor(dy)
    norm = GroupNorm(groups, ch)
    ours = fwd_bwd(norm)
    results[name] = {"ours:forward+backward": _median_time(lambda: ours(xt, dyt), sync, args.reps),
                     "check_forward+backward": _summary(ours(xt, dyt)[0][0].asnumpy())}
    builtin = GroupNorm(groups, ch)
    builtin.use_kernel = False
    both = fwd_bwd(builtin)
    results[name]["forward+backward"] = _median_time(lambda: both(xt, dyt), sync, args.reps)

    class ReducedGroupNorm(nn.Cell):   # the same normalisation written with reductions
        def __init__(self):
            super().__init__()
            self.gamma, self.beta = norm.gamma, norm.beta

        def construct(self, x):
            b, c, h, w = x.shape
            g = x.reshape(b, groups, -1)
            mean = g.mean(axis=-1, keep_dims=True)
            var = ((g - mean) ** 2).mean(axis=-1, keep_dims=True)
            y = ((g - mean) / ops.sqrt(var + 1e-5)).reshape(b, c, h, w)
            return y * self.gamma.reshape(1, c, 1, 1) + self.beta.reshape(1, c, 1, 1)

    both = fwd_bwd(ReducedGroupNorm())
    results[name + ", reductions"] = {"forward+backward": _median_time(lambda: both(xt, dyt), sync, args.reps)}

    heads, d, n = SOFTMAX
    q = Tensor(np.random.default_rng(3).standard_normal((args.batch, heads, d, n)).astype(np.float32))

    class MiddleSoftmax(nn.Cell):
        def construct(self, x):
            return ops.softmax(x, axis=-2)

    class TransposedSoftmax(nn.Cell):
        def construct(self, x):
            return ops.softmax(x.swapaxes(-1, -2), axis=-1).swapaxes(-1, -2)

    for label, cell in (("softmax over axis -2", MiddleSoftmax()), ("softmax over axis -2, transposed to -1",
                                                                   TransposedSoftmax())):
        both = fwd_bwd(cell)
        results[label] = {"forward+backward": _median_time(lambda: both(q, q), sync, args.reps)}
    return results


# ---------------------------------------------------------------------------------------------- PyTorch

def run_torch(args) -> Dict[str, dict]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from tests.anchors import lucidrains

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    def sync(out):
        pass

    results: Dict[str, dict] = {}
    convs = [NATIVE_CONV] if args.child == "torch-native" else CONVS
    for name, cin, cout, k, size in convs:
        x, w, dy = (torch.from_numpy(a) for a in _inputs(args.batch, cin, cout, k, size))
        pad = k // 2
        with torch.no_grad():
            row = {"forward": _median_time(lambda: F.conv2d(x, w, padding=pad), sync, args.reps),
                   "check_forward": _summary(F.conv2d(x, w, padding=pad).numpy())}
            if args.child != "torch-native":
                bd = lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=pad)  # noqa: E731
                bw = lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=pad)  # noqa: E731
                row.update({"backward-data": _median_time(bd, sync, args.reps),
                            "backward-weights": _median_time(bw, sync, args.reps),
                            "check_backward-data": _summary(bd().numpy()),
                            "check_backward-weights": _summary(bw().numpy())})
        if args.child != "torch-native":
            layer = torch.nn.Conv2d(cin, cout, k, padding=pad, bias=False)
            with torch.no_grad():
                layer.weight.copy_(w)
            xg = x.clone().requires_grad_(True)

            def both():
                layer.zero_grad(set_to_none=True)
                xg.grad = None
                layer(xg).backward(dy)

            row["forward+backward"] = _median_time(both, sync, args.reps)
        results[name] = row
    if args.child == "torch-native":
        return results

    L = lucidrains()
    for name, dim, size in ATTENTION:
        attn = L.LinearAttention(dim)
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((args.batch, dim, size, size))
                             .astype(np.float32)).requires_grad_(True)

        def both():
            attn.zero_grad(set_to_none=True)
            x.grad = None
            attn(x).backward(x.detach())

        results[name] = {"forward+backward": _median_time(both, sync, args.reps)}

    name, groups, ch, size = GROUPNORM
    x, _, dy = (torch.from_numpy(a) for a in _inputs(args.batch, ch, ch, 1, size, seed=2))
    norm = torch.nn.GroupNorm(groups, ch)
    xg = x.clone().requires_grad_(True)

    def both():
        norm.zero_grad(set_to_none=True)
        xg.grad = None
        norm(xg).backward(dy)
        return xg.grad

    results[name] = {"forward+backward": _median_time(both, sync, args.reps),
                     "check_forward+backward": _summary(both().numpy())}
    return results


# ---------------------------------------------------------------------------------------------- report

def _child(kind: str, args, env_extra=None) -> Tuple[Dict[str, dict], dict]:
    cmd = [sys.executable, __file__, "--child", kind, "--batch", str(args.batch), "--reps", str(args.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env_extra or {})), cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{kind} run failed:\n{out.stderr[-3000:]}")
    got = json.loads(lines[-1])
    return got["results"], got["info"]


def _info(kind: str) -> dict:
    if kind.startswith("ms"):
        import mindspore as ms

        from ms_diffusion import kernels

        return {"version": ms.__version__, "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
                "kernels": "on" if kernels.enabled() else f"off ({kernels.disabled_reason()})"}
    import torch

    return {"version": torch.__version__, "threads": torch.get_num_threads()}


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    simd = sorted({f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")})
    return f"{model} ({', '.join(simd) or 'no AVX2'})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed blocks per row; the median is reported")
    p.add_argument("--no-isa-compare", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        results = run_ms(args) if args.child.startswith("ms") else run_torch(args)
        print(json.dumps({"results": results, "info": _info(args.child)}))
        return

    load_before = os.getloadavg()[0]
    ours, ms_info = _child("ms", args)
    ref, torch_info = _child("torch", args)
    print(f"batch {args.batch}, {os.cpu_count()} CPU cores; MindSpore {ms_info['version']} (graph mode, oneDNN ISA "
          f"cap {ms_info['isa']}), torch {torch_info['version']} ({torch_info['threads']} threads); median of "
          f"{args.reps} timings; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"our kernels {ms_info['kernels']}")
    print(f"{'op':44s}{'pass':18s}{'built-in':>9s}{'GFLOP/s':>9s}{'ours ms':>9s}{'GFLOP/s':>9s}{'torch ms':>10s}"
          f"{'GFLOP/s':>9s}{'ratio':>7s}{'check':>9s}")

    def check(name, key):
        a, b = ours[name].get("check_" + key), ref.get(name, {}).get("check_" + key)
        if not a or not b:
            return ""
        scale = max(a[0], b[0], 1e-30)
        return f"{max(abs(u - v) for u, v in zip(a, b)) / scale:9.0e}"

    def row(name, key, gflop=None, theirs=True):
        builtin, t = ours[name][key], ours[name]["ours:" + key]
        r = ref.get(name, {}).get(key) if theirs else None
        rate = (lambda s: f"{gflop / s:9.1f}") if gflop else (lambda s: f"{'':9s}")
        line = f"{name:44s}{key:18s}{builtin * 1e3:9.1f}{rate(builtin)}{t * 1e3:9.1f}{rate(t)}"
        if r is not None:
            line += f"{r * 1e3:10.1f}{rate(r)}{r / t:7.2f}{check(name, key)}"
        print(line)

    for name, cin, cout, k, size in CONVS:
        gflop = _conv_gflop(args.batch, cin, cout, k, size)
        for key in PASSES:
            row(name, key, gflop * (3 if key == "forward+backward" else 1))
    for name, _, _ in ATTENTION:
        row(name, "forward+backward")
    gn = GROUPNORM[0]
    row(gn, "forward+backward")
    reduced = ours[gn + ", reductions"]["forward+backward"]
    print(f"{gn + ', reductions':44s}{'forward+backward':18s}{reduced * 1e3:9.1f}"
          f"   (fused ops.group_norm: {reduced / ours[gn]['forward+backward']:.1f}x faster)")
    middle, last = (ours[k]["forward+backward"] for k in ("softmax over axis -2",
                                                          "softmax over axis -2, transposed to -1"))
    for key, t in (("softmax over axis -2", middle), ("softmax over axis -2, transposed to -1", last)):
        print(f"{key:44s}{'forward+backward':18s}{t * 1e3:9.1f}")
    print(f"  (B, heads, d, n) = ({args.batch}, {', '.join(map(str, SOFTMAX))}): transposing is "
          f"{middle / last:.1f}x faster")

    if not args.no_isa_compare:
        slow = argparse.Namespace(**{**vars(args), "reps": 3})
        native, _ = _child("ms-native", slow, {"MS_DIFFUSION_ONEDNN_ISA": "native"})
        capped, _ = _child("ms-native", slow)
        torch_fwd, _ = _child("torch-native", slow)
        name, cin, cout, k, size = NATIVE_CONV
        gflop = _conv_gflop(args.batch, cin, cout, k, size)
        n, c, t = (d[name]["forward"] for d in (native, capped, torch_fwd))
        print(f"oneDNN ISA, {name} forward: {c * 1e3:.1f} ms ({gflop / c:.0f} GFLOP/s) with the AVX2 cap "
              f"(ms_diffusion default), {n * 1e3:.0f} ms ({gflop / n:.1f} GFLOP/s) without it ({n / c:.1f}x the "
              f"time); torch {t * 1e3:.1f} ms ({gflop / t:.0f} GFLOP/s); CPU: {_cpu()}")


if __name__ == "__main__":
    main()
