"""Parameter-name maps between PyTorch sources and ms_diffusion, as data: one table per source.

Nothing is written in both directions. A source's ``Spec`` holds its rules **ours -> PyTorch**:
ordered regex rules (the first rule that matches a name rewrites it) grouped in stages (each stage
applies its first matching rule to the output of the previous one). ``ms_diffusion.interop.plan``
walks one of our cells, maps each parameter through the ``Spec`` and inverts the result, so the
PyTorch -> ours direction and the missing / unexpected / shape checks come from the same table.
Where plain rename rules are wanted in both directions (``LUCIDRAINS_UNET_TO_MS`` for
``load_arrays_into``), they are compiled from one table of (our template, their template) pairs with
named placeholders (``downs.{i}.downsample.conv.`` <-> ``downs.{i}.3.1.``) by ``template_rules``,
which also checks that the table is a bijection. What a ``Spec`` holds:

* ``rules``: module paths (``downs.0.block1.`` -> ``downs.0.0.``);
* ``TORCH_LEAVES``: leaf names implied by a layer's type (GroupNorm ``gamma`` -> ``weight``,
  BatchNorm ``moving_mean`` -> ``running_mean`` with torch's ``num_batches_tracked`` dropped on
  purpose, ``nn.Embedding`` ``embedding_table`` -> ``weight``);
* ``layouts``: per layer type, parameters stored under other leaf names and/or shapes in that
  source (``transforms``): ldm's Conv1d attention projections, diffusers' Linear ones, diffusers'
  separate q/k/v for our fused ``qkv``.

Rule lists whose indices depend on the network (diffusers' block numbering) are generated from
the network by the ``*_rules`` functions below; they still return plain rule tables (ours -> PyTorch).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import List, Mapping, Sequence, Tuple, Type

from mindspore import nn

from ms_diffusion.io.state import Rule, rename, rename_staged
from ms_diffusion.interop.transforms import (CONV1D, FUSED_LINEAR, FUSED_QKV, FUSED_QKV_BIAS, IDENTITY, LINEAR,
                                             TRANSPOSED, Transform)
from ms_diffusion.models.unet_ldm import AttentionBlock
from ms_diffusion.nn.norms import GroupNorm
from ms_diffusion.text.clip import CLIPAttention, CLIPTextModel

Layout = Mapping[str, Tuple[Tuple[str, ...], Transform]]

__all__ = ["Rule", "LeafRule", "Spec", "rename", "rename_staged", "NamePair", "PLACEHOLDERS", "template_rules",
           "LUCIDRAINS_UNET_NAMES", "LUCIDRAINS_UNET_TO_MS", "MS_TO_LUCIDRAINS_UNET",
           "TORCH_LEAVES", "LUCIDRAINS_UNET", "LUCIDRAINS_SCHEDULE_BUFFERS", "LDM", "LDM_SCHEDULE_BUFFERS",
           "DIFFUSERS_VAE_LAYOUT", "DIFFUSERS_ATTENTION_LAYOUT", "DIFFUSERS_LEGACY_ATTENTION", "DIFFUSERS_RESNET",
           "diffusers_vae_rules", "diffusers_unet_rules", "TRANSFORMERS_CLIP_TEXT", "OPEN_CLIP_TEXT"]


@dataclass(frozen=True)
class LeafRule:
    """Leaf names of one kind of layer: ours -> PyTorch, and PyTorch leaves with no counterpart (dropped)."""

    cell_types: Tuple[Type[nn.Cell], ...]
    names: Mapping[str, str]
    dropped: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    """How one PyTorch source names the parameters of one of our networks (see the module docstring).

    ``aliases`` rewrite *source* names before matching (PyTorch -> PyTorch, e.g. diffusers' legacy
    attention names); the ms -> torch direction always writes the current names.
    """

    source: str
    rules: Tuple[Tuple[Rule, ...], ...] = ()
    layouts: Mapping[Type[nn.Cell], Layout] = field(default_factory=dict)
    leaves: Tuple[LeafRule, ...] = ()
    aliases: Tuple[Rule, ...] = ()


# ----------------------------------------------------------------------------- leaves by layer type

TORCH_LEAVES: Tuple[LeafRule, ...] = (
    LeafRule((GroupNorm, nn.GroupNorm, nn.LayerNorm), {"gamma": "weight", "beta": "bias"}),
    LeafRule((nn.BatchNorm1d, nn.BatchNorm2d),
             {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"},
             {"num_batches_tracked": "torch's BatchNorm update counter (used only with momentum=None; MindSpore "
                                     "BatchNorm has no counterpart)"}),
    LeafRule((nn.Embedding,), {"embedding_table": "weight"}),
)

# ----------------------------------------------------------------------------- name templates

NamePair = Tuple[str, str]

# what each ``{placeholder}`` of a template matches, and the values the table self-check tries
PLACEHOLDERS: Mapping[str, Tuple[str, Tuple[str, ...]]] = {
    "i": (r"\d+", ("0", "13")),
    "stage": (r"downs|ups", ("downs", "ups")),
}
_FIELD = re.compile(r"\{(\w+)\}")


def _fields(template: str) -> List[str]:
    names = _FIELD.findall(template)
    unknown = sorted(set(names) - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"name template {template!r}: unknown placeholder(s) {unknown}; known: {sorted(PLACEHOLDERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"name template {template!r} repeats a placeholder")
    return names


def _pattern(template: str) -> str:
    r"""``downs.{i}.3.`` -> ``^downs\.(?P<i>\d+)\.3\.`` (matches a name's prefix)."""
    parts, pos = ["^"], 0
    for m in _FIELD.finditer(template):
        parts += [re.escape(template[pos:m.start()]), f"(?P<{m.group(1)}>{PLACEHOLDERS[m.group(1)][0]})"]
        pos = m.end()
    return "".join(parts) + re.escape(template[pos:])


def _replacement(template: str) -> str:
    r"""``downs.{i}.downsample.`` -> ``downs.\g<i>.downsample.``."""
    return _FIELD.sub(lambda m: rf"\g<{m.group(1)}>", template.replace("\\", "\\\\"))


def _specificity(template: str) -> Tuple[int, int]:
    """Sort key: more segments first, then more literal text (``downs.{i}.3.1.`` before ``downs.{i}.3.``)."""
    return -template.count("."), -len(_FIELD.sub("", template))


def _fill(template: str, values: Mapping[str, str]) -> str:
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def template_rules(pairs: Sequence[NamePair]) -> Tuple[List[Rule], List[Rule]]:
    """(rules ours -> PyTorch, rules PyTorch -> ours) from one table of (our template, their template) pairs,
    so that both directions come from the same data.

    A template is a module-path prefix with named placeholders (``downs.{i}.downsample.conv.``, see
    ``PLACEHOLDERS``); both templates of a pair use the same ones. Rules are tried most specific template
    first (``_specificity``), whatever the table's order. ValueError unless no template appears twice and
    each pair, filled with the placeholders' example values, maps to its partner and back under the derived
    rules (no other template claims it). That the rules are a bijection on a real network's names is
    tested against the PyTorch networks (tests/test_unet.py).
    """
    for side in (0, 1):
        seen = [p[side] for p in pairs]
        twice = sorted({t for t in seen if seen.count(t) > 1})
        if twice:
            raise ValueError(f"name table: template(s) {twice} appear twice")
    for ours, theirs in pairs:
        if sorted(_fields(ours)) != sorted(_fields(theirs)):
            raise ValueError(f"name templates {ours!r} and {theirs!r} use different placeholders")

    def compiled(src: int) -> List[Rule]:
        ordered = sorted(pairs, key=lambda p: _specificity(p[src]))
        return [(_pattern(p[src]), _replacement(p[1 - src])) for p in ordered]

    forward, backward = compiled(0), compiled(1)
    for combination in itertools.product(*(examples for _, examples in PLACEHOLDERS.values())):
        values = dict(zip(PLACEHOLDERS, combination))
        for ours, theirs in pairs:
            a, b = _fill(ours, values) + "w", _fill(theirs, values) + "w"
            if rename(a, forward) != b or rename(b, backward) != a:
                raise ValueError(f"name table is ambiguous: {a!r} <-> {b!r} does not survive the derived rules "
                                 f"({a!r} -> {rename(a, forward)!r}, {b!r} -> {rename(b, backward)!r}); another "
                                 f"template matches it too")
    return forward, backward


# ----------------------------------------------------------------------------- lucidrains

# lucidrains keeps each U-Net stage as ModuleList([block1, block2, attn, down/upsample]); its
# Down/Upsample are Sequential(rearrange or upsample, conv), the last stage a bare conv.
# (our module-path prefix, lucidrains'); both rule lists are derived from this one table.
LUCIDRAINS_UNET_NAMES: Tuple[NamePair, ...] = (
    ("downs.{i}.downsample.conv.", "downs.{i}.3.1."),
    ("downs.{i}.downsample.", "downs.{i}.3."),
    ("ups.{i}.upsample.conv.", "ups.{i}.3.1."),
    ("ups.{i}.upsample.", "ups.{i}.3."),
    ("{stage}.{i}.block1.", "{stage}.{i}.0."),
    ("{stage}.{i}.block2.", "{stage}.{i}.1."),
    ("{stage}.{i}.attn.", "{stage}.{i}.2."),
)
MS_TO_LUCIDRAINS_UNET, LUCIDRAINS_UNET_TO_MS = template_rules(LUCIDRAINS_UNET_NAMES)

LUCIDRAINS_UNET = Spec("denoising-diffusion-pytorch Unet", rules=(tuple(MS_TO_LUCIDRAINS_UNET),),
                       leaves=TORCH_LEAVES)

# the schedule buffers ldm's DDPM.register_schedule and lucidrains' GaussianDiffusion both register
# (float32, in registration order); checked against ours, never copied
_SCHEDULE_BUFFERS: Tuple[str, ...] = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
LUCIDRAINS_SCHEDULE_BUFFERS: Tuple[str, ...] = _SCHEDULE_BUFFERS + ("loss_weight",)

# ----------------------------------------------------------------------------- ldm / Stable Diffusion

# Our ldm networks keep ldm's module paths; only types differ: GroupNorm/LayerNorm/Embedding leaves
# and AttentionBlock's Conv1d projections (ldm ``conv_nd(1, ...)``).
LDM = Spec("ldm", leaves=TORCH_LEAVES, layouts={
    AttentionBlock: {"qkv.weight": (("qkv.weight",), CONV1D), "proj_out.weight": (("proj_out.weight",), CONV1D)},
})

# ldm DDPM.register_schedule's persistent buffers (lvlb_weights is registered persistent=False)
LDM_SCHEDULE_BUFFERS: Tuple[str, ...] = _SCHEDULE_BUFFERS

# ----------------------------------------------------------------------------- diffusers

# diffusers' ``Attention`` in the VAE: GroupNorm ``group_norm``, Linear q/k/v/out; ours: 1x1 convs
DIFFUSERS_VAE_LAYOUT: Layout = {
    "norm.gamma": (("group_norm.weight",), IDENTITY), "norm.beta": (("group_norm.bias",), IDENTITY),
    "q.weight": (("to_q.weight",), LINEAR), "q.bias": (("to_q.bias",), IDENTITY),
    "k.weight": (("to_k.weight",), LINEAR), "k.bias": (("to_k.bias",), IDENTITY),
    "v.weight": (("to_v.weight",), LINEAR), "v.bias": (("to_v.bias",), IDENTITY),
    "proj_out.weight": (("to_out.0.weight",), LINEAR), "proj_out.bias": (("to_out.0.bias",), IDENTITY),
}

# diffusers' ``Attention`` in UNet2DModel's attention blocks <-> our AttentionBlock with
# use_new_attention_order=True (fused qkv rows [q; k; v], each split into heads)
DIFFUSERS_ATTENTION_LAYOUT: Layout = {
    "norm.gamma": (("group_norm.weight",), IDENTITY), "norm.beta": (("group_norm.bias",), IDENTITY),
    "qkv.weight": (("to_q.weight", "to_k.weight", "to_v.weight"), FUSED_QKV),
    "qkv.bias": (("to_q.bias", "to_k.bias", "to_v.bias"), FUSED_QKV_BIAS),
    "proj_out.weight": (("to_out.0.weight",), LINEAR), "proj_out.bias": (("to_out.0.bias",), IDENTITY),
}

# checkpoints written before diffusers 0.14 name the attention projections query/key/value/proj_attn
DIFFUSERS_LEGACY_ATTENTION: Tuple[Rule, ...] = (
    (r"\.query\.(weight|bias)$", r".to_q.\1"),
    (r"\.key\.(weight|bias)$", r".to_k.\1"),
    (r"\.value\.(weight|bias)$", r".to_v.\1"),
    (r"\.proj_attn\.(weight|bias)$", r".to_out.0.\1"),
)

# ldm ResBlock (ours) -> diffusers ResnetBlock2D
DIFFUSERS_RESNET: Tuple[Rule, ...] = (
    (r"(resnets\.\d+)\.in_layers\.0\.", r"\1.norm1."),
    (r"(resnets\.\d+)\.in_layers\.2\.", r"\1.conv1."),
    (r"(resnets\.\d+)\.emb_layers\.1\.", r"\1.time_emb_proj."),
    (r"(resnets\.\d+)\.out_layers\.0\.", r"\1.norm2."),
    (r"(resnets\.\d+)\.out_layers\.3\.", r"\1.conv2."),
    (r"(resnets\.\d+)\.skip_connection\.", r"\1.conv_shortcut."),
)


def diffusers_vae_rules(num_levels: int) -> Tuple[Tuple[Rule, ...], ...]:
    """ldm AutoencoderKL (ours) -> diffusers AutoencoderKL names, for ``num_levels`` = len(ch_mult).

    diffusers numbers the decoder's up blocks from the lowest resolution (ldm: ``up.{i}`` with 0 the
    full resolution), names the 1x1 shortcut ``conv_shortcut`` and the mid block ``mid_block``.
    """
    structure: List[Rule] = [
        (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
        (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    ]
    for level in range(num_levels):
        block = num_levels - 1 - level
        structure.append((rf"^decoder\.up\.{level}\.block\.(\d+)\.", rf"decoder.up_blocks.{block}.resnets.\1."))
        structure.append((rf"^decoder\.up\.{level}\.upsample\.", rf"decoder.up_blocks.{block}.upsamplers.0."))
    leaves: Tuple[Rule, ...] = ((r"\.nin_shortcut\.", r".conv_shortcut."),)
    return tuple(structure), leaves


def diffusers_unet_rules(input_blocks: Sequence[Sequence[str]], output_blocks: Sequence[Sequence[str]],
                         num_res_blocks: int) -> Tuple[Tuple[Rule, ...], ...]:
    """ldm UNetModel (ours) -> diffusers UNet2DModel / UNet2DConditionModel names.

    ``input_blocks`` / ``output_blocks`` list each block's layer kinds (``"res"``, ``"attn"``,
    ``"down"``, ``"up"``) as our UNetModel built them; ldm numbers blocks consecutively, diffusers
    by level (``down_blocks.{level}.resnets.{j}`` / ``attentions.{j}`` / ``downsamplers.0``).
    """
    rules: List[Rule] = [
        (r"^input_blocks\.0\.0\.", "conv_in."),
        (r"^time_embed\.0\.", "time_embedding.linear_1."),
        (r"^time_embed\.2\.", "time_embedding.linear_2."),
        (r"^label_emb\.", "class_embedding."),
        (r"^middle_block\.0\.", "mid_block.resnets.0."),
        (r"^middle_block\.1\.", "mid_block.attentions.0."),
        (r"^middle_block\.2\.", "mid_block.resnets.1."),
        (r"^out\.0\.", "conv_norm_out."),
        (r"^out\.2\.", "conv_out."),
    ]
    per_level = num_res_blocks + 1
    for k, kinds in enumerate(input_blocks):
        if k == 0:
            continue
        level, j = divmod(k - 1, per_level)
        for m, kind in enumerate(kinds):
            target = {"res": f"down_blocks.{level}.resnets.{j}.", "attn": f"down_blocks.{level}.attentions.{j}.",
                      "down": f"down_blocks.{level}.downsamplers.0."}[kind]
            source = rf"^input_blocks\.{k}\.{m}\.op\." if kind == "down" else rf"^input_blocks\.{k}\.{m}\."
            rules.append((source, target + ("conv." if kind == "down" else "")))
    for k, kinds in enumerate(output_blocks):
        level, j = divmod(k, per_level)
        for m, kind in enumerate(kinds):
            target = {"res": f"up_blocks.{level}.resnets.{j}.", "attn": f"up_blocks.{level}.attentions.{j}.",
                      "up": f"up_blocks.{level}.upsamplers.0."}[kind]
            rules.append((rf"^output_blocks\.{k}\.{m}\.", target))
    return tuple(rules), DIFFUSERS_RESNET


# ----------------------------------------------------------------------------- CLIP text encoders

# transformers CLIPTextModel / CLIPTextModelWithProjection: our names are theirs under ``text_model.``
# (the projection sits beside it), except the fused q/k/v. transformers 5 saves a plain CLIPTextModel
# without the prefix (and reads both): the alias accepts those files, export writes the prefixed names.
_CLIP_TEXT_PREFIX = ((r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1."),)
TRANSFORMERS_CLIP_TEXT = Spec(
    "transformers CLIPTextModel", leaves=TORCH_LEAVES, rules=(_CLIP_TEXT_PREFIX,), aliases=_CLIP_TEXT_PREFIX,
    layouts={CLIPAttention: {
        "qkv.weight": (("q_proj.weight", "k_proj.weight", "v_proj.weight"), FUSED_LINEAR),
        "qkv.bias": (("q_proj.bias", "k_proj.bias", "v_proj.bias"), FUSED_QKV_BIAS)}})

# open_clip's text tower (CLIP.encode_text's modules; Stable Diffusion 2.x's FrozenOpenCLIPEmbedder.model)
OPEN_CLIP_TEXT = Spec(
    "open_clip text tower", leaves=TORCH_LEAVES,
    rules=(
        ((r"^embeddings\.token_embedding\.", "token_embedding."),
         (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
         (r"^encoder\.layers\.(\d+)\.", r"transformer.resblocks.\1."),
         (r"^final_layer_norm\.", "ln_final."),
         (r"^text_projection\.weight$", "text_projection")),
        ((r"\.layer_norm1\.", ".ln_1."),
         (r"\.layer_norm2\.", ".ln_2."),
         (r"\.self_attn\.qkv\.weight$", ".attn.in_proj_weight"),
         (r"\.self_attn\.qkv\.bias$", ".attn.in_proj_bias"),
         (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
         (r"\.mlp\.fc1\.", ".mlp.c_fc."),
         (r"\.mlp\.fc2\.", ".mlp.c_proj.")),
    ),
    layouts={CLIPTextModel: {"text_projection.weight": (("text_projection.weight",), TRANSPOSED)}})
