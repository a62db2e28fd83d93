import mindspore as ms
import numpy as np
import pytest

from ms_diffusion import Unet
from ms_diffusion.interop import (LUCIDRAINS_UNET_TO_MS, MS_TO_LUCIDRAINS_UNET, load_arrays_into, named_parameters,
                                  rename, state_arrays)


def _inputs(b, c, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = ms.Tensor(rng.standard_normal((b, c, h, w)).astype(np.float32))
    t = ms.Tensor(rng.integers(0, 1000, size=(b,)).astype(np.int32))
    return x, t


@pytest.mark.parametrize("kwargs,shape,out_c", [
    (dict(dim=8, dim_mults=(1, 2, 4), channels=1), (2, 1, 28, 28), 1),            # 28x28 with 3 levels
    (dict(dim=8, dim_mults=(1, 2, 2), channels=3), (2, 3, 16, 24), 3),            # non-square
    (dict(dim=8, dim_mults=(1, 2), channels=2, self_condition=True), (1, 2, 8, 8), 2),
    (dict(dim=8, dim_mults=(1, 2), channels=3, learned_variance=True), (2, 3, 8, 12), 6),
    (dict(dim=8, dim_mults=(1,), channels=1, out_dim=5), (3, 1, 6, 10), 5),       # one stage: any size
    (dict(dim=12, dim_mults=(1, 2, 4), channels=1, block_type="convnext"), (2, 1, 28, 28), 1),
    (dict(dim=8, dim_mults=(1, 2), channels=1, num_classes=10, random_fourier_features=True), (2, 1, 8, 8), 1),
])
def test_output_shapes(kwargs, shape, out_c):
    net = Unet(**kwargs)
    x, t = _inputs(*shape)
    extra = {}
    if kwargs.get("self_condition"):
        extra["x_self_cond"] = x
    if kwargs.get("num_classes"):
        extra["classes"] = ms.Tensor(np.array([3, 10], np.int32))
    out = net(x, t, **extra)
    assert out.shape == (shape[0], out_c) + shape[2:]
    assert np.isfinite(out.asnumpy()).all()


@pytest.mark.parametrize("block_type", ["resnet", "convnext"])
def test_graph_mode_equals_pynative(block_type):
    net = Unet(dim=8, dim_mults=(1, 2), channels=1, self_condition=True, block_type=block_type,
               full_attn=(True, True))
    x, t = _inputs(2, 1, 8, 8)

    def fwd(x, t, sc):
        return net(x, t, sc)

    eager = fwd(x, t, x * 0.5).asnumpy()
    graph = ms.jit(fwd)(x, t, x * 0.5).asnumpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-6, atol=1e-6)  # equal to the bit here; margin for fusion


def test_parameter_names_unique_and_stable():
    net = Unet(dim=8, dim_mults=(1, 2, 4), channels=1)
    names = [p.name for p in net.trainable_params()]
    assert len(names) == len(set(names))
    assert "downs.0.block1.block1.proj.weight" in names and "ups.2.upsample.weight" in names
    assert all(rename(rename(n, MS_TO_LUCIDRAINS_UNET), LUCIDRAINS_UNET_TO_MS) == n for n in names)


def test_tutorial_convnext_network():
    """block_type='convnext' is the MindSpore tutorial's U-Net: dim 28, mults (1, 2, 4) has 2,992,180 weights."""
    net = Unet(dim=28, dim_mults=(1, 2, 4), channels=1, block_type="convnext")
    assert sum(int(np.prod(p.shape)) for p in net.trainable_params()) == 2_992_180
    assert net.init_conv.in_channels == 1 and net.init_conv.out_channels == 18  # dim // 3 * 2
    assert len(net.downs) == 3 and len(net.ups) == 2


def test_input_errors():
    net = Unet(dim=8, dim_mults=(1, 2, 4), channels=1)
    x, t = _inputs(1, 1, 30, 30)
    with pytest.raises(ValueError, match="not divisible by 4"):
        net(x, t)
    x, t = _inputs(1, 3, 8, 8)
    with pytest.raises(ValueError, match="built for 1 channel"):
        net(x, t)
    with pytest.raises(ValueError, match="block_type"):
        Unet(dim=8, block_type="transformer")
    with pytest.raises(ValueError, match="full_attn has 2 entries"):
        Unet(dim=8, dim_mults=(1, 2, 4), full_attn=(True, False))


@pytest.mark.torch
@pytest.mark.parametrize("kwargs", [
    dict(dim=16, dim_mults=(1, 2, 4), channels=1),
    dict(dim=16, dim_mults=(1, 2), channels=3, self_condition=True, learned_variance=True, full_attn=(True, True)),
    dict(dim=8, dim_mults=(1, 2, 2), channels=1, attn_heads=2, attn_dim_head=8, learned_sinusoidal_cond=True),
])
def test_forward_parity_with_lucidrains(kwargs):
    import torch

    from tests.anchors import lucidrains
    L = lucidrains()
    torch.manual_seed(0)
    ref = L.Unet(**kwargs).eval()
    net = Unet(**kwargs)
    load_arrays_into(net, {k: v.numpy() for k, v in ref.state_dict().items()}, LUCIDRAINS_UNET_TO_MS)
    assert sum(v.numel() for v in ref.parameters()) == sum(int(np.prod(p.shape)) for p in net.get_parameters())
    x, t = _inputs(2, kwargs["channels"], 16, 16)
    sc = x * 0.3 if kwargs.get("self_condition") else None
    with torch.no_grad():
        expected = ref(torch.tensor(x.asnumpy()), torch.tensor(t.asnumpy()).long(),
                       None if sc is None else torch.tensor(sc.asnumpy())).numpy()
    got = net(x, t, sc).asnumpy()
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < 5e-6, rel  # README: ≤5e-6 (worst case here, full attention + learned variance: 3.5e-6)
    back = {rename(k, MS_TO_LUCIDRAINS_UNET): v for k, v in state_arrays(net).items()}
    assert set(back) == set(ref.state_dict())


@pytest.mark.torch
@pytest.mark.parametrize("kwargs", [
    dict(dim=8, dim_mults=(1, 2, 4), channels=1),                                  # full attention: last stage
    dict(dim=8, dim_mults=(1, 2, 2, 4), channels=3, full_attn=(False,) * 4),       # linear attention only
    dict(dim=8, dim_mults=(1, 2), channels=3, learned_variance=True, full_attn=(True, True)),
    dict(dim=16, dim_mults=(1,), channels=1),                                      # one stage: bare convs only
    dict(dim=8, init_dim=12, dim_mults=(1, 3, 2), channels=2, self_condition=True, learned_sinusoidal_cond=True,
         attn_heads=(1, 2, 2), attn_dim_head=(8, 8, 16), full_attn=(False, True, False)),
    dict(dim=8, dim_mults=(2, 4), channels=1, random_fourier_features=True, out_dim=5),
])
def test_lucidrains_name_maps_are_a_bijection(kwargs):
    """Every anchor key maps to one of our parameters (same shape) and back, every parameter of ours to an
    anchor key and back, no two names collide -- and the conversion plan uses the same table."""
    from ms_diffusion.interop.lucidrains import unet_plan
    from tests.anchors import lucidrains

    theirs = {k: tuple(v.shape) for k, v in lucidrains().Unet(**kwargs).state_dict().items()}
    net = Unet(**kwargs)
    ours = {k: tuple(p.shape) for k, p in named_parameters(net).items()}
    to_ms = {k: rename(k, LUCIDRAINS_UNET_TO_MS) for k in theirs}
    to_torch = {k: rename(k, MS_TO_LUCIDRAINS_UNET) for k in ours}
    assert len(set(to_ms.values())) == len(theirs) and len(set(to_torch.values())) == len(ours)   # injective
    assert set(to_ms.values()) == set(ours), sorted(set(to_ms.values()) ^ set(ours))[:5]            # onto
    assert set(to_torch.values()) == set(theirs), sorted(set(to_torch.values()) ^ set(theirs))[:5]
    assert all(to_torch[ms] == k for k, ms in to_ms.items())                                        # inverse
    assert all(ours[ms] == theirs[k] for k, ms in to_ms.items())
    assert {e.ms_name: e.torch_names for e in unet_plan(net).entries} == {k: (t,) for k, t in to_torch.items()}
