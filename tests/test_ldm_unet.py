"""ldm UNetModel and SpatialTransformer: conditioning paths, ldm's parameter tree, attention head
ordering against a numpy reference, the time embedding formula, and graph = PyNative."""
import math

import mindspore as ms
import numpy as np
import pytest

from ms_diffusion.models.unet_ldm import AttentionBlock, UNetModel
from ms_diffusion.nn.transformer import CrossAttention, SpatialTransformer

RNG = np.random.default_rng(0)


def _t(*shape, scale=1.0):
    return ms.Tensor((RNG.standard_normal(shape) * scale).astype(np.float32))


def _perturb(cell, scale=0.05):
    """Replace zero-initialised weights so every path contributes to the output."""
    for p in cell.get_parameters():
        p.set_data(ms.Tensor(p.asnumpy() + scale * RNG.standard_normal(p.shape).astype(np.float32)))


def _unet(**kw):
    base = dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2)
    base.update(kw)
    return UNetModel(**base)


def test_spatial_transformer_with_and_without_context():
    st = SpatialTransformer(32, n_heads=2, d_head=8, depth=2, context_dim=12)
    x = _t(2, 32, 4, 6)
    ctx = _t(2, 5, 12)
    # proj_out starts at zero: the block is the identity
    np.testing.assert_array_equal(st(x, ctx).asnumpy(), x.asnumpy())
    _perturb(st)
    out = st(x, ctx).asnumpy()
    assert out.shape == (2, 32, 4, 6)
    assert not np.allclose(out, st(x, _t(2, 5, 12)).asnumpy())     # the context matters
    assert not np.allclose(out[:1], st(x[:1], ctx[1:]).asnumpy())   # per-sample context
    with pytest.raises(ValueError, match="12-dim context"):
        st(x)

    # no context_dim: the cross-attention attends to the pixels themselves (ldm's fallback)
    self_st = SpatialTransformer(32, n_heads=2, d_head=16, context_dim=None, use_linear=True)
    _perturb(self_st)
    y = self_st(x).asnumpy()
    assert y.shape == (2, 32, 4, 6) and np.isfinite(y).all()
    block = self_st.transformer_blocks[0]
    h = block.norm2(ms.Tensor(np.ones((2, 24, 32), np.float32)))
    np.testing.assert_allclose(block.attn2(h).asnumpy(), block.attn2(h, h).asnumpy(), rtol=1e-6)
    names = [n for n, _ in st.parameters_and_names()]
    for expected in ("norm.gamma", "proj_in.weight", "transformer_blocks.1.attn2.to_k.weight",
                     "transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.0.ff.net.2.bias",
                     "transformer_blocks.0.attn1.to_out.0.weight", "transformer_blocks.0.norm3.beta",
                     "proj_out.weight"):
        assert expected in names, expected
    assert dict(st.parameters_and_names())["transformer_blocks.1.attn2.to_k.weight"].shape == (16, 12)


def _np_attention(q, k, v, scale):
    sim = np.einsum("bhnd,bhmd->bhnm", q, k) * scale
    sim = np.exp(sim - sim.max(-1, keepdims=True))
    return np.einsum("bhnm,bhmd->bhnd", sim / sim.sum(-1, keepdims=True), v)


def test_cross_attention_matches_numpy():
    attn = CrossAttention(8, context_dim=6, heads=2, dim_head=4)
    x, ctx = _t(2, 5, 8), _t(2, 3, 6)
    wq, wk, wv = (getattr(attn, n).weight.asnumpy() for n in ("to_q", "to_k", "to_v"))
    q = (x.asnumpy() @ wq.T).reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)
    k = (ctx.asnumpy() @ wk.T).reshape(2, 3, 2, 4).transpose(0, 2, 1, 3)
    v = (ctx.asnumpy() @ wv.T).reshape(2, 3, 2, 4).transpose(0, 2, 1, 3)
    o = _np_attention(q, k, v, 0.5).transpose(0, 2, 1, 3).reshape(2, 5, 8)
    out_w, out_b = attn.to_out[0].weight.asnumpy(), attn.to_out[0].bias.asnumpy()
    np.testing.assert_allclose(attn(x, ctx).asnumpy(), o @ out_w.T + out_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_head_ordering(new_order):
    c, heads, hw = 32, 4, (3, 4)
    blk = AttentionBlock(c, num_heads=heads, use_new_attention_order=new_order)
    _perturb(blk, 0.2)
    x = _t(2, c, *hw)
    normed = blk.norm(x).asnumpy().reshape(2, c, -1)
    qkv = np.einsum("oc,bcn->bon", blk.qkv.weight.asnumpy()[:, :, 0, 0], normed) + blk.qkv.bias.asnumpy()[:, None]
    d, n = c // heads, hw[0] * hw[1]
    if new_order:   # q, k, v blocks first, then heads
        q, k, v = (qkv[:, i * c:(i + 1) * c].reshape(2, heads, d, n) for i in range(3))
    else:           # heads first, each holding its own q, k, v
        per_head = qkv.reshape(2, heads, 3 * d, n)
        q, k, v = per_head[:, :, :d], per_head[:, :, d:2 * d], per_head[:, :, 2 * d:]
    a = _np_attention(q.transpose(0, 1, 3, 2), k.transpose(0, 1, 3, 2), v.transpose(0, 1, 3, 2), d ** -0.5)
    a = a.transpose(0, 1, 3, 2).reshape(2, c, n)
    proj = np.einsum("oc,bcn->bon", blk.proj_out.weight.asnumpy()[:, :, 0, 0], a) + blk.proj_out.bias.asnumpy()[:, None]
    want = x.asnumpy() + proj.reshape(2, c, *hw)
    np.testing.assert_allclose(blk(x).asnumpy(), want, rtol=1e-4, atol=1e-5)


def test_time_embedding_is_ldm_timestep_embedding():
    net = _unet()
    t = np.array([0, 7, 999], np.float32)
    half = 16
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float32) / half)
    args = t[:, None] * freqs[None]
    want = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    np.testing.assert_allclose(net.time_proj(ms.Tensor(t)).asnumpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["concat", "crossattn", "adm", "attention_block"])
def test_unet_conditioning_paths_shapes(path):
    b = 2
    t = ms.Tensor(np.array([1, 900], np.int32))
    if path == "concat":
        net = _unet(in_channels=6, resblock_updown=True, use_scale_shift_norm=True, conv_resample=False)
        out = net(ms.Tensor(np.concatenate([_t(b, 4, 8, 8).asnumpy(), _t(b, 2, 8, 8).asnumpy()], 1)), t)
    elif path == "crossattn":
        net = _unet(use_spatial_transformer=True, context_dim=16, transformer_depth=2, num_heads=-1,
                    num_head_channels=16, legacy=False)
        out = net(_t(b, 4, 8, 8), t, context=_t(b, 7, 16))
    elif path == "adm":
        net = _unet(num_classes=11, channel_mult=(1, 2, 2), attention_resolutions=(2, 4))
        out = net(_t(b, 4, 8, 8), t, y=ms.Tensor(np.array([0, 10], np.int32)))
        with pytest.raises(ValueError, match="class labels"):
            net(_t(b, 4, 8, 8), t)
    else:
        net = _unet(num_head_channels=16, num_heads=-1, use_new_attention_order=True)
        out = net(_t(b, 4, 8, 8), t)
    assert out.shape == (b, 4, 8, 8)
    np.testing.assert_array_equal(out.asnumpy(), 0.0)   # zero-initialised output conv, as ldm
    _perturb(net.out)
    assert np.isfinite(net(_t(b, 6 if path == "concat" else 4, 8, 8), t,
                           _t(b, 7, 16) if path == "crossattn" else None,
                           ms.Tensor(np.array([1, 2], np.int32)) if path == "adm" else None).asnumpy()).all()


def test_unet_ldm_parameter_tree():
    net = _unet(use_spatial_transformer=True, context_dim=16, num_classes=3)
    params = dict(net.parameters_and_names())
    assert len(params) == len({p.name for p in net.get_parameters()})     # unique global names too
    expected = {
        "time_embed.0.weight": (128, 32), "time_embed.2.bias": (128,), "label_emb.embedding_table": (3, 128),
        "input_blocks.0.0.weight": (32, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.gamma": (32,), "input_blocks.1.0.emb_layers.1.weight": (32, 128),
        "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        "input_blocks.2.0.op.weight": (32, 32, 3, 3),
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": (64, 16),
        "middle_block.1.proj_out.weight": (64, 64, 1, 1), "middle_block.2.out_layers.0.beta": (64,),
        "output_blocks.0.0.in_layers.2.weight": (64, 128, 3, 3),
        "output_blocks.1.2.conv.weight": (64, 64, 3, 3),
        "output_blocks.3.0.skip_connection.weight": (32, 64, 1, 1),
        "out.0.gamma": (32,), "out.2.weight": (4, 32, 3, 3),
    }
    for name, shape in expected.items():
        assert name in params and tuple(params[name].shape) == shape, name
    assert not any(n.startswith("output_blocks.3.1") for n in params)   # no attention at full resolution


def test_unet_errors():
    with pytest.raises(ValueError, match="context_dim"):
        _unet(use_spatial_transformer=True)
    with pytest.raises(ValueError, match="dims=2"):
        _unet(dims=3)
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        _unet(num_heads=-1)
    net = _unet()
    with pytest.raises(ValueError, match="not divisible by 2"):
        net.check_input_shape((1, 4, 7, 8))


def test_unet_graph_mode_equals_pynative():
    net = _unet(use_spatial_transformer=True, context_dim=16, num_classes=3, use_scale_shift_norm=True)
    _perturb(net, 0.02)
    x, ctx = _t(2, 4, 8, 8), _t(2, 3, 16)
    t = ms.Tensor(np.array([5, 600], np.int32))
    y = ms.Tensor(np.array([2, 0], np.int32))

    def fwd(x, t, ctx, y):
        return net(x, t, ctx, y)

    eager = fwd(x, t, ctx, y).asnumpy()
    graph = ms.jit(fwd)(x, t, ctx, y).asnumpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-4, atol=1e-5)


def test_attention_slicing_gives_the_same_result():
    """Queries in slices (both layouts, a per-query bias, a ragged last slice) = all at once, in PyNative and in a
    compiled graph; set_attention_slicing reaches every attention layer of a network."""
    from ms_diffusion.nn.attention import attention, set_attention_slicing

    q, k, v = _t(2, 3, 50, 8), _t(2, 3, 40, 8), _t(2, 3, 40, 8)
    bias = _t(2, 1, 50, 40)
    whole = attention(q, k, v, 0.3, bias=bias).asnumpy()
    for size in (7, 16, 64):
        np.testing.assert_allclose(attention(q, k, v, 0.3, bias=bias, slice_size=size).asnumpy(), whole,
                                   rtol=0, atol=1e-6)
    qc, kc, vc = (a.swapaxes(-1, -2) for a in (q, k, v))
    whole_cf = attention(qc, kc, vc, 0.3, channels_first=True).asnumpy()
    np.testing.assert_allclose(attention(qc, kc, vc, 0.3, channels_first=True, slice_size=9).asnumpy(), whole_cf,
                               rtol=0, atol=1e-6)

    net = _unet(use_spatial_transformer=True, context_dim=16)
    _perturb(net, 0.02)
    x, ctx, t = _t(2, 4, 8, 8), _t(2, 3, 16), ms.Tensor(np.array([5, 600], np.int32))
    before = net(x, t, ctx).asnumpy()
    layers = [c for _, c in net.cells_and_names() if isinstance(c, CrossAttention)]
    assert set_attention_slicing(net, 5) == len(layers) > 0 and all(c.attention_slice == 5 for c in layers)
    np.testing.assert_allclose(net(x, t, ctx).asnumpy(), before, rtol=0, atol=1e-5)
    def fwd(a, b, c):
        return net(a, b, c)

    np.testing.assert_allclose(ms.jit(fwd)(x, t, ctx).asnumpy(), before, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="slice_size must be >= 0"):
        set_attention_slicing(net, -1)
