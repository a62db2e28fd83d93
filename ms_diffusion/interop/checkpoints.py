"""Converted weights <-> ms_diffusion files.

* A converted diffusion model (or autoencoder) is written like a training run's checkpoint:
  ``.ckpt`` with groups ``online.*`` and ``ema.*`` (``io.checkpoint.save_checkpoint``) or a
  ``.safetensors`` export of one weight set (``export_safetensors``). Its metadata holds the
  experiment config (and a latent diffusion's ``first_stage`` architecture), so
  ``pipeline.load_diffusion`` -- ``sample.py --ckpt`` -- rebuilds it from the file alone. A
  source without EMA weights gets its one set in both groups (metadata ``has_ema: false``). There
  is no optimizer state: such a file samples (or seeds a new run); it does not resume one.
* A converted network that is not a whole model (an ldm / diffusers UNet without its autoencoder)
  is a *network file*: ``.safetensors`` whose metadata holds the ``model:`` section
  (``{"network": {"type": "unet_ldm", ...}}``); ``load_network`` rebuilds it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from mindspore import nn

from ms_diffusion.io.state import ConversionError, load_arrays_into
from ms_diffusion.interop.torch_io import PathLike

__all__ = ["Converted", "save_converted", "read_ms_checkpoint", "build_from_config", "build_network_section",
           "load_network", "is_network_file", "autoencoder_experiment"]


@dataclass
class Converted:
    """Converted weights in our names, what to build them into, and where they came from.

    ``config``: an experiment config (a diffusion model or an autoencoder), or None for a bare
    network described by ``network`` (a ``model:`` section). ``first_stage``: a latent
    diffusion's autoencoder ``model:`` section (its weights are among ``online`` / ``ema``).
    """

    config: Optional[Dict[str, Any]]
    online: Dict[str, np.ndarray]
    ema: Optional[Dict[str, np.ndarray]] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    network: Optional[Dict[str, Any]] = None
    first_stage: Optional[Dict[str, Any]] = None

    def weights(self, which: str = "ema") -> Dict[str, np.ndarray]:
        """The ``ema`` (the online set when the source had none) or ``online`` weights."""
        if which not in ("ema", "online"):
            raise ValueError(f"weights must be 'ema' or 'online', got {which!r}")
        return self.ema if which == "ema" and self.ema is not None else self.online


def build_network_section(section: Mapping[str, Any]) -> nn.Cell:
    """A network from a ``model:`` section ({"type": registered name, **constructor arguments}), validated by
    ``models.build_network``; a bad section raises ConversionError."""
    from ms_diffusion.models import build_network
    from ms_diffusion.registry import ConfigError

    try:
        return build_network(section)
    except ConfigError as err:
        raise ConversionError(f"the recorded network section does not build: {err}") from None


# LPIPSWithDiscriminator options an ldm lossconfig may carry over
_LOSS_KEYS = ("disc_start", "logvar_init", "kl_weight", "pixelloss_weight", "disc_num_layers", "disc_in_channels",
              "disc_factor", "disc_weight", "perceptual_weight", "use_actnorm", "disc_loss")


def autoencoder_experiment(section: Mapping[str, Any], loss: Optional[Mapping[str, Any]] = None,
                           experiment: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """An autoencoder experiment config for a converted ``AutoencoderKL`` ({"ddconfig", "embed_dim"}).

    ``loss``: ldm's LPIPSWithDiscriminator params when the source has them; otherwise ldm kl-f8's
    ``disc_start`` (the loss matters only for fine-tuning; its weights are not part of a conversion)."""
    config = dict(experiment or {})
    config.setdefault("name", "converted-autoencoder")
    config.pop("diffusion", None)
    config["model"] = {"type": "autoencoder_kl", **section}
    config["loss"] = {"type": "lpips_discriminator", "disc_start": 50001,
                      **{k: v for k, v in dict(loss or {}).items() if k in _LOSS_KEYS}}
    return config


def build_from_config(config: Mapping[str, Any], first_stage: Optional[Mapping[str, Any]] = None,
                      text_encoder: Optional[Mapping[str, Any]] = None):
    """(ExperimentConfig, built model) for an experiment config dict: the diffusion, or the autoencoder of an
    autoencoder experiment. ``first_stage``: a latent diffusion's autoencoder section, ``text_encoder``: its
    pretrained text encoder's (both built, not loaded)."""
    from ms_diffusion.config import config_from_dict
    from ms_diffusion.experiment import build_diffusion, build_model

    cfg = config_from_dict(dict(config))
    if getattr(cfg, "is_autoencoder", False):
        return cfg, build_model(cfg)
    extra = {"first_stage_model": build_network_section(first_stage)} if first_stage else {}
    if text_encoder:
        extra["text_encoder"] = build_network_section(text_encoder)
    return cfg, build_diffusion(cfg, **extra)


def _check_loads(cell: nn.Cell, arrays: Mapping[str, np.ndarray], what: str) -> None:
    try:
        load_arrays_into(cell, arrays)
    except ConversionError as err:
        raise ConversionError(f"converted {what} weights do not fit the model built from the converted config: "
                              f"{err}") from None


def save_converted(converted: Converted, path: PathLike, weights: str = "ema") -> Path:
    """Write ``converted``: a model as ``.ckpt`` (online + ema groups) or ``.safetensors`` (the ``weights``
    set), a bare network as ``.safetensors``. The weights are loaded into a model built from the recorded
    config first, so a file that would not load back is never written."""
    from ms_diffusion.io.checkpoint import export_safetensors, save_checkpoint

    p = Path(path)
    provenance = dict(converted.meta)
    if converted.config is None:
        if converted.network is None:
            raise ConversionError("nothing to save: no config and no network section")
        if p.suffix != ".safetensors":
            raise ConversionError(f"a bare {converted.network.get('type')} network is written as .safetensors (a "
                                  f".ckpt is a whole model that sample.py runs), got {p.name}")
        _check_loads(build_network_section(converted.network), converted.online, "network")
        meta = {"network": converted.network, "weights": provenance.get("weights", "online"),
                "converted_from": provenance}
        return export_safetensors(p, converted.online, meta)
    _, model = build_from_config(converted.config, converted.first_stage)
    for group in ("online", "ema"):
        _check_loads(model, converted.weights(group), group)
    meta: Dict[str, Any] = {"config": converted.config, "step": provenance.get("step"),
                            "has_ema": converted.ema is not None, "converted_from": provenance}
    if converted.first_stage is not None:
        meta["first_stage"] = {"model": converted.first_stage, "path": provenance.get("path"), "sha256": None,
                               "step": provenance.get("step")}
    if p.suffix == ".ckpt":
        tensors = {f"online.{k}": v for k, v in converted.online.items()}
        tensors.update({f"ema.{k}": v for k, v in converted.weights("ema").items()})
        return save_checkpoint(p, tensors, meta)
    if p.suffix == ".safetensors":
        which = "ema" if weights == "ema" and converted.ema is not None else "online"
        meta["weights"] = which
        return export_safetensors(p, converted.weights(which), meta)
    raise ConversionError(f"unknown output type {p.suffix!r}: write .ckpt (online + EMA weights) or .safetensors "
                          f"(one weight set)")


def is_network_file(path: PathLike) -> bool:
    """True for a ``.safetensors`` network file written by ``save_converted`` (metadata ``network``)."""
    from ms_diffusion.io.checkpoint import META_KEY
    from ms_diffusion.io.safetensors_io import read_safetensors_metadata

    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    try:
        return "network" in json.loads(read_safetensors_metadata(p).get(META_KEY, "{}"))
    except (OSError, ValueError):
        return False      # not readable as one: the checkpoint readers name the problem


def load_network(path: PathLike) -> Tuple[nn.Cell, Dict[str, np.ndarray], Dict[str, Any]]:
    """A network file -> (network with its weights loaded, {name: array}, metadata); ``experiment.load_network_file``
    with its errors as ConversionError."""
    from ms_diffusion.experiment import load_network_file
    from ms_diffusion.io.checkpoint import CheckpointError

    try:
        return load_network_file(path)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None


def read_ms_checkpoint(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, Dict[str, np.ndarray]], Dict[str, Any]]:
    """An ms_diffusion checkpoint (run folder, ``.ckpt`` or ``.safetensors``): (config dict, {group: arrays}, meta).

    Groups are ``online`` and ``ema`` of a ``.ckpt``; a ``.safetensors`` export has the one set its
    metadata names (``io.weights.read_weight_groups``); a file that is not one raises ConversionError.
    """
    from ms_diffusion.io.checkpoint import CheckpointError
    from ms_diffusion.io.weights import read_weight_groups

    try:
        p, groups, meta = read_weight_groups(path)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    meta = dict(meta)
    meta["path"] = str(p)
    return meta["config"], groups, meta
