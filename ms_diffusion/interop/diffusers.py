"""diffusers model folders (config.json + safetensors) <-> ms_diffusion networks.

=========================  ======================================  ==========================================
diffusers class            ours                                    maps when the config has
=========================  ======================================  ==========================================
``AutoencoderKL``          ``AutoencoderKL`` (ldm)                 DownEncoderBlock2D / UpDecoderBlock2D
                                                                   blocks, SiLU, quant and post-quant convs
``UNet2DConditionModel``   ``UNetModel(use_spatial_transformer)``  CrossAttn/plain Down/Up blocks mirrored,
                                                                   UNetMidBlock2DCrossAttn, ``positional``
                                                                   cos-sin time embedding with shift 0, one
                                                                   head width (or count) for all levels, one
                                                                   transformer depth, integer class labels
``UNet2DModel``            ``UNetModel`` with AttentionBlocks      Attn/plain Down/Up blocks mirrored,
                           (``use_new_attention_order``)           UNetMidBlock2D with attention, same time
                                                                   embedding, conv up/downsampling
``CLIPTextModel`` (a       ``CLIPTextModel`` (``interop.clip``)    a transformers config (``architectures``)
pipeline's text_encoder/)                                          with quick-GELU or GELU
=========================  ======================================  ==========================================

Everything else is refused with the list of reasons (``unet_kwargs_from_diffusers``): SDXL
(``addition_embed_type``, per-level transformer depth), ``class_embed_type`` projections, the
time embeddings of google's DDPM checkpoints (``flip_sin_to_cos=False``, ``freq_shift=1``: our
ldm UNet uses ldm's cos-sin embedding), ``downsample_padding=0``, ResNet up/down blocks,
``center_input_sample``, Fourier time embeddings, dual cross-attention, ... The name map is
generated from the network (``names.diffusers_unet_rules`` / ``diffusers_vae_rules``): diffusers
numbers blocks per level where ldm numbers them consecutively.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ms_diffusion.interop.checkpoints import (Converted, autoencoder_experiment, build_from_config, is_network_file,
                                              load_network, read_ms_checkpoint)
from ms_diffusion.interop.clip import text_encoder_from_transformers_state
from ms_diffusion.interop.names import (DIFFUSERS_ATTENTION_LAYOUT, DIFFUSERS_LEGACY_ATTENTION, DIFFUSERS_VAE_LAYOUT,
                                        TORCH_LEAVES, Spec, diffusers_unet_rules, diffusers_vae_rules)
from ms_diffusion.interop.plan import Plan, build_plan
from ms_diffusion.io.state import ConversionError, load_arrays_into
from ms_diffusion.interop.torch_io import PathLike, read_diffusers_folder, write_weights

__all__ = ["vae_plan", "unet_plan", "autoencoder_config_from_diffusers", "unet_kwargs_from_diffusers",
           "diffusers_vae_config", "diffusers_unet_config", "diffusers_to_ms", "ms_to_diffusers", "DIFFUSERS_CLASSES"]

DIFFUSERS_CLASSES = ("AutoencoderKL", "UNet2DConditionModel", "UNet2DModel", "CLIPTextModel",
                     "CLIPTextModelWithProjection")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: the diffusers version whose config formats we write (and test against)
DIFFUSERS_VERSION = "0.42.1"

# config.json keys that are plain renames of ours, (our key, diffusers' key, diffusers' default): read and
# written from these tables. AutoencoderKL: ldm's ddconfig; UNet: UNetModel kwargs (= its attributes).
_VAE_CONFIG_KEYS: Tuple[Tuple[str, str, int], ...] = (
    ("in_channels", "in_channels", 3), ("out_ch", "out_channels", 3), ("num_res_blocks", "layers_per_block", 1),
    ("norm_num_groups", "norm_num_groups", 32), ("resolution", "sample_size", 32))
_UNET_CONFIG_KEYS: Tuple[Tuple[str, str, int], ...] = (
    ("image_size", "sample_size", 64), ("in_channels", "in_channels", 4), ("out_channels", "out_channels", 4),
    ("num_res_blocks", "layers_per_block", 2))


# ----------------------------------------------------------------------------- plans

def vae_plan(vae, torch_prefix: str = "", ms_prefix: str = "") -> Plan:
    """diffusers AutoencoderKL names for our ``AutoencoderKL`` (legacy query/key/value names accepted)."""
    from ms_diffusion.models.autoencoder import AttnBlock

    spec = Spec("diffusers AutoencoderKL", rules=diffusers_vae_rules(vae.encoder.num_resolutions),
                layouts={AttnBlock: DIFFUSERS_VAE_LAYOUT}, leaves=TORCH_LEAVES, aliases=DIFFUSERS_LEGACY_ATTENTION)
    return build_plan(vae, spec, ms_prefix=ms_prefix, torch_prefix=torch_prefix)


def _block_kinds(blocks) -> List[Tuple[str, ...]]:
    from ms_diffusion.models.unet_ldm import AttentionBlock, Downsample, ResBlock
    from ms_diffusion.nn.transformer import SpatialTransformer

    out = []
    for block in blocks:
        kinds = []
        for layer in block.cell_list:
            if isinstance(layer, ResBlock):
                kinds.append("res")
            elif isinstance(layer, (AttentionBlock, SpatialTransformer)):
                kinds.append("attn")
            elif isinstance(layer, Downsample):
                kinds.append("down")
            else:
                kinds.append("up")
        out.append(tuple(kinds))
    return out


def unet_plan(unet, torch_prefix: str = "", ms_prefix: str = "") -> Plan:
    """diffusers UNet2DConditionModel (spatial transformer) / UNet2DModel (attention blocks) names for our
    ``UNetModel``."""
    from ms_diffusion.models.unet_ldm import AttentionBlock

    problems = _unet_export_problems(unet)
    if problems:
        raise ConversionError("this UNetModel has no diffusers counterpart: " + "; ".join(problems))
    kind = "UNet2DConditionModel" if unet.use_spatial_transformer else "UNet2DModel"
    spec = Spec(f"diffusers {kind}", leaves=TORCH_LEAVES, aliases=DIFFUSERS_LEGACY_ATTENTION,
                rules=diffusers_unet_rules(_block_kinds(unet.input_blocks), _block_kinds(unet.output_blocks),
                                           unet.num_res_blocks),
                layouts={} if unet.use_spatial_transformer else {AttentionBlock: DIFFUSERS_ATTENTION_LAYOUT})
    return build_plan(unet, spec, ms_prefix=ms_prefix, torch_prefix=torch_prefix)


# ----------------------------------------------------------------------------- configs, diffusers -> ours

def _expect(config: Mapping[str, Any], problems: List[str], key: str, allowed, what: str = "") -> None:
    value = config.get(key, allowed[0] if isinstance(allowed, tuple) else allowed)
    options = allowed if isinstance(allowed, tuple) else (allowed,)
    if value not in options:
        problems.append(f"{key}={value!r}" + (f" ({what})" if what else ""))


def _read_keys(config: Mapping[str, Any], table, problems: List[str]) -> Dict[str, int]:
    """{our key: int} for a ``*_CONFIG_KEYS`` table (diffusers' default where the key is absent or null)."""
    out = {}
    for ours, theirs, default in table:
        value = config.get(theirs)
        if isinstance(value, (list, tuple)):
            problems.append(f"per-level {theirs}")
            value = None
        out[ours] = default if value is None else int(value)
    return out


def _write_keys(values: Mapping[str, Any], table) -> Dict[str, int]:
    """{diffusers' key: int} for a ``*_CONFIG_KEYS`` table from our values (absent or None: diffusers' default)."""
    return {theirs: default if values.get(ours) is None else int(values[ours]) for ours, theirs, default in table}


def _per_level(value, n: int) -> List:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def autoencoder_config_from_diffusers(config: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """diffusers AutoencoderKL config -> ({"ddconfig", "embed_dim"}, reasons it does not map)."""
    problems: List[str] = []
    blocks = list(config.get("block_out_channels", (64,)))
    n = len(blocks)
    if list(config.get("down_block_types", ["DownEncoderBlock2D"] * n)) != ["DownEncoderBlock2D"] * n:
        problems.append(f"down_block_types={config.get('down_block_types')} (only DownEncoderBlock2D)")
    if list(config.get("up_block_types", ["UpDecoderBlock2D"] * n)) != ["UpDecoderBlock2D"] * n:
        problems.append(f"up_block_types={config.get('up_block_types')} (only UpDecoderBlock2D)")
    _expect(config, problems, "act_fn", "silu")
    _expect(config, problems, "use_quant_conv", True, "ldm's autoencoder always has quant_conv")
    _expect(config, problems, "use_post_quant_conv", True, "ldm's autoencoder always has post_quant_conv")
    if any(c % blocks[0] for c in blocks):
        problems.append(f"block_out_channels={blocks} are not multiples of the first")
    latent = int(config.get("latent_channels", 4))
    ddconfig = {"double_z": True, "z_channels": latent, **_read_keys(config, _VAE_CONFIG_KEYS, problems),
                "ch": int(blocks[0]), "ch_mult": [int(c // blocks[0]) for c in blocks], "attn_resolutions": [],
                "dropout": 0.0}
    if not config.get("mid_block_add_attention", True):
        ddconfig["attn_type"] = "none"
    return {"ddconfig": ddconfig, "embed_dim": latent}, problems


def _heads_option(config: Mapping[str, Any], channels: List[int], levels: List[int], problems: List[str],
                  widths_given: bool) -> Dict[str, int]:
    """Our ``num_heads`` / ``num_head_channels`` for diffusers' per-level attention heads.

    ``widths_given``: ``attention_head_dim`` is a head width (UNet2DModel); otherwise it (or
    ``num_attention_heads``) is a head count (UNet2DConditionModel's legacy naming). Only levels
    with attention and the mid block (the last level's setting) matter."""
    n = len(channels)
    if widths_given:
        value = config.get("attention_head_dim", 8)
        widths = [channels[i] if v is None else int(v) for i, v in enumerate(_per_level(value, n))]
        counts = [channels[i] // widths[i] for i in range(n)]
    else:
        value = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        counts = [int(v) for v in _per_level(value, n)]
        widths = [channels[i] // counts[i] for i in range(n)]
    used = sorted(set(levels) | {n - 1})
    if any(widths[i] * counts[i] != channels[i] for i in used):
        problems.append(f"attention heads {value} do not divide the channels {channels}")
        return {"num_heads": 1}
    if len({counts[i] for i in used}) == 1:
        return {"num_heads": counts[used[0]]}
    if len({widths[i] for i in used}) == 1:
        return {"num_heads": -1, "num_head_channels": widths[used[0]]}
    problems.append(f"attention heads {value} give neither one head count nor one head width per level")
    return {"num_heads": 1}


def unet_kwargs_from_diffusers(config: Mapping[str, Any], class_name: Optional[str] = None
                               ) -> Tuple[Dict[str, Any], List[str]]:
    """diffusers UNet2DConditionModel / UNet2DModel config -> (our UNetModel kwargs, reasons it does not map)."""
    name = class_name or config.get("_class_name") or (
        "UNet2DConditionModel" if "cross_attention_dim" in config else "UNet2DModel")
    cond = name == "UNet2DConditionModel"
    if name not in ("UNet2DConditionModel", "UNet2DModel"):
        return {}, [f"{name} is not a UNet2DModel / UNet2DConditionModel"]
    problems: List[str] = []
    channels = [int(c) for c in config.get("block_out_channels", (224, 448, 672, 896) if not cond
                                           else (320, 640, 1280, 1280))]
    n = len(channels)
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    attn_down, plain_down = ("CrossAttnDownBlock2D", "DownBlock2D") if cond else ("AttnDownBlock2D", "DownBlock2D")
    attn_up, plain_up = ("CrossAttnUpBlock2D", "UpBlock2D") if cond else ("AttnUpBlock2D", "UpBlock2D")
    levels = [i for i, t in enumerate(down) if t == attn_down]
    if len(down) != n or any(t not in (attn_down, plain_down) for t in down):
        problems.append(f"down_block_types={down} (only {attn_down} / {plain_down})")
    expected_up = [attn_up if (n - 1 - i) in levels else plain_up for i in range(n)]
    if up != expected_up:
        problems.append(f"up_block_types={up} do not mirror the down blocks (expected {expected_up})")
    _expect(config, problems, "flip_sin_to_cos", True, "our UNetModel uses ldm's cos-sin time embedding")
    _expect(config, problems, "freq_shift", 0, "our UNetModel uses ldm's frequency shift 0")
    _expect(config, problems, "time_embedding_type", "positional")
    _expect(config, problems, "time_embedding_dim", None)
    _expect(config, problems, "act_fn", "silu")
    _expect(config, problems, "norm_eps", (1e-5,), "our ResBlock GroupNorm eps is 1e-5")
    _expect(config, problems, "downsample_padding", 1, "ldm pads stride-2 convs by 1")
    _expect(config, problems, "center_input_sample", False)
    _expect(config, problems, "class_embed_type", None, "only integer class labels map (label_emb)")
    _expect(config, problems, "resnet_time_scale_shift", ("default", "scale_shift"))
    _expect(config, problems, "mid_block_scale_factor", (1, 1.0))
    if cond:
        _expect(config, problems, "mid_block_type", "UNetMidBlock2DCrossAttn")
        for key in ("addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type", "time_cond_proj_dim",
                    "timestep_post_act", "time_embedding_act_fn", "projection_class_embeddings_input_dim",
                    "cross_attention_norm", "reverse_transformer_layers_per_block"):
            _expect(config, problems, key, None)
        for key in ("only_cross_attention", "dual_cross_attention", "class_embeddings_concat",
                    "resnet_skip_time_act"):
            _expect(config, problems, key, False)
        _expect(config, problems, "attention_type", "default")
        _expect(config, problems, "conv_in_kernel", 3)
        _expect(config, problems, "conv_out_kernel", 3)
        _expect(config, problems, "resnet_out_scale_factor", (1, 1.0))
        depth = _per_level(config.get("transformer_layers_per_block", 1), n)
        if len({int(d) for i, d in enumerate(depth) if i in levels} | {int(depth[-1])}) != 1:
            problems.append(f"transformer_layers_per_block={depth} (one depth for all levels only)")
        context = config.get("cross_attention_dim", 1280)
        if isinstance(context, (list, tuple)):
            if len(set(context)) != 1:
                problems.append(f"cross_attention_dim={context} (one context width only)")
            context = context[0]
    else:
        _expect(config, problems, "mid_block_type", "UNetMidBlock2D")
        _expect(config, problems, "add_attention", True, "ldm's middle block always has attention")
        _expect(config, problems, "downsample_type", "conv")
        _expect(config, problems, "upsample_type", "conv")
        groups = config.get("attn_norm_num_groups")
        if groups is not None and groups != config.get("norm_num_groups", 32):
            problems.append(f"attn_norm_num_groups={groups} differs from norm_num_groups")
    kwargs: Dict[str, Any] = {
        **_read_keys(config, _UNET_CONFIG_KEYS, problems), "model_channels": channels[0],
        "attention_resolutions": [2 ** i for i in levels], "dropout": float(config.get("dropout", 0.0)),
        "channel_mult": [c // channels[0] for c in channels],
        "use_scale_shift_norm": config.get("resnet_time_scale_shift") == "scale_shift",
        "norm_num_groups": int(config.get("norm_num_groups", 32)), "legacy": False,
    }
    if any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels={channels} are not multiples of the first")
    if config.get("num_class_embeds") is not None:
        kwargs["num_classes"] = int(config["num_class_embeds"])
    kwargs.update(_heads_option(config, channels, levels, problems, widths_given=not cond))
    if cond:
        kwargs.update(use_spatial_transformer=True, context_dim=int(context), transformer_depth=int(depth[-1]),
                      use_linear_in_transformer=bool(config.get("use_linear_projection", False)))
    else:
        kwargs["use_new_attention_order"] = True
    return kwargs, problems


# ----------------------------------------------------------------------------- configs, ours -> diffusers

def diffusers_vae_config(vae) -> Dict[str, Any]:
    """diffusers AutoencoderKL config.json for our ``AutoencoderKL`` (refuses what diffusers cannot hold)."""
    dd = vae.ddconfig
    problems = []
    if list(dd.get("attn_resolutions", ())):
        problems.append(f"attn_resolutions={list(dd['attn_resolutions'])} (diffusers has attention in the mid "
                        f"block only)")
    if int(dd["z_channels"]) != vae.embed_dim:
        problems.append(f"z_channels={dd['z_channels']} differs from embed_dim={vae.embed_dim}")
    if not dd.get("resamp_with_conv", True):
        problems.append("resamp_with_conv=False")
    if dd.get("tanh_out") or dd.get("give_pre_end"):
        problems.append("tanh_out / give_pre_end")
    if problems:
        raise ConversionError("this AutoencoderKL has no diffusers counterpart: " + "; ".join(problems))
    ch = int(dd["ch"])
    n = len(dd.get("ch_mult", (1, 2, 4, 8)))
    return {"_class_name": "AutoencoderKL", **_write_keys(dd, _VAE_CONFIG_KEYS),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [ch * int(m) for m in dd.get("ch_mult", (1, 2, 4, 8))],
            "act_fn": "silu", "latent_channels": vae.embed_dim,
            "mid_block_add_attention": dd.get("attn_type", "vanilla") != "none"}


def _attention_layers(unet) -> Dict[int, Any]:
    """{level: one attention layer of that level (AttentionBlock or SpatialTransformer)}; the mid block's is
    under level ``len(channel_mult)``."""
    from ms_diffusion.models.unet_ldm import AttentionBlock
    from ms_diffusion.nn.transformer import SpatialTransformer

    per_level = unet.num_res_blocks + 1
    found = {}
    for k, block in enumerate(unet.input_blocks):
        for layer in block.cell_list:
            if isinstance(layer, (AttentionBlock, SpatialTransformer)):
                found.setdefault((k - 1) // per_level, layer)
    found[len(unet.channel_mult)] = unet.middle_block.cell_list[1]
    return found


def _heads_of(layer) -> Tuple[int, int]:
    """(head count, head width) of an attention layer."""
    from ms_diffusion.models.unet_ldm import AttentionBlock

    if isinstance(layer, AttentionBlock):
        return layer.num_heads, layer.head_dim
    attn = layer.transformer_blocks[0].attn1
    return attn.heads, attn.dim_head


def _unet_export_problems(unet) -> List[str]:
    from ms_diffusion.models.unet_ldm import AttentionBlock, Downsample, ResBlock

    problems = []
    layers = [layer for block in list(unet.input_blocks) + list(unet.output_blocks) for layer in block.cell_list]
    if any(isinstance(layer, Downsample) and not layer.use_conv for layer in layers):
        problems.append("conv_resample=False (diffusers up/downsamples with convolutions)")
    if any(isinstance(layer, ResBlock) and layer.updown for layer in layers):
        problems.append("resblock_updown=True (diffusers' ResnetDownsampleBlock2D is not mapped)")
    attn = [layer for layer in layers + [unet.middle_block.cell_list[1]] if isinstance(layer, AttentionBlock)]
    if any(not layer.new_order for layer in attn):
        problems.append("use_new_attention_order=False (ldm's legacy heads-first qkv rows)")
    if len({layer.head_dim for layer in attn}) > 1:
        problems.append("AttentionBlocks of different head widths (UNet2DModel has one attention_head_dim)")
    return problems


def diffusers_unet_config(unet) -> Dict[str, Any]:
    """diffusers UNet2DConditionModel / UNet2DModel config.json for our ``UNetModel``."""
    problems = _unet_export_problems(unet)
    if problems:
        raise ConversionError("this UNetModel has no diffusers counterpart: " + "; ".join(problems))
    n = len(unet.channel_mult)
    channels = [unet.model_channels * int(m) for m in unet.channel_mult]
    levels = [i for i in range(n) if 2 ** i in unet.attention_resolutions]
    attn = _attention_layers(unet)
    mid = unet.middle_block.cell_list[1]
    ours = {key: getattr(unet, key) for key, _, _ in _UNET_CONFIG_KEYS}
    common = {**_write_keys(ours, _UNET_CONFIG_KEYS), "block_out_channels": channels, "flip_sin_to_cos": True,
              "freq_shift": 0, "act_fn": "silu", "norm_num_groups": int(unet.out[0].num_groups), "norm_eps": 1e-5,
              "downsample_padding": 1, "num_class_embeds": unet.num_classes,
              "resnet_time_scale_shift": "scale_shift" if unet.middle_block.cell_list[0].use_scale_shift_norm
              else "default"}
    if unet.use_spatial_transformer:
        mid_heads, width = _heads_of(mid)
        heads = [_heads_of(attn[i])[0] if i in attn else max(c // width, 1) for i, c in enumerate(channels)]
        heads[-1] = mid_heads
        return {"_class_name": "UNet2DConditionModel", **common,
                "down_block_types": ["CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n)],
                "up_block_types": ["CrossAttnUpBlock2D" if (n - 1 - i) in levels else "UpBlock2D" for i in range(n)],
                "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": unet.context_dim,
                "attention_head_dim": heads, "transformer_layers_per_block": len(mid.transformer_blocks),
                "use_linear_projection": bool(mid.use_linear)}
    return {"_class_name": "UNet2DModel", **common,
            "down_block_types": ["AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n)],
            "up_block_types": ["AttnUpBlock2D" if (n - 1 - i) in levels else "UpBlock2D" for i in range(n)],
            "attention_head_dim": _heads_of(mid)[1], "add_attention": True}


# ----------------------------------------------------------------------------- conversions

def diffusers_to_ms(folder: PathLike, subfolder: Optional[str] = None,
                    experiment: Optional[Mapping[str, Any]] = None) -> Converted:
    """A diffusers model folder -> ``AutoencoderKL`` (an autoencoder experiment, usable as a latent diffusion's
    ``first_stage``), ``UNetModel`` (a network file) or, from a transformers ``CLIPTextModel`` folder (a
    pipeline's ``text_encoder/``), ``CLIPTextModel`` (a ``clip_text`` network file: ``diffusion.text.encoder``)."""
    config, state = read_diffusers_folder(folder, subfolder)
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    meta = {"source": "diffusers", "path": str(Path(folder) / (subfolder or "")), "class": name, "step": None,
            "diffusers_version": config.get("_diffusers_version"), "not_converted": {}}
    if name == "AutoencoderKL":
        section, problems = autoencoder_config_from_diffusers(config)
        if problems:
            raise ConversionError("this diffusers AutoencoderKL does not map onto ldm's: " + "; ".join(problems))
        built, vae = build_from_config(autoencoder_experiment(section, None, experiment or {}))
        online = vae_plan(vae).to_ms(state)
        meta["scaling_factor"] = config.get("scaling_factor")
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if config.get(key) is not None:
                meta[key] = config[key]
        return Converted(config=built.to_dict(), online=online, meta=meta)
    if name in ("UNet2DConditionModel", "UNet2DModel"):
        from ms_diffusion.models import UNetModel

        kwargs, problems = unet_kwargs_from_diffusers(config, name)
        if problems:
            raise ConversionError(f"this diffusers {name} does not map onto ldm's UNetModel: " + "; ".join(problems))
        online = unet_plan(UNetModel(**kwargs)).to_ms(state)
        meta["weights"] = "online"
        return Converted(config=None, online=online, meta=meta, network={"type": "unet_ldm", **kwargs})
    if name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        kwargs, _, online = text_encoder_from_transformers_state(config, state)
        meta.update(weights="online", transformers_version=config.get("transformers_version"))
        return Converted(config=None, online=online, meta=meta, network={"type": "clip_text", **kwargs})
    raise ConversionError(f"diffusers class {name!r} is not supported; convertible: {', '.join(DIFFUSERS_CLASSES)}")


def ms_to_diffusers(path: PathLike, out_folder: PathLike, weights: str = "ema") -> Path:
    """Our autoencoder checkpoint or UNet network file -> a diffusers folder (config.json +
    diffusion_pytorch_model.safetensors) that ``from_pretrained`` loads."""
    from ms_diffusion import __version__

    if is_network_file(path):
        network, arrays, _ = load_network(path)
        if network.__class__.__name__ != "UNetModel":
            raise ConversionError(f"{path} holds a {type(network).__name__}; diffusers export covers UNetModel and "
                                  f"AutoencoderKL")
        config, state = diffusers_unet_config(network), unet_plan(network).to_torch(arrays)
    else:
        raw, groups, meta = read_ms_checkpoint(path)
        if (raw.get("model") or {}).get("type") != "autoencoder_kl":
            raise ConversionError(f"{meta['path']} is a {(raw.get('model') or {}).get('type')!r} model; diffusers "
                                  f"export covers autoencoder runs and ldm UNet network files (convert a latent "
                                  f"diffusion with to-ldm)")
        _, vae = build_from_config(raw)
        group = weights if weights in groups else ("online" if "online" in groups else next(iter(groups)))
        load_arrays_into(vae, groups[group])
        config, state = diffusers_vae_config(vae), vae_plan(vae).to_torch(groups[group])
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    config["_diffusers_version"] = DIFFUSERS_VERSION
    config["_ms_diffusion_version"] = __version__
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_weights(out / WEIGHTS_NAME, state)
    return out
