"""Stable Diffusion 1.x / 2.x files: original checkpoints (one ``.ckpt`` / ``.safetensors``: UNet, VAE and
text encoder, with or without LitEma's ``model_ema.*``) <-> our networks, and diffusers pipeline folders
written from our networks (``write_diffusers_pipeline``; reading them is ``StableDiffusion.from_diffusers``).

==================================  ======================================  =====================================
in the checkpoint                   ours                                    family
==================================  ======================================  =====================================
``model.diffusion_model.*``         ldm ``UNetModel`` (names as ldm)        both
``first_stage_model.*``             ``AutoencoderKL``                       both
``cond_stage_model.transformer.*``  ``CLIPTextModel`` (transformers names,  SD 1.x (``FrozenCLIPEmbedder``:
                                    quick-GELU)                             last layer, end-token padding)
``cond_stage_model.model.*``        ``CLIPTextModel`` (open_clip names,     SD 2.x (``FrozenOpenCLIPEmbedder``:
                                    GELU)                                   penultimate layer, "!" padding)
==================================  ======================================  =====================================

The model's ldm YAML (``v1-inference.yaml``, ``v2-inference-v.yaml``, ...; beside the checkpoint as
``NAME.yaml``, the convention of SD front-ends) says everything; without one the architecture is read off
the tensors' shapes, with the two things shapes cannot tell taken from the family: attention heads (SD 1.x:
8 per layer; SD 2.x: 64 channels per head; the CLIP text encoder: 64 channels per head) and, for SD 2.x,
the prediction type (its 512 models predict noise, its 768 models v: name it). GroupNorm has 32 groups in
every original-format model (ldm hard-codes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ms_diffusion.interop.clip import text_encoder_kwargs_from_open_clip, text_encoder_plan
from ms_diffusion.interop.ldm import (EMA_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX, LdmConfig, autoencoder_plan,
                                      lit_ema_state, load_ldm_yaml, parse_ldm_config, read_ldm_checkpoint,
                                      unet_plan)
from ms_diffusion.interop.names import LDM_SCHEDULE_BUFFERS
from ms_diffusion.interop.torch_io import PathLike
from ms_diffusion.io.state import (ConversionError, build_uninitialised, load_arrays_into, named_parameters,
                                   state_arrays)

__all__ = ["SD_TEXT_ENCODERS", "SDComponents", "sd_text_source", "infer_sd_config", "read_sd_checkpoint",
           "write_diffusers_pipeline",
           "sd_checkpoint_state", "sd_ldm_config"]

# text encoder source -> (state-dict prefix, ldm cond stage class, the layer SD conditions on by default)
SD_TEXT_ENCODERS: Dict[str, Tuple[str, str, str]] = {
    "transformers": ("cond_stage_model.transformer.", "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "last"),
    "open_clip": ("cond_stage_model.model.", "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "penultimate"),
}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "eps": "eps", "v": "v"}
_HEAD_WIDTH = 64          # CLIP text encoders and SD 2.x UNets: 64 channels per attention head
_SD1_UNET_HEADS = 8


@dataclass
class SDComponents:
    """What ``read_sd_checkpoint`` found: the parsed config, the three networks with their weights loaded, and
    the text encoder's source (``transformers`` / ``open_clip``)."""

    config: LdmConfig
    text_source: str
    unet: Any                 # UNetModel
    vae: Any                  # AutoencoderKL
    text_encoder: Any         # CLIPTextModel, conditioning on the layer the config names (minus clip_skip more)
    buffers: Dict[str, np.ndarray] = field(default_factory=dict)     # ldm's schedule buffers, to check
    meta: Dict[str, Any] = field(default_factory=dict)


def sd_text_source(state: Mapping[str, np.ndarray]) -> str:
    """``transformers`` (SD 1.x) or ``open_clip`` (SD 2.x): which text encoder the state dict holds."""
    found = [s for s, (prefix, _, _) in SD_TEXT_ENCODERS.items() if any(k.startswith(prefix) for k in state)]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise ConversionError(f"not a Stable Diffusion 1.x / 2.x checkpoint: it holds {what} of the text encoders "
                              f"{' and '.join(p for p, _, _ in SD_TEXT_ENCODERS.values())}* (SDXL / SD3 files are "
                              f"not supported)")
    return found[0]


def _shape(state: Mapping[str, np.ndarray], name: str) -> Tuple[int, ...]:
    if name not in state:
        raise ConversionError(f"not a Stable Diffusion checkpoint: {name} is missing")
    return tuple(np.shape(state[name]))


def _count(state: Mapping[str, np.ndarray], pattern: str) -> int:
    """How many consecutive i make ``pattern.format(i)`` a key."""
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def _infer_unet(state: Mapping[str, np.ndarray], text_source: str) -> Dict[str, Any]:
    """ldm UNetModel params read off the tensors (heads from the family)."""
    p = UNET_PREFIX
    model_channels, in_channels = _shape(state, p + "input_blocks.0.0.weight")[:2]
    out_channels = _shape(state, p + "out.2.weight")[0]
    levels: List[List[int]] = [[]]       # input block indices per level
    k = 1
    while any(key.startswith(f"{p}input_blocks.{k}.") for key in state):
        if f"{p}input_blocks.{k}.0.op.weight" in state:
            levels.append([])
        else:
            levels[-1].append(k)
        k += 1
    if not levels[0]:
        raise ConversionError("not a Stable Diffusion UNet: no residual blocks in input_blocks")
    num_res_blocks = len(levels[0])
    channel_mult = [_shape(state, f"{p}input_blocks.{blocks[0]}.0.out_layers.3.weight")[0] // model_channels
                    for blocks in levels]
    attention, depth, context_dim, linear = [], 1, None, False
    for level, blocks in enumerate(levels):
        attn = f"{p}input_blocks.{blocks[0]}.1."
        if attn + "transformer_blocks.0.attn2.to_k.weight" in state:
            attention.append(2 ** level)
            depth = _count(state, attn + "transformer_blocks.{}.attn1.to_q.weight")
            context_dim = _shape(state, attn + "transformer_blocks.0.attn2.to_k.weight")[1]
            linear = len(_shape(state, attn + "proj_in.weight")) == 2
    if context_dim is None:
        raise ConversionError("not a Stable Diffusion UNet: no cross-attention transformer blocks")
    params: Dict[str, Any] = dict(image_size=32, in_channels=in_channels, out_channels=out_channels,
                                  model_channels=model_channels, attention_resolutions=attention,
                                  num_res_blocks=num_res_blocks, channel_mult=channel_mult,
                                  use_spatial_transformer=True, transformer_depth=depth, context_dim=context_dim,
                                  use_linear_in_transformer=linear, legacy=False)
    if text_source == "transformers":
        params["num_heads"] = _SD1_UNET_HEADS
    else:
        params["num_head_channels"] = _HEAD_WIDTH
    return params


def _infer_vae(state: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """ldm AutoencoderKL params (ddconfig + embed_dim) read off the tensors."""
    e = FIRST_STAGE_PREFIX + "encoder."
    ch, in_channels = _shape(state, e + "conv_in.weight")[:2]
    n = _count(state, e + "down.{}.block.0.conv1.weight")
    ch_mult = [_shape(state, f"{e}down.{i}.block.0.conv2.weight")[0] // ch for i in range(n)]
    ddconfig = dict(double_z=True, z_channels=_shape(state, e + "conv_out.weight")[0] // 2, resolution=256,
                    in_channels=in_channels, out_ch=_shape(state, FIRST_STAGE_PREFIX + "decoder.conv_out.weight")[0],
                    ch=ch, ch_mult=ch_mult, num_res_blocks=_count(state, e + "down.0.block.{}.conv1.weight"),
                    attn_resolutions=[], dropout=0.0)
    return {"ddconfig": ddconfig, "embed_dim": _shape(state, FIRST_STAGE_PREFIX + "quant_conv.weight")[0] // 2}


def infer_sd_config(state: Mapping[str, np.ndarray], prediction_type: Optional[str] = None) -> Dict[str, Any]:
    """An ldm YAML (as a mapping) for a Stable Diffusion 1.x / 2.x state dict without one: the architecture
    from the tensors' shapes, SD's schedule (scaled linear 0.00085 - 0.012, 1000 steps) and latent scale
    0.18215. ``prediction_type`` (``epsilon`` / ``v_prediction``): SD 1.x defaults to epsilon; SD 2.x has
    both and must be told."""
    source = sd_text_source(state)
    if prediction_type is None:
        if source == "open_clip":
            raise ConversionError("Stable Diffusion 2.x checkpoints predict noise (the 512 px models) or v (the "
                                  "768 px ones) and the file does not say which: pass prediction_type "
                                  "(--prediction-type epsilon|v_prediction) or the model's YAML (--config)")
        prediction_type = "epsilon"
    if prediction_type not in _PREDICTIONS:
        raise ConversionError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
    unet = _infer_unet(state, source)
    vae = _infer_vae(state)
    latent = vae["embed_dim"]
    if unet["in_channels"] not in (latent, 2 * latent + 1):
        raise ConversionError(f"the unet takes {unet['in_channels']} channels: neither the VAE's {latent} nor an "
                              f"inpainting unet's {2 * latent + 1}")
    parameterization = _PREDICTIONS[prediction_type]
    size = 96 if (source == "open_clip" and parameterization == "v") else 64
    unet["image_size"] = size
    _, target, layer = SD_TEXT_ENCODERS[source]
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "beta_schedule": "linear",
        "parameterization": parameterization, "image_size": size, "channels": latent, "scale_factor": 0.18215,
        "conditioning_key": "hybrid" if unet["in_channels"] != latent else "crossattn",
        "cond_stage_key": "txt", "first_stage_key": "jpg",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {**vae, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": target, "params": {"layer": layer}}}}}


def _text_kwargs(state: Mapping[str, np.ndarray], source: str) -> Dict[str, Any]:
    """Our CLIPTextModel arguments for a text encoder state dict (names without the cond_stage_model prefix)."""
    if source == "open_clip":
        return text_encoder_kwargs_from_open_clip(state)
    p = "text_model." if any(k.startswith("text_model.") for k in state) else ""
    vocab, width = _shape(state, p + "embeddings.token_embedding.weight")
    return dict(vocab_size=vocab, hidden_size=width,
                intermediate_size=_shape(state, p + "encoder.layers.0.mlp.fc1.weight")[0],
                num_hidden_layers=_count(state, p + "encoder.layers.{}.self_attn.q_proj.weight"),
                num_attention_heads=max(1, width // _HEAD_WIDTH),
                max_position_embeddings=_shape(state, p + "embeddings.position_embedding.weight")[0],
                hidden_act="quick_gelu", eos_token_id=vocab - 1)


def _load_config(state: Mapping[str, np.ndarray], config: Union[None, PathLike, Mapping[str, Any]],
                 prediction_type: Optional[str]) -> Mapping[str, Any]:
    if config is None:
        return infer_sd_config(state, prediction_type)
    config = load_ldm_yaml(config)
    if prediction_type is not None:
        params = dict(config["model"].get("params") or {})
        if prediction_type not in _PREDICTIONS:
            raise ConversionError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
        params["parameterization"] = _PREDICTIONS[prediction_type]
        config = {**config, "model": {**config["model"], "params": params}}
    return config


def read_sd_checkpoint(path: PathLike, config: Union[None, PathLike, Mapping[str, Any]] = None, *,
                       use_ema: bool = True, prediction_type: Optional[str] = None,
                       clip_skip: int = 0) -> SDComponents:
    """A Stable Diffusion 1.x / 2.x checkpoint -> our networks with its weights, checked tensor by tensor.

    ``config``: the model's ldm YAML (path or mapping; default: ``NAME.yaml`` beside the file if present,
    else read off the tensors, see ``infer_sd_config``); ``use_ema``: the UNet's LitEma weights when the
    file has them; ``prediction_type``: overrides the config's parameterisation; ``clip_skip``: text-encoder
    layers to skip beyond the one the config names.
    """
    from ms_diffusion.models import AutoencoderKL, UNetModel
    from ms_diffusion.text import CLIPTextModel

    path = Path(path)
    state, info = read_ldm_checkpoint(path)
    beside = path.with_suffix(".yaml")
    if config is None and beside.is_file():
        config = beside
    source = sd_text_source(state)
    cfg = parse_ldm_config(_load_config(state, config, prediction_type))
    if cfg.unet is None or cfg.autoencoder is None or cfg.text_stage is None:
        raise ConversionError("the config is not a Stable Diffusion model (a LatentDiffusion with a KL first stage "
                              "and a CLIP text encoder)")
    problems = list(cfg.unet_problems) + list(cfg.problems)
    if problems:
        raise ConversionError("this Stable Diffusion model does not convert: " + "; ".join(problems))
    if cfg.text_stage["source"] != source:
        raise ConversionError(f"the config names a {cfg.text_stage['target']} but the checkpoint holds "
                              f"{SD_TEXT_ENCODERS[source][0]}* ({source})")
    meta: Dict[str, Any] = {"source": "stable-diffusion", "path": str(path), "step": info["step"],
                            "config": str(config) if isinstance(config, (str, Path)) else
                            ("inferred" if config is None else "given"), "not_converted": dict(info["not_converted"])}

    unet = build_uninitialised(UNetModel, **cfg.unet)
    plan = unet_plan(unet, UNET_PREFIX)
    ema = lit_ema_state(state, plan.torch_names)
    unet_state = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if ema is not None and use_ema:
        unet_state = ema
        meta["not_converted"]["model.diffusion_model.*"] = "the non-EMA unet weights (use_ema chose model_ema.*)"
    elif ema is not None:
        meta["not_converted"]["model_ema.*"] = "the unet's EMA weights (use_ema=False)"
    meta["weights"] = "ema" if (ema is not None and use_ema) else "as stored"
    load_arrays_into(unet, plan.to_ms(unet_state))

    vae = build_uninitialised(AutoencoderKL, **cfg.autoencoder)
    load_arrays_into(vae, autoencoder_plan(vae).to_ms(
        {k: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}))

    prefix = SD_TEXT_ENCODERS[source][0]
    text_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    skip = (1 if cfg.text_stage["layer"] == "penultimate" else 0) + int(clip_skip)
    text = build_uninitialised(CLIPTextModel, **_text_kwargs(text_state, source), skip_last_layers=skip)
    load_arrays_into(text, text_encoder_plan(text, source).to_ms(text_state))
    text.set_train(False)

    buffers = {k: state[k] for k in LDM_SCHEDULE_BUFFERS if k in state}
    known = (UNET_PREFIX, FIRST_STAGE_PREFIX, prefix, EMA_PREFIX)
    if "logvar" in state:
        meta["not_converted"]["logvar"] = "ldm's per-timestep loss log-variance (training only)"
    rest = sorted(k for k in state if not k.startswith(known) and k not in buffers and k != "logvar")
    if rest:
        raise ConversionError(f"{path}: tensors that belong to no Stable Diffusion component: "
                              f"{', '.join(rest[:8])}{' ...' if len(rest) > 8 else ''} ({len(rest)})")
    return SDComponents(config=cfg, text_source=source, unet=unet, vae=vae, text_encoder=text, buffers=buffers,
                        meta=meta)


def _text_layout(text_encoder) -> Tuple[str, str]:
    """(source, layer) an original checkpoint stores ``text_encoder`` as, or ConversionError."""
    c = text_encoder.config
    if c["hidden_act"] == "quick_gelu":
        if c["skip_last_layers"]:
            raise ConversionError("SD 1.x's FrozenCLIPEmbedder conditions on the last layer; a text encoder that "
                                  "skips layers (clip_skip) has no original-format counterpart")
        return "transformers", "last"
    if c["skip_last_layers"] != 1:
        raise ConversionError(f"SD 2.x checkpoints hold every layer of the OpenCLIP text encoder and condition on "
                              f"the penultimate; this one conditions on layer {c['num_hidden_layers']} - "
                              f"{c['skip_last_layers']} of {c['num_hidden_layers']} (a diffusers SD 2.x folder "
                              f"stores the encoder without its unused last layer, which an original checkpoint "
                              f"needs: export such a model with save_diffusers)")
    return "open_clip", "penultimate"


def sd_checkpoint_state(unet, vae, text_encoder, schedule_buffers: Optional[Mapping[str, np.ndarray]] = None
                        ) -> Dict[str, np.ndarray]:
    """Our UNet, VAE and text encoder -> an original Stable Diffusion state dict (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.*`` and the schedule buffers given)."""
    for cell, what in ((unet, "unet"), (vae, "VAE")):
        groups = {int(c.num_groups) for _, c in cell.cells_and_names() if hasattr(c, "num_groups")}
        if groups - {32}:
            raise ConversionError(f"the {what} uses GroupNorm with {sorted(groups)} groups; original Stable "
                                  f"Diffusion code hard-codes 32")
    source, _ = _text_layout(text_encoder)
    out = unet_plan(unet, UNET_PREFIX).to_torch(state_arrays(unet))
    out.update(autoencoder_plan(vae, FIRST_STAGE_PREFIX).to_torch(state_arrays(vae)))
    prefix = SD_TEXT_ENCODERS[source][0]
    out.update({prefix + k: v for k, v in text_encoder_plan(text_encoder, source)
                .to_torch(state_arrays(text_encoder)).items()})
    for name, value in dict(schedule_buffers or {}).items():
        out[name] = np.asarray(value, np.float32)
    return out


def sd_ldm_config(unet, vae, text_encoder, *, parameterization: str, scale_factor: float, timesteps: int,
                  linear_start: float, linear_end: float, image_size: int) -> Dict[str, Any]:
    """The ldm YAML (as a mapping) that describes an original checkpoint of these networks, as
    ``v1-inference.yaml`` / ``v2-inference-v.yaml`` do."""
    source, layer = _text_layout(text_encoder)
    u = unet.config if hasattr(unet, "config") else {}
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in u.items()
              if k not in ("norm_num_groups", "flash_attn")}       # ours only: ldm has 32 groups, no switch
    if not params:
        raise ConversionError("the unet does not record its constructor arguments")
    _, target, _ = SD_TEXT_ENCODERS[source]
    latent = vae.embed_dim
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": float(linear_start), "linear_end": float(linear_end), "timesteps": int(timesteps),
        "beta_schedule": "linear", "parameterization": parameterization, "image_size": int(image_size),
        "channels": int(latent), "scale_factor": float(scale_factor), "cond_stage_key": "txt",
        "first_stage_key": "jpg", "cond_stage_trainable": False,
        "conditioning_key": "hybrid" if unet.in_channels != latent else "crossattn",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": int(latent), "ddconfig": dict(vae.ddconfig),
                                          "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": target, "params": {"layer": layer} if source == "open_clip" else {}}}}}


# ----------------------------------------------------------------------------- diffusers pipeline folders

_PIPELINE_INDEX = {"tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
                   "feature_extractor": [None, None], "requires_safety_checker": False}


def _truncated_text_encoder(text_encoder):
    """(a CLIPTextModel of the layers ``text_encoder`` conditions on, their arrays): diffusers stores an SD
    text encoder as a ``CLIPTextModel`` without the layers past the one SD uses (SD 2.x: 23 of OpenCLIP's 24)
    and without a projection."""
    from ms_diffusion.text import CLIPTextModel

    c = dict(text_encoder.config)
    depth = c["num_hidden_layers"] - c.pop("skip_last_layers")
    arrays = state_arrays(text_encoder)
    if depth == c["num_hidden_layers"] and not c["projection_dim"]:
        return text_encoder, arrays
    kept = build_uninitialised(CLIPTextModel, **{**c, "num_hidden_layers": depth, "projection_dim": None})
    names = set(named_parameters(kept))            # only its names and config are used, not its values
    return kept, {k: v for k, v in arrays.items() if k in names}


def write_diffusers_pipeline(folder: PathLike, *, tokenizer, text_encoder, unet, vae, scaling_factor: float,
                             scheduler_config: Mapping[str, Any], inpainting: bool = False) -> Path:
    """Write a diffusers ``StableDiffusionPipeline`` (or ``...InpaintPipeline``) folder that ``from_pretrained``
    loads: ``model_index.json``, ``tokenizer/``, ``text_encoder/`` (transformers), ``unet/``, ``vae/``,
    ``scheduler/`` (DDIM with ``scheduler_config``). Written beside ``folder`` and renamed into place; an
    existing non-empty ``folder`` is refused."""
    import json
    import shutil

    from ms_diffusion import __version__
    from ms_diffusion.interop import diffusers as dif
    from ms_diffusion.interop.clip import transformers_text_config
    from ms_diffusion.interop.torch_io import write_weights

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConversionError(f"{folder} exists and is not an empty folder; choose a new output folder")
    staging = folder.with_name(f".{folder.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        tokenizer.save(staging / "tokenizer")
        text, text_arrays = _truncated_text_encoder(text_encoder)
        text_config = transformers_text_config(text)
        (staging / "text_encoder").mkdir()
        (staging / "text_encoder" / "config.json").write_text(json.dumps(text_config, indent=2) + "\n")
        write_weights(staging / "text_encoder" / "model.safetensors",
                      text_encoder_plan(text).to_torch(text_arrays), metadata={"format": "pt"})
        for part, config, plan, arrays in (
                ("unet", dif.diffusers_unet_config(unet), dif.unet_plan(unet), state_arrays(unet)),
                ("vae", {**dif.diffusers_vae_config(vae), "scaling_factor": float(scaling_factor)},
                 dif.vae_plan(vae), state_arrays(vae))):
            (staging / part).mkdir()
            config["_diffusers_version"] = dif.DIFFUSERS_VERSION
            (staging / part / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            write_weights(staging / part / dif.WEIGHTS_NAME, plan.to_torch(arrays))
        (staging / "scheduler").mkdir()
        scheduler = {"_class_name": "DDIMScheduler", "_diffusers_version": dif.DIFFUSERS_VERSION,
                     **dict(scheduler_config)}
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index = {"_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
                 "_diffusers_version": dif.DIFFUSERS_VERSION, "_ms_diffusion_version": __version__, **_PIPELINE_INDEX}
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder
