"""ldm's transformer layers for images: cross-attention, GEGLU feed-forward, SpatialTransformer.

Parameter paths follow ldm (``ldm/modules/attention.py``) so checkpoints map one to one:
``attn1.to_q.weight``, ``attn2.to_out.0.weight``, ``ff.net.0.proj.weight``, ``ff.net.2.weight``,
``norm1.gamma`` (torch: ``norm1.weight``), ``proj_in.weight``, ``proj_out.weight``. Attention runs
through the shared dispatch ``ms_diffusion.nn.attention.attention``.
"""
from __future__ import annotations

from typing import Optional

from mindspore import nn, ops

from ms_diffusion.nn.attention import attention, flash_attention_available
from ms_diffusion.nn.layers import GELU, Identity, SwapAxes12, conv2d, dense
from ms_diffusion.nn.norms import GroupNorm

__all__ = ["CrossAttention", "GEGLU", "FeedForward", "BasicTransformerBlock", "SpatialTransformer", "zero_init"]


def zero_init(cell: nn.Cell) -> nn.Cell:
    """Set every parameter of ``cell`` to zero (ldm ``zero_module``) and return it."""
    for p in cell.get_parameters():
        p.set_data(ops.zeros(p.shape, p.dtype))
    return cell


def _dropout(p: float) -> nn.Cell:
    return nn.Dropout(p=p) if p > 0 else Identity()


class CrossAttention(nn.Cell):
    """Multi-head attention of tokens x (B, N, query_dim) over context (B, M, context_dim) -> (B, N, query_dim).

    ``context=None`` attends to x itself (then ``context_dim`` must be None or equal ``query_dim``).
    No biases on q/k/v, a biased output projection, as ldm.
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, flash: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.query_dim = query_dim
        self.context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.to_q = dense(query_dim, inner, bias=False)
        self.to_k = dense(self.context_dim, inner, bias=False)
        self.to_v = dense(self.context_dim, inner, bias=False)
        self.to_out = nn.SequentialCell([dense(inner, query_dim), _dropout(dropout)])
        self.use_flash = bool(flash) and flash_attention_available(dim_head)
        self.attention_slice = 0          # queries per softmax (0: all); see nn.attention.set_attention_slicing
        self.swap = SwapAxes12()

    def _heads(self, t):
        b, n, _ = t.shape
        return self.swap(t.reshape(b, n, self.heads, self.dim_head))     # (b, heads, n, d)

    def construct(self, x, context=None):
        if context is None:
            if self.context_dim != self.query_dim:
                raise ValueError(f"CrossAttention was built for a {self.context_dim}-dim context but got none; "
                                 f"self-attention fallback needs context_dim == query_dim ({self.query_dim})")
            context = x
        q = self._heads(self.to_q(x))
        k = self._heads(self.to_k(context))
        v = self._heads(self.to_v(context))
        out = attention(q, k, v, self.scale, self.use_flash, slice_size=self.attention_slice)   # (b, heads, n, d)
        b, _, n, _ = out.shape
        return self.to_out(self.swap(out).reshape(b, n, self.heads * self.dim_head))


class GEGLU(nn.Cell):
    """x W -> (a, gate) -> a * gelu(gate) (exact erf GELU). (..., dim_in) -> (..., dim_out)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = dense(dim_in, dim_out * 2)
        self.gelu = GELU()

    def construct(self, x):
        a, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return a * self.gelu(gate)


class FeedForward(nn.Cell):
    """(..., dim) -> (..., dim_out): GEGLU (``glu=True``) or Linear + GELU, dropout, Linear."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        project_in = GEGLU(dim, inner) if glu else nn.SequentialCell([dense(dim, inner), GELU()])
        self.net = nn.SequentialCell([project_in, _dropout(dropout), dense(inner, dim_out or dim)])

    def construct(self, x):
        return self.net(x)


def _layer_norm(dim: int) -> nn.LayerNorm:
    # torch.nn.LayerNorm's eps; MindSpore's default is 1e-7
    return nn.LayerNorm((dim,), epsilon=1e-5)


class BasicTransformerBlock(nn.Cell):
    """Pre-norm self-attention, cross-attention and gated feed-forward, each residual. (B, N, dim) -> same."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: Optional[int] = None, gated_ff: bool = True, flash: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout, flash=flash)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    flash=flash)
        self.norm1 = _layer_norm(dim)
        self.norm2 = _layer_norm(dim)
        self.norm3 = _layer_norm(dim)

    def construct(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    """Transformer over the pixels of a feature map, conditioned on a token context.

    x (B, C, H, W), context (B, M, context_dim) or None (cross-attention then attends to the
    pixels themselves) -> (B, C, H, W). GroupNorm(32, eps 1e-6) -> proj_in (1x1 conv, or a linear
    layer with ``use_linear=True`` as Stable Diffusion 2) -> ``depth`` blocks -> zero-initialised
    proj_out, plus the input.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Optional[int] = None, use_linear: bool = False, num_groups: int = 32,
                 flash: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"SpatialTransformer depth must be >= 1, got {depth}")
        inner = n_heads * d_head
        self.in_channels = in_channels
        self.inner_dim = inner
        self.use_linear = bool(use_linear)
        self.norm = GroupNorm(num_groups, in_channels, eps=1e-6)
        self.proj_in = dense(in_channels, inner) if use_linear else conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner, n_heads, d_head, dropout=dropout, context_dim=context_dim, flash=flash)
            for _ in range(depth)])
        proj_out = dense(inner, in_channels) if use_linear else conv2d(inner, in_channels, 1)
        self.proj_out = zero_init(proj_out)
        self.swap = SwapAxes12()

    def construct(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if self.use_linear:
            x = self.proj_in(self.swap(x.reshape(b, c, h * w)))
        else:
            x = self.swap(self.proj_in(x).reshape(b, self.inner_dim, h * w))
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.swap(self.proj_out(x)).reshape(b, c, h, w)
        else:
            x = self.proj_out(self.swap(x).reshape(b, self.inner_dim, h, w))
        return x + x_in
