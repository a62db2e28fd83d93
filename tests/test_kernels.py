"""Our CPU kernels (ms_diffusion.kernels) against MindSpore's built-in ops, and their fallback."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from ms_diffusion import kernels
from ms_diffusion.kernels import build as kbuild
from ms_diffusion.kernels.attention import LinearAttentionOp
from ms_diffusion.kernels.conv import Conv2dOp
from ms_diffusion.kernels.norm import GroupNormOp, RmsNormOp
from ms_diffusion.nn.layers import Conv2d, SwapAxes12, conv2d
from ms_diffusion.nn.attention import LinearAttention
from ms_diffusion.nn.blocks import Block
from ms_diffusion.nn.norms import GroupNorm, RMSNorm
from ms_diffusion.training import TrainStep

ROOT = Path(__file__).resolve().parent.parent

# (N, C, O, H, W, k, stride, padding, groups, bias): the convolutions our networks run -- lucidrains'
# 3x3 and 7x7 stems, 1x1 shortcuts and attention projections, the ConvNeXt block's depthwise 7x7,
# ldm's strided 3x3 downsampling, the tutorial's 4x4 stride-2 downsampling -- plus odd sizes.
CASES = [
    (4, 16, 32, 28, 28, 3, 1, 1, 1, True),
    (2, 1, 16, 28, 28, 7, 1, 3, 1, True),
    (2, 32, 16, 14, 14, 1, 1, 0, 1, True),
    (2, 48, 144, 7, 7, 1, 1, 0, 1, False),
    (2, 16, 16, 14, 14, 7, 1, 3, 16, True),
    (2, 16, 16, 15, 13, 3, 2, 1, 1, True),
    (2, 16, 32, 14, 14, 4, 2, 1, 1, False),
    (3, 12, 8, 9, 9, 3, 1, 1, 4, True),
]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(autouse=True)
def _kernels_on():
    if platform.machine() != "x86_64" or sys.platform != "linux":
        pytest.skip("our CPU kernels are built for x86-64 Linux only")
    if not kernels.enabled():    # README's test command installs the headers; g++ is needed too
        pytest.fail(f"the CPU kernels must build where the suite runs: {kernels.disabled_reason()}")


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_conv2d_forward_and_backward_match_the_builtin_op(mode):
    rng = np.random.default_rng(0)
    for n, c, o, h, w_, k, s, p, g, bias in CASES:
        x = Tensor(rng.standard_normal((n, c, h, w_)).astype(np.float32))
        w = Tensor((rng.standard_normal((o, c // g, k, k)) / np.sqrt(c // g * k * k)).astype(np.float32))
        b = Tensor(rng.standard_normal((o,)).astype(np.float32))
        up = Tensor(rng.standard_normal((n, o, (h + 2 * p - k) // s + 1, (w_ + 2 * p - k) // s + 1)).astype(np.float32))
        op = Conv2dOp(stride=s, padding=p, groups=g, has_bias=bias)

        def ours(x, w, b):
            y = op.prim(x, w, b, op.spec) if bias else op.prim(x, w, op.spec)
            return (y * up).sum(), y

        def builtin(x, w, b):
            y = ops.conv2d(x, w, b if bias else None, stride=s, pad_mode="pad", padding=p, groups=g)
            return (y * up).sum(), y

        grads = [ms.value_and_grad(f, grad_position=(0, 1, 2), has_aux=True) for f in (ours, builtin)]
        if mode == "graph":
            grads = [ms.jit(f) for f in grads]
        ((_, y1), g1), ((_, y2), g2) = (f(x, w, b) for f in grads)
        case = (n, c, o, h, w_, k, s, p, g, bias)
        assert y1.shape == y2.shape, case
        assert _rel(y1.asnumpy(), y2.asnumpy()) < 1e-5, case
        names = ("dx", "dw", "db") if bias else ("dx", "dw")
        for name, a, r in zip(names, g1, g2):
            assert _rel(a.asnumpy(), r.asnumpy()) < 1e-5, (case, name, _rel(a.asnumpy(), r.asnumpy()))


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_layers_of_several_settings_in_one_network(mode):
    """Each layer keeps its own output shape and backward: convolutions of different strides and group norms
    of different group counts side by side (MindSpore keeps one shape inference per Custom function)."""
    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv2d(4, 8, 3), conv2d(8, 8, 3, stride=2), conv2d(8, 6, 1, bias=False)
            self.n1, self.n2 = GroupNorm(4, 8), GroupNorm(1, 8)

        def construct(self, x):
            return self.c(self.n2(self.b(self.n1(self.a(x)))))

    net = Net()
    x = Tensor(np.random.default_rng(0).standard_normal((2, 4, 9, 9)).astype(np.float32))
    params = net.trainable_params()

    def loss(x):
        return (net(x) ** 2).sum()

    def builtin(x):
        h = ops.conv2d(x, net.a.weight, net.a.bias, pad_mode="pad", padding=1)
        h = ops.group_norm(h, 4, net.n1.gamma, net.n1.beta, 1e-5)
        h = ops.conv2d(h, net.b.weight, net.b.bias, stride=2, pad_mode="pad", padding=1)
        h = ops.group_norm(h, 1, net.n2.gamma, net.n2.beta, 1e-5)
        return (ops.conv2d(h, net.c.weight) ** 2).sum()

    ours = ms.value_and_grad(loss, grad_position=0, weights=params)
    if mode == "graph":
        ours = ms.jit(ours)
    ref = ms.value_and_grad(builtin, grad_position=0, weights=params)
    (l1, (dx1, dw1)), (l2, (dx2, dw2)) = ours(x), ref(x)
    assert _rel(l1.asnumpy(), l2.asnumpy()) < 1e-5 and _rel(dx1.asnumpy(), dx2.asnumpy()) < 1e-5
    assert len(dw1) == len(dw2) == 9
    assert all(_rel(a.asnumpy(), b.asnumpy()) < 1e-5 for a, b in zip(dw1, dw2))


# (shape, groups, eps): lucidrains' GroupNorm(8) and GroupNorm(1), ldm's GroupNorm(32, eps 1e-6), a 3-D input
GN_CASES = [((4, 32, 28, 28), 8, 1e-5), ((2, 16, 7, 7), 1, 1e-5), ((2, 64, 8, 8), 32, 1e-6), ((3, 8, 10), 4, 1e-5)]


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_group_norm_forward_and_backward_match_the_builtin_op(mode):
    rng = np.random.default_rng(0)
    for shape, groups, eps in GN_CASES:
        c = shape[1]
        x = Tensor((rng.standard_normal(shape) * 3 + 1).astype(np.float32))
        gamma = Tensor(rng.standard_normal((c,)).astype(np.float32))
        beta = Tensor(rng.standard_normal((c,)).astype(np.float32))
        up = Tensor(rng.standard_normal(shape).astype(np.float32))
        op = GroupNormOp(groups, eps)

        def ours(x, gamma, beta):
            y = op.prim(x, gamma, beta, op.spec)[0]
            return (y * up).sum(), y

        def builtin(x, gamma, beta):
            y = ops.group_norm(x, groups, gamma, beta, eps)
            return (y * up).sum(), y

        grads = [ms.value_and_grad(f, grad_position=(0, 1, 2), has_aux=True) for f in (ours, builtin)]
        if mode == "graph":
            grads = [ms.jit(f) for f in grads]
        ((_, y1), g1), ((_, y2), g2) = (f(x, gamma, beta) for f in grads)
        assert _rel(y1.asnumpy(), y2.asnumpy()) < 1e-5, shape
        for name, a, r in zip(("dx", "dgamma", "dbeta"), g1, g2):
            assert _rel(a.asnumpy(), r.asnumpy()) < 1e-5, (shape, name, _rel(a.asnumpy(), r.asnumpy()))
    layer = GroupNorm(4, 8)
    assert layer.use_kernel and not GroupNorm(4, 8).to_float(ms.float16).use_kernel


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_rms_norm_with_modulation_and_silu_matches_the_builtin_ops(mode):
    """lucidrains' Block tail (RMSNorm -> * (scale + 1) + shift -> SiLU) fused, against the same maths in
    MindSpore ops; one position is all zeros (the norm's 1e-12 clamp)."""
    rng = np.random.default_rng(0)
    for shape, modulated, silu in [((4, 16, 28, 28), True, True), ((2, 64, 7, 7), False, True),
                                   ((3, 32, 5, 9), False, False), ((2, 8, 3, 3), True, False)]:
        n, c = shape[:2]
        xa = rng.standard_normal(shape).astype(np.float32)
        xa[0, :, 1, 1] = 0.0
        x, up = Tensor(xa), Tensor(rng.standard_normal(shape).astype(np.float32))
        g = Tensor((1 + 0.1 * rng.standard_normal((1, c, 1, 1))).astype(np.float32))
        scale = Tensor((0.3 * rng.standard_normal((n, c, 1, 1))).astype(np.float32))
        shift = Tensor((0.3 * rng.standard_normal((n, c, 1, 1))).astype(np.float32))
        op = RmsNormOp(modulated=modulated, silu=silu)

        def ours(x, g, scale, shift):
            y = op.prim(x, g, scale, shift, op.spec)[0] if modulated else op.prim(x, g, op.spec)[0]
            return (y * up).sum(), y

        def builtin(x, g, scale, shift):
            inv = ops.rsqrt(ops.maximum((x * x).sum(axis=1, keepdims=True), 1e-24))
            y = x * inv * (g * float(c) ** 0.5)
            if modulated:
                y = y * (scale + 1) + shift
            if silu:
                y = y * ops.sigmoid(y)
            return (y * up).sum(), y

        grads = [ms.value_and_grad(f, grad_position=(0, 1, 2, 3), has_aux=True) for f in (ours, builtin)]
        if mode == "graph":
            grads = [ms.jit(f) for f in grads]
        ((_, y1), g1), ((_, y2), g2) = (f(x, g, scale, shift) for f in grads)
        case = (shape, modulated, silu)
        assert _rel(y1.asnumpy(), y2.asnumpy()) < 1e-5, case
        names = ("dx", "dg", "dscale", "dshift") if modulated else ("dx", "dg")
        for name, a, r in zip(names, g1, g2):
            assert _rel(a.asnumpy(), r.asnumpy()) < 1e-5, (case, name, _rel(a.asnumpy(), r.asnumpy()))
    assert RMSNorm(8).use_kernel and Block(4, 8).use_kernel and not Block(4, 8).to_float(ms.float16).use_kernel


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_linear_attention_core_matches_the_builtin_ops(mode):
    """Softmax over features for q, over positions for [memory | k], context = k v^T, out = context^T q,
    written here in MindSpore ops; lucidrains' form (memory key/values) and the tutorial's (no memory,
    v / positions), at the models' sizes and an odd one."""
    rng = np.random.default_rng(0)
    for b, heads, d, h, w, m, v_by_positions in [(4, 4, 32, 28, 28, 4, False), (2, 2, 16, 14, 14, 0, True),
                                                 (3, 3, 8, 5, 9, 2, False)]:
        n = h * w
        qkv = Tensor((2 * rng.standard_normal((b, 3 * heads * d, h, w))).astype(np.float32))
        mem = Tensor(rng.standard_normal((2, heads, d, m or 1)).astype(np.float32))   # unused when m = 0
        up = Tensor(rng.standard_normal((b, heads * d, h, w)).astype(np.float32))
        scale = d ** -0.5
        op = LinearAttentionOp(heads, scale, v_by_positions, memory=m > 0)

        def ours(qkv, mem):
            y = op.prim(qkv, mem, op.spec) if m else op.prim(qkv, op.spec)
            return (y * up).sum(), y

        def builtin(qkv, mem):
            q, k, v = (t.reshape(b, heads, d, n) for t in ops.split(qkv, heads * d, axis=1))
            if m:
                k = ops.cat((ops.broadcast_to(mem[0][None], (b, heads, d, m)), k), axis=-1)
                v = ops.cat((ops.broadcast_to(mem[1][None], (b, heads, d, m)), v), axis=-1)
            q = ops.softmax(q, axis=2) * scale
            k = ops.softmax(k, axis=3)
            if v_by_positions:
                v = v / n
            context = ops.matmul(k, v.swapaxes(2, 3))                     # (b, heads, d, e)
            y = ops.matmul(context.swapaxes(2, 3), q).reshape(b, heads * d, h, w)
            return (y * up).sum(), y

        grads = [ms.value_and_grad(f, grad_position=(0, 1), has_aux=True) for f in (ours, builtin)]
        if mode == "graph":
            grads = [ms.jit(f) for f in grads]
        ((_, y1), g1), ((_, y2), g2) = (f(qkv, mem) for f in grads)
        case = (b, heads, d, h, w, m, v_by_positions)
        assert y1.shape == y2.shape == (b, heads * d, h, w), case
        assert _rel(y1.asnumpy(), y2.asnumpy()) < 1e-5, case
        for name, a, r in zip(("dqkv", "dmem"), g1, g2 if m else g2[:1]):
            assert _rel(a.asnumpy(), r.asnumpy()) < 1e-5, (case, name, _rel(a.asnumpy(), r.asnumpy()))
    layer = LinearAttention(16, heads=2, dim_head=8)
    assert layer.use_kernel and not LinearAttention(16).to_float(ms.float16).use_kernel


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_swap_axes_kernel_is_swapaxes_forward_and_backward(mode):
    """A copy, so bit-exact: head splits / merges (D > 1) and channel-first <-> channel-last (3-d, D = 1) at sizes
    that are not multiples of the kernel's 32-wide tiles; the gradient is the swapped upstream gradient."""
    rng = np.random.default_rng(0)
    layer = SwapAxes12()
    assert layer.use_kernel and not SwapAxes12().to_float(ms.float16).use_kernel
    for shape in [(2, 70, 5, 40), (3, 45, 33, 1), (1, 1, 7, 3), (2, 33, 50), (2, 320, 96), (1, 64, 64)]:
        x = Tensor(rng.standard_normal(shape).astype(np.float32))
        up = Tensor(rng.standard_normal((shape[0], shape[2], shape[1]) + shape[3:]).astype(np.float32))

        def ours(x):
            y = layer(x)
            return (y * up).sum(), y

        def builtin(x):
            y = x.swapaxes(1, 2)
            return (y * up).sum(), y

        grads = [ms.value_and_grad(f, grad_position=0, has_aux=True) for f in (ours, builtin)]
        if mode == "graph":
            grads = [ms.jit(f) for f in grads]
        ((_, y1), g1), ((_, y2), g2) = (f(x) for f in grads)
        np.testing.assert_array_equal(y1.asnumpy(), y2.asnumpy(), err_msg=str(shape))
        np.testing.assert_array_equal(g1.asnumpy(), g2.asnumpy(), err_msg=str(shape))


def _tiny_unet_step(use_kernels: bool, block_type: str, steps: int = 3):
    """Loss and weights of a few SGD-momentum updates of a small lucidrains / tutorial (ConvNeXt) U-Net."""
    from ms_diffusion.models import Unet
    env = os.environ.get(kernels.ENV)
    os.environ[kernels.ENV] = "1" if use_kernels else "0"
    try:
        ms.set_seed(0)
        net = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_dim_head=8, attn_heads=2, block_type=block_type)
    finally:
        if env is None:
            os.environ.pop(kernels.ENV)
        else:
            os.environ[kernels.ENV] = env
    layers = [c for _, c in net.cells_and_names() if isinstance(c, (Conv2d, GroupNorm, LinearAttention))]
    assert {type(c) for c in layers} == ({Conv2d, GroupNorm, LinearAttention} if block_type == "convnext"
                                         else {Conv2d, LinearAttention})
    assert all(c.use_kernel == use_kernels for c in layers)
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((4, 1, 16, 16)).astype(np.float32))
    t = Tensor(rng.integers(0, 1000, 4).astype(np.int32))
    target = Tensor(rng.standard_normal((4, 1, 16, 16)).astype(np.float32))

    def loss_fn(x, t, target):
        return ((net(x, t) - target) ** 2).mean()

    step = TrainStep(loss_fn, nn.Momentum(net.trainable_params(), learning_rate=0.05, momentum=0.9))
    losses = [float(step(x, t, target)[0].asnumpy()) for _ in range(steps)]
    return losses, {p.name: p.asnumpy().copy() for p in net.trainable_params()}


@pytest.mark.parametrize("block_type", ["resnet", "convnext"])
def test_a_train_step_with_kernels_equals_the_builtin_ops(block_type):
    (loss_on, w_on), (loss_off, w_off) = _tiny_unet_step(True, block_type), _tiny_unet_step(False, block_type)
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-5)
    assert w_on.keys() == w_off.keys()
    worst = max(_rel(w_on[k], w_off[k]) for k in w_on)
    assert worst < 1e-5, worst


class _ConvNormAttention(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = conv2d(4, 8, 3)
        self.norm = GroupNorm(2, 8)
        self.attn = LinearAttention(8, heads=2, dim_head=4)

    def construct(self, x):
        return self.attn(self.norm(self.conv(x)))


def _conv_norm_attention(use_kernels: bool, monkeypatch) -> nn.Cell:
    monkeypatch.setenv(kernels.ENV, "1" if use_kernels else "0")
    ms.set_seed(0)
    net = _ConvNormAttention()
    monkeypatch.delenv(kernels.ENV)
    return net


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_kernels_inside_mixed_precision_cells(mode, monkeypatch):
    """``to_float`` casts the floating-point tensors inside a cell, the kernels' settings included: a float64
    settings tensor arrived as float32 and the GroupNorm kernel died with SIGFPE (amp O2's float32 norms,
    Stable Diffusion's fp16). Settings are int64 now; a cell under ``to_float(float32)`` and amp O2's float32
    norms inside a float16 network run our kernels and match the built-in ops."""
    from ms_diffusion.training import apply_amp
    x = Tensor(np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32))
    outputs = {}
    for use_kernels in (True, False):
        fp32, o2 = _conv_norm_attention(use_kernels, monkeypatch), _conv_norm_attention(use_kernels, monkeypatch)
        fp32.to_float(ms.float32)
        apply_amp(o2, "O2", "float16")
        assert fp32.norm.use_kernel == fp32.attn.use_kernel == fp32.conv.use_kernel == use_kernels
        assert o2.norm.use_kernel == use_kernels and not o2.conv.use_kernel and not o2.attn.use_kernel
        run = [ms.jit(n) if mode == "graph" else n for n in (fp32, o2)]
        outputs[use_kernels] = [f(x).astype(ms.float32).asnumpy() for f in run]
    (fp32_on, o2_on), (fp32_off, o2_off) = outputs[True], outputs[False]
    assert _rel(fp32_on, fp32_off) < 1e-5
    assert np.isfinite(o2_on).all() and _rel(o2_on, o2_off) < 1e-2   # float16 rounding after the norms
    assert _rel(o2_on, fp32_on) < 1e-2


def test_conv2d_layer_keeps_nn_conv2d_names_and_falls_back_for_float16(monkeypatch):
    layer = conv2d(4, 8, 3)
    assert isinstance(layer, nn.Conv2d) and layer.use_kernel
    assert sorted(p.name for p in layer.get_parameters()) == ["bias", "weight"]
    x = Tensor(np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32))
    ref = ops.conv2d(x, layer.weight, layer.bias, pad_mode="pad", padding=1)
    assert _rel(layer(x).asnumpy(), ref.asnumpy()) < 1e-5
    layer16 = conv2d(4, 8, 3).to_float(ms.float16)     # mixed precision: float16 inputs, built-in op
    out = layer16(x)
    assert out.dtype == ms.float16 and not layer16.use_kernel
    assert layer16.to_float(ms.float32).use_kernel
    layer16.to_float(ms.float16)
    ref16 = ops.conv2d(x.astype(ms.float16), layer16.weight.astype(ms.float16), pad_mode="pad", padding=1)
    np.testing.assert_allclose(out.asnumpy(), (ref16 + layer16.bias.astype(ms.float16).reshape(1, -1, 1, 1)).asnumpy(),
                               rtol=1e-2, atol=1e-2)

    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.enabled() and not conv2d(4, 8, 3).use_kernel


def test_a_failed_build_falls_back_with_one_notice(tmp_path):
    """No compiler output usable (CXX=false) in an empty cache: a notice, then the built-in ops."""
    code = ("import ms_diffusion, numpy as np, mindspore as ms\n"
            "from mindspore import Tensor\n"
            "from ms_diffusion import kernels\n"
            "from ms_diffusion.nn.layers import conv2d\n"
            "a, b = conv2d(2, 3, 3), conv2d(3, 2, 1)\n"
            "assert not a.use_kernel and not b.use_kernel\n"
            "y = b(a(Tensor(np.ones((1, 2, 5, 5), np.float32))))\n"
            "print('shape', y.shape, kernels.disabled_reason().splitlines()[0])\n")
    env = dict(os.environ, CXX="false", MS_DIFFUSION_KERNEL_CACHE=str(tmp_path / "cache"), GLOG_v="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shape (1, 2, 5, 5) compiling msd_kernels.cc failed" in proc.stdout
    notices = [line for line in proc.stderr.splitlines() if "CPU kernels off" in line]
    assert len(notices) == 1, proc.stderr[-2000:]
    assert not list((tmp_path / "cache").rglob("*.so")), "a failed build left a library file behind"

    env = dict(os.environ, MS_DIFFUSION_DNNL_INCLUDE=str(tmp_path), MS_DIFFUSION_KERNEL_CACHE=str(tmp_path / "c2"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0 and "oneDNN 3.x headers were not found" in proc.stderr, proc.stderr[-2000:]


def test_parallel_builds_share_one_library(tmp_path):
    """Two processes building into an empty cache at once: one compiles, both load the same file."""
    code = ("import ms_diffusion\n"
            "from ms_diffusion.kernels.build import build_library\n"
            "print(build_library())\n")
    env = dict(os.environ, MS_DIFFUSION_KERNEL_CACHE=str(tmp_path), GLOG_v="3")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    libs = list(tmp_path.rglob("*.so"))
    assert [str(p) for p in libs] == list(paths), libs       # no temporary files left
    key = kbuild.build_key(kbuild._compiler(), kbuild.dnnl_include(), kbuild.mindspore_dnnl())
    assert libs[0].parent.name == key
