"""CLIP's text transformer as an ``nn.Cell``: the text encoder of Stable Diffusion 1.x and 2.x.

One network, two published layouts:

* SD 1.x: OpenAI CLIP ViT-L/14's text tower as ``transformers.CLIPTextModel`` (12 layers, width 768,
  quick-GELU), its last layer's output after the final LayerNorm;
* SD 2.x: OpenCLIP ViT-H/14's text tower (24 layers, width 1024, exact GELU), the *penultimate*
  layer's output after the final LayerNorm (``skip_last_layers=1``; diffusers' converted SD 2.x
  text encoders instead store 23 layers and use the last).

Parameter paths follow ``transformers`` (``embeddings.token_embedding``, ``encoder.layers.{i}.self_attn``,
``mlp.fc1``, ``final_layer_norm``) except that q, k and v are one fused ``self_attn.qkv`` projection
(one matmul; OpenCLIP stores it fused too). ``ms_diffusion.interop.clip`` converts both layouts.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ms_diffusion.nn.attention import attention
from ms_diffusion.nn.layers import GELU, dense

__all__ = ["CLIPTextModel", "CLIPTextEmbedder", "CLIPEncoderLayer", "CLIPAttention", "QuickGELU", "SD1_TEXT_ENCODER", "SD2_TEXT_ENCODER"]

#: the published text towers (constructor arguments)
SD1_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD2_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", skip_last_layers=1,
                        projection_dim=1024)

_MASKED = -1e9   # added to a masked score: exp underflows to exactly 0 in float32, and masks add without inf


class QuickGELU(nn.Cell):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def construct(self, x):
        return x * ops.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Cell:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return GELU()
    raise ValueError(f"hidden_act must be 'quick_gelu' (OpenAI CLIP, SD 1.x) or 'gelu' (OpenCLIP, SD 2.x), "
                     f"got {name!r}")


class CLIPAttention(nn.Cell):
    """Multi-head self-attention, biased fused q/k/v and output projections. (B, N, W) -> (B, N, W)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"hidden_size {width} is not divisible by num_attention_heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = dense(width, 3 * width)
        self.out_proj = dense(width, width)

    def construct(self, x, bias):
        b, n, w = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], self.head_dim ** -0.5, bias=bias)     # (B, H, N, D)
        return self.out_proj(out.swapaxes(1, 2).reshape(b, n, w))


class CLIPMLP(nn.Cell):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = dense(width, hidden)
        self.act = _activation(act)
        self.fc2 = dense(hidden, width)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm((width,), epsilon=eps)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm((width,), epsilon=eps)
        self.mlp = CLIPMLP(width, hidden, act)

    def construct(self, x, bias):
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, vocab_size: int, width: int, max_positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)

    def construct(self, input_ids):
        positions = ops.arange(input_ids.shape[1], dtype=ms.int32)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPEncoder(nn.Cell):
    """The stack of layers (``encoder.layers.{i}``); CLIPTextModel runs them itself (it stops early)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.CellList(layers)


class CLIPTextModel(nn.Cell):
    """CLIP text transformer. ``(input_ids (B, N) int, attention_mask (B, N) 0/1 or None)`` ->
    ``(hidden (B, N, hidden_size), pooled (B, hidden_size or projection_dim))``.

    ``hidden``: the output of layer ``num_hidden_layers - skip_last_layers`` after the final LayerNorm
    (what Stable Diffusion cross-attends to). ``pooled``: the final layer's normalised state at each
    row's first ``eos_token_id`` (OpenAI / OpenCLIP: the highest id), through ``text_projection`` when
    ``projection_dim`` is set (``CLIPTextModelWithProjection``'s ``text_embeds``); the layers after the
    ``hidden`` one run only when ``with_pooled`` is True (else ``pooled`` is None). Attention is causal;
    ``attention_mask`` (1 keep, 0 pad) also hides padding keys, as ``transformers`` does when given a mask.
    """

    def __init__(self, vocab_size: int = 49408, hidden_size: int = 512, intermediate_size: int = 2048,
                 num_hidden_layers: int = 12, num_attention_heads: int = 8, max_position_embeddings: int = 77,
                 hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5, eos_token_id: int = 49407,
                 projection_dim: Optional[int] = None, skip_last_layers: int = 0, with_pooled: bool = True):
        super().__init__()
        if not 0 <= skip_last_layers < num_hidden_layers:
            raise ValueError(f"skip_last_layers must be in [0, {num_hidden_layers}), got {skip_last_layers}")
        self.config = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                           max_position_embeddings=max_position_embeddings, hidden_act=hidden_act,
                           layer_norm_eps=layer_norm_eps, eos_token_id=eos_token_id, projection_dim=projection_dim,
                           skip_last_layers=skip_last_layers)
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.encoder = CLIPEncoder([CLIPEncoderLayer(hidden_size, num_attention_heads, intermediate_size, hidden_act,
                                                     layer_norm_eps) for _ in range(num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm((hidden_size,), epsilon=layer_norm_eps)
        self.text_projection = dense(hidden_size, projection_dim, bias=False) if projection_dim else None
        self.depth = num_hidden_layers - skip_last_layers
        self.with_pooled = with_pooled
        self.eos_token_id = eos_token_id
        self.max_positions = max_position_embeddings
        causal = np.triu(np.full((max_position_embeddings, max_position_embeddings), _MASKED, np.float32), 1)
        self.causal = Tensor(causal)

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    def construct(self, input_ids, attention_mask=None) -> Tuple[Tensor, Optional[Tensor]]:
        n = input_ids.shape[1]
        if n > self.max_positions:
            raise ValueError(f"CLIPTextModel: {n} tokens, more than max_position_embeddings "
                             f"({self.max_positions}); tokenize with max_length={self.max_positions}")
        bias = self.causal[:n, :n]
        if attention_mask is not None:
            bias = bias + (1.0 - attention_mask.astype(ms.float32))[:, None, None, :] * _MASKED
        x = self.embeddings(input_ids)
        hidden = x
        for i, layer in enumerate(self.encoder.layers):
            if i == self.depth:
                hidden = x
                if not self.with_pooled:
                    break
            x = layer(x, bias)
        if self.depth == len(self.encoder.layers):
            hidden = x
        hidden = self.final_layer_norm(hidden)
        if not self.with_pooled:
            return hidden, None
        last = hidden if self.depth == len(self.encoder.layers) else self.final_layer_norm(x)
        first_eos = ops.argmax((input_ids == self.eos_token_id).astype(ms.int32), dim=-1)     # (B,)
        pick = ops.one_hot(first_eos, n, Tensor(1.0, last.dtype), Tensor(0.0, last.dtype))     # (B, N)
        pooled = ops.matmul(pick[:, None, :], last).squeeze(1)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return hidden, pooled


class CLIPTextEmbedder(nn.Cell):
    """Token ids (B, N) int -> the cross-attention context (B, N, hidden_size): a latent diffusion's
    ``cond_stage_model`` (ldm's ``FrozenCLIPEmbedder`` / ``FrozenOpenCLIPEmbedder``).

    ``frozen`` (default): the encoder's parameters are not trained and it stays in evaluation mode; set
    False to train a (small) text transformer jointly, as ldm's text-to-image models from scratch did.
    """

    def __init__(self, encoder: CLIPTextModel, frozen: bool = True):
        super().__init__()
        encoder.with_pooled = False     # only the hidden states are a context; skip the layers past them
        self.transformer = encoder
        self.frozen = bool(frozen)
        self.context_dim = encoder.hidden_size
        if self.frozen:
            for p in encoder.get_parameters():
                p.requires_grad = False
            encoder.set_train(False)

    def set_train(self, mode: bool = True):
        super().set_train(mode)
        if self.frozen:
            self.transformer.set_train(False)
        return self

    def construct(self, input_ids):
        # [0], not `hidden, _ = ...`: the unused element would be an isolated node the graph compiler warns about
        return self.transformer(input_ids)[0]
