"""CLIP text encoders from PyTorch: ``transformers`` (SD 1.x, diffusers' ``text_encoder/``) and open_clip
(SD 2.x's OpenCLIP tower), both ways, through the shared plan engine.

=======================================  ==========================================================
source                                   ours
=======================================  ==========================================================
``CLIPTextModel`` folder / state dict    ``CLIPTextModel`` (names under ``text_model.``; q/k/v fused)
``CLIPTextModelWithProjection``          the same with ``projection_dim`` (``text_projection``)
open_clip ``CLIP`` text tower            ``CLIPTextModel(hidden_act="gelu", projection_dim=...)``;
                                         ``text_projection`` stored transposed
=======================================  ==========================================================
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ms_diffusion.interop.names import OPEN_CLIP_TEXT, TRANSFORMERS_CLIP_TEXT
from ms_diffusion.interop.plan import Plan, build_plan
from ms_diffusion.interop.torch_io import PathLike, read_diffusers_folder
from ms_diffusion.io.state import ConversionError, build_uninitialised, load_arrays_into
from ms_diffusion.text.clip import CLIPTextModel

__all__ = ["text_encoder_plan", "text_encoder_kwargs_from_transformers", "transformers_text_config",
           "text_encoder_kwargs_from_open_clip", "text_encoder_from_transformers",
           "text_encoder_from_transformers_state", "CLIP_TEXT_SOURCES"]

CLIP_TEXT_SOURCES = ("transformers", "open_clip")
_TRANSFORMERS_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_DROPPED = {
    "transformers": {"text_model.embeddings.position_ids": "the positions 0..N-1 (a buffer older transformers saved)"},
    "open_clip": {"logit_scale": "CLIP's contrastive temperature (not part of the text encoder)",
                  "attn_mask": "the causal mask (rebuilt here)"},
}


def text_encoder_plan(model: CLIPTextModel, source: str = "transformers", torch_prefix: str = "",
                      ms_prefix: str = "") -> Plan:
    """How ``model``'s parameters sit in a ``transformers`` or ``open_clip`` state dict (both directions)."""
    if source not in CLIP_TEXT_SOURCES:
        raise ValueError(f"source must be one of {CLIP_TEXT_SOURCES}, got {source!r}")
    spec = TRANSFORMERS_CLIP_TEXT if source == "transformers" else OPEN_CLIP_TEXT
    plan = build_plan(model, spec, torch_prefix=torch_prefix, ms_prefix=ms_prefix)
    plan.dropped.update({torch_prefix + k: v for k, v in _DROPPED[source].items()})
    return plan


def text_encoder_kwargs_from_transformers(config: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """A transformers ``CLIPTextConfig`` (config.json) -> (our constructor arguments, what does not map)."""
    problems: List[str] = []
    if config.get("model_type") == "clip" or "text_config" in config:
        config = config.get("text_config") or {}          # a whole CLIPModel's config: its text half
    arch = config.get("architectures") or ["CLIPTextModel"]
    if arch[0] not in _TRANSFORMERS_CLASSES:
        problems.append(f"architecture {arch[0]} (convertible: {', '.join(_TRANSFORMERS_CLASSES)})")
    act = config.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        problems.append(f"hidden_act {act!r} (quick_gelu or gelu)")
    kwargs = dict(vocab_size=config.get("vocab_size", 49408), hidden_size=config.get("hidden_size", 512),
                  intermediate_size=config.get("intermediate_size", 2048),
                  num_hidden_layers=config.get("num_hidden_layers", 12),
                  num_attention_heads=config.get("num_attention_heads", 8),
                  max_position_embeddings=config.get("max_position_embeddings", 77), hidden_act=act,
                  layer_norm_eps=config.get("layer_norm_eps", 1e-5), eos_token_id=config.get("eos_token_id", 2))
    if kwargs["eos_token_id"] == 2:
        # transformers' legacy configs say eos 2 and pool at the highest id, which is CLIP's end token
        kwargs["eos_token_id"] = kwargs["vocab_size"] - 1
    if arch[0] == "CLIPTextModelWithProjection":
        kwargs["projection_dim"] = config.get("projection_dim", 512)
    return kwargs, problems


def transformers_text_config(model: CLIPTextModel) -> Dict[str, Any]:
    """Our ``CLIPTextModel`` -> the config.json ``transformers.CLIPTextModel[WithProjection]`` loads."""
    c = model.config
    config = {k: c[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                                "eos_token_id")}
    config.update(model_type="clip_text_model", bos_token_id=c["eos_token_id"] - 1, pad_token_id=1,
                  architectures=["CLIPTextModelWithProjection" if c["projection_dim"] else "CLIPTextModel"])
    if c["projection_dim"]:
        config["projection_dim"] = c["projection_dim"]
    return config


def text_encoder_kwargs_from_open_clip(state: Mapping[str, np.ndarray], heads: Optional[int] = None,
                                       prefix: str = "") -> Dict[str, Any]:
    """Our constructor arguments for the text tower in an open_clip state dict (sizes read off the tensors).

    open_clip does not store the head count; its configs use width / 64 (ViT-H/14: 16, ViT-bigG: 20)."""
    def get(name):
        if prefix + name not in state:
            raise ConversionError(f"not an open_clip text tower: {prefix + name} is missing")
        return np.shape(state[prefix + name])

    vocab, width = get("token_embedding.weight")
    positions = get("positional_embedding")[0]
    layers = 0
    while f"{prefix}transformer.resblocks.{layers}.ln_1.weight" in state:
        layers += 1
    hidden = get("transformer.resblocks.0.mlp.c_fc.weight")[0]
    kwargs = dict(vocab_size=vocab, hidden_size=width, intermediate_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads or max(1, width // 64), max_position_embeddings=positions,
                  hidden_act="gelu", eos_token_id=vocab - 1)
    if prefix + "text_projection" in state:
        kwargs["projection_dim"] = get("text_projection")[1]
    return kwargs


def text_encoder_from_transformers_state(config: Mapping[str, Any], state: Mapping[str, np.ndarray], **overrides
                                         ) -> Tuple[Dict[str, Any], CLIPTextModel, Dict[str, np.ndarray]]:
    """A transformers CLIPTextModel's config.json and state dict -> (our constructor arguments, the model built
    from them and ``overrides`` with its parameters uninitialised, the weights in its names); ConversionError
    when it does not map."""
    kwargs, problems = text_encoder_kwargs_from_transformers(config)
    if problems:
        raise ConversionError("this CLIP text encoder does not map onto ours: " + "; ".join(problems))
    model = build_uninitialised(CLIPTextModel, **{**kwargs, **overrides})
    return kwargs, model, text_encoder_plan(model).to_ms(state)


def text_encoder_from_transformers(folder: PathLike, subfolder: Optional[str] = None,
                                   **overrides) -> CLIPTextModel:
    """A transformers CLIPTextModel folder (a diffusers pipeline's ``text_encoder/``) -> our model with its
    weights. ``overrides`` (e.g. ``skip_last_layers``) go to the constructor."""
    config, state = read_diffusers_folder(folder, subfolder)
    _, model, arrays = text_encoder_from_transformers_state(config, state, **overrides)
    state = None                    # the converted dict alone holds the weights now
    load_arrays_into(model, arrays, consume=True)
    model.set_train(False)
    return model
