"""Attention: one dispatch function and the two lucidrains attention layers.

``attention(q, k, v, scale, use_flash)`` is the only place softmax attention is computed.
On Ascend with ``use_flash`` it calls the fused ``flash_attention_score`` kernel (fp16/bf16);
everywhere else (CPU, GPU, or flash not requested) a batched matmul + float32 softmax.

Memory: the matmul path holds the (B, H, N, M) scores twice (scores and softmax). ``slice_size`` computes
them for that many queries at a time (the result is the same: every query row is independent);
``set_attention_slicing(cell, n)`` sets it on every attention layer inside a network.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_diffusion.kernels.attention import LinearAttentionOp
from ms_diffusion.nn.layers import KernelSwitch, cast_like, conv2d, to_float32
from ms_diffusion.nn.norms import ChannelLayerNorm, GroupNorm, RMSNorm

__all__ = ["attention", "flash_attention_available", "split_heads", "set_attention_slicing", "Attention",
           "LinearAttention", "make_channel_norm"]


def flash_attention_available(head_dim: int) -> bool:
    """True when the Ascend fused kernel can run attention with this head size here."""
    try:
        device = ms.get_context("device_target")
    except Exception:
        return False
    return device == "Ascend" and head_dim % 16 == 0 and head_dim <= 256


_BMM_T_A = ops.BatchMatMul(transpose_a=True)
_BMM_T_B = ops.BatchMatMul(transpose_b=True)


def set_attention_slicing(network: nn.Cell, slice_size: int = 0) -> int:
    """Compute every softmax attention inside ``network`` for ``slice_size`` queries at a time (0: all at
    once). Set it before the first call of a compiled (graph mode) network. Returns the layers changed."""
    if slice_size < 0:
        raise ValueError(f"slice_size must be >= 0 (0: no slicing), got {slice_size}")
    changed = 0
    for _, cell in network.cells_and_names():
        if hasattr(cell, "attention_slice"):
            cell.attention_slice = int(slice_size)
            changed += 1
    return changed


def attention(q, k, v, scale: float, use_flash: bool = False, channels_first: bool = False, bias=None,
              slice_size: int = 0):
    """softmax(q k^T * scale + bias) v over the last-but-one (token) axis.

    ``channels_first=False``: q (B, H, N, D), k/v (B, H, M, D) -> (B, H, N, D).
    ``channels_first=True``:  q (B, H, D, N), k/v (B, H, D, M) -> (B, H, D, N), the layout a 1x1
    convolution produces; no transposes are made on the matmul path (transpose flags instead).
    ``bias``: float32, broadcastable to (B, H, N, M), added to the scaled scores (a causal or padding
    mask as large negative numbers); attention with a bias always takes the matmul path.
    ``slice_size`` > 0: the matmul path for that many queries at a time (same result, less memory).
    """
    n = q.shape[-1] if channels_first else q.shape[-2]
    if use_flash and bias is None:
        if channels_first:
            q, k, v = q.swapaxes(-1, -2), k.swapaxes(-1, -2), v.swapaxes(-1, -2)
        head_num = q.shape[1]
        dtype = q.dtype if q.dtype in (ms.float16, ms.bfloat16) else ms.float16
        out = ops.flash_attention_score(q.astype(dtype), k.astype(dtype), v.astype(dtype), head_num,
                                        scalar_value=scale, input_layout="BNSD")
        out = cast_like(out, q)
        return out.swapaxes(-1, -2) if channels_first else out
    if not slice_size or n <= slice_size:
        return _matmul_attention(q, k, v, scale, channels_first, bias)
    outs = []
    for i in range(0, n, slice_size):
        j = min(i + slice_size, n)
        part_bias = bias if bias is None or bias.shape[-2] == 1 else bias[..., i:j, :]
        part = q[..., i:j] if channels_first else q[..., i:j, :]
        if outs:
            # one slice after the other: a compiled graph would otherwise run the independent slices at once,
            # holding all their scores together
            part = ops.depend(part, outs[-1])
        outs.append(_matmul_attention(part, k, v, scale, channels_first, part_bias))
    return ops.cat(outs, axis=-1 if channels_first else -2)


def _matmul_attention(q, k, v, scale: float, channels_first: bool, bias):
    """``attention``'s batched matmul + float32 softmax path (layouts as there)."""
    if channels_first:
        sim = to_float32(_BMM_T_A(q, k)) * scale               # (B, H, N, M)
        if bias is not None:
            sim = sim + bias
        attn = cast_like(ops.softmax(sim, axis=-1), v)
        return _BMM_T_B(v, attn)                               # (B, H, D, N)
    sim = to_float32(_BMM_T_B(q, k)) * scale
    if bias is not None:
        sim = sim + bias
    attn = cast_like(ops.softmax(sim, axis=-1), v)
    return ops.matmul(attn, v)


def make_channel_norm(kind: Optional[str], dim: int) -> nn.Cell:
    """``"rms"`` RMSNorm, ``"group"`` GroupNorm(1, dim), ``"layer"`` channel LayerNorm, None: no norm."""
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "group":
        return GroupNorm(1, dim)
    if kind == "layer":
        return ChannelLayerNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; choose rms, group or layer")


def split_heads(qkv, heads: int, dim_head: int, mem=None):
    """(B, 3*H*D, h, w) from a qkv projection -> q, k, v of shape (B, H, D, N) (N = h*w).

    ``mem``: learned memory key/values (2, H, D, M), prepended to k and v (-> (B, H, D, M + N)).
    Split with ``chunk``, not ``qkv[:, i]``: strided slicing is several times slower on MindSpore CPU.
    """
    b, n = qkv.shape[0], qkv.shape[2] * qkv.shape[3]
    q, k, v = ops.chunk(qkv, 3, axis=1)
    q = q.reshape(b, heads, dim_head, n)
    k = k.reshape(b, heads, dim_head, n)
    v = v.reshape(b, heads, dim_head, n)
    if mem is not None:
        shape = (b, heads, dim_head, mem.shape[-1])
        k = ops.cat((ops.broadcast_to(mem[0][None], shape), k), axis=-1)
        v = ops.cat((ops.broadcast_to(mem[1][None], shape), v), axis=-1)
    return q, k, v


class Attention(nn.Cell):
    """Multi-head self-attention over the pixels, with learned memory key/values.

    (B, C, H, W) -> (B, C, H, W); the caller adds the residual. ``norm`` is applied to the input
    ("rms": lucidrains; "group": the MindSpore tutorial's PreNorm). ``num_mem_kv=0`` disables
    the memory slots (tutorial).
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4,
                 flash: bool = False, norm: str = "rms"):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        hidden = dim_head * heads
        self.norm = make_channel_norm(norm, dim)
        self.num_mem_kv = num_mem_kv
        if num_mem_kv > 0:
            self.mem_kv = Parameter(Tensor(np.random.randn(2, heads, num_mem_kv, dim_head).astype(np.float32)),
                                    name="mem_kv")
        self.to_qkv = conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = conv2d(hidden, dim, 1)
        self.use_flash = bool(flash) and flash_attention_available(dim_head)
        self.attention_slice = 0

    def construct(self, x):
        b, _, h, w = x.shape
        mem = None
        if self.num_mem_kv > 0:
            mem = cast_like(self.mem_kv, x).swapaxes(-1, -2)  # lucidrains keeps (2, heads, m, d)
        q, k, v = split_heads(self.to_qkv(self.norm(x)), self.heads, self.dim_head, mem)
        out = attention(q, k, v, self.scale, self.use_flash, channels_first=True, slice_size=self.attention_slice)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class LinearAttention(KernelSwitch, nn.Cell):
    """Linear attention (Shen et al.): softmax over features for q, over positions for k.

    (B, C, H, W) -> (B, C, H, W); the caller adds the residual. lucidrains form by default;
    the MindSpore tutorial's form is ``norm="group", num_mem_kv=0, out_norm="layer",
    scale_v_by_positions=True``.

    On CPU the part between the two projections is one kernel of ours, forward and backward
    (``ms_diffusion.kernels.attention``; see ``KernelSwitch``).
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4,
                 norm: str = "rms", out_norm: str = "rms", scale_v_by_positions: bool = False):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        hidden = dim_head * heads
        self.norm = make_channel_norm(norm, dim)
        self.num_mem_kv = num_mem_kv
        if num_mem_kv > 0:
            self.mem_kv = Parameter(Tensor(np.random.randn(2, heads, dim_head, num_mem_kv).astype(np.float32)),
                                    name="mem_kv")
        self.to_qkv = conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.SequentialCell([conv2d(hidden, dim, 1), make_channel_norm(out_norm, dim)])
        self.scale_v_by_positions = scale_v_by_positions
        if self._init_kernel():
            op = LinearAttentionOp(heads, self.scale, scale_v_by_positions, memory=num_mem_kv > 0)
            self.kernel_op, self.kernel_spec = op.prim, op.spec

    def construct(self, x):
        b, _, h, w = x.shape
        n = h * w
        if self.use_kernel and x.dtype == ms.float32:
            qkv = self.to_qkv(self.norm(x))
            if self.num_mem_kv > 0:
                return self.to_out(self.kernel_op(qkv, self.mem_kv, self.kernel_spec))
            return self.to_out(self.kernel_op(qkv, self.kernel_spec))
        mem = None
        if self.num_mem_kv > 0:
            mem = cast_like(self.mem_kv, x)                    # (2, heads, d, m)
        q, k, v = split_heads(self.to_qkv(self.norm(x)), self.heads, self.dim_head, mem)
        # softmax over the feature axis, taken on the last axis: MindSpore CPU's softmax (and its
        # gradient) over a middle axis is ~2x slower than transposing there and back
        q = cast_like(ops.softmax(to_float32(q).swapaxes(-1, -2), axis=-1), x).swapaxes(-1, -2) * self.scale
        k = cast_like(ops.softmax(to_float32(k), axis=-1), x)
        if self.scale_v_by_positions:
            v = v / n
        context = _BMM_T_B(k, v)                               # (b, heads, d, e)
        out = _BMM_T_A(context, q)                             # (b, heads, e, n)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))
