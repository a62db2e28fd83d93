"""Building an experiment from its config: the network, the diffusion around it, the loss, the data source.

``config`` parses; the registries beside each family (``models.MODELS``, ``diffusion.DIFFUSIONS``,
``losses.LOSSES``, ``data.DATASETS``) construct; this module assembles the parts an experiment needs and
hands built parts down (a latent diffusion's autoencoder is loaded here, from ``diffusion.first_stage``,
and given to the diffusion, as is a pretrained text encoder from ``diffusion.text.encoder``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from mindspore import nn

from ms_diffusion.config import ExperimentConfig, config_from_dict
from ms_diffusion.data import DATASETS, ImageSource
from ms_diffusion.diffusion.latent import LatentSpace
from ms_diffusion.diffusion.registry import DIFFUSIONS, LATENT_TYPES
from ms_diffusion.io.checkpoint import CheckpointError, load_safetensors
from ms_diffusion.io.hashing import file_sha256
from ms_diffusion.io.state import ConversionError, build_uninitialised, load_arrays_into, state_arrays
from ms_diffusion.io.weights import read_weights
from ms_diffusion.losses import LOSSES, LPIPSWithDiscriminator
from ms_diffusion.models import MODELS, AutoencoderKL, build_network
from ms_diffusion.registry import ConfigError
from ms_diffusion.text import CLIPTextModel

__all__ = ["build_network", "build_model", "build_diffusion", "build_recorded_diffusion", "build_ema_copy",
           "build_autoencoder_loss", "build_data_source", "run_prompts", "TOKENIZER_DIR",
           "run_tokenizer_folder", "use_run_tokenizer", "save_run_tokenizer", "check_tokenizer",
           "data_geometry", "load_autoencoder", "load_network_file", "load_text_encoder", "load_weights_into"]


def build_model(cfg: ExperimentConfig) -> nn.Cell:
    """The network of ``cfg.model``."""
    return MODELS.build(cfg.model)


def build_diffusion(cfg: ExperimentConfig, model: Optional[nn.Cell] = None,
                    first_stage_model: Optional[AutoencoderKL] = None,
                    text_encoder: Optional[CLIPTextModel] = None) -> nn.Cell:
    """The diffusion of ``cfg.diffusion`` around ``model`` (default: built from ``cfg.model``).

    A ``latent`` diffusion gets ``first_stage_model`` when given (e.g. rebuilt from a checkpoint's
    metadata), else the autoencoder its ``first_stage`` names, loaded and frozen; the loaded one's
    provenance is kept as ``first_stage_info`` (path, sha256, step, model section) for the checkpoints.
    Likewise a text diffusion whose ``text.encoder`` names a pretrained CLIP text encoder gets
    ``text_encoder`` when given, else that file loaded, with ``text_encoder_info`` (path, sha256, network).
    """
    if cfg.diffusion is None:
        raise ConfigError(f"model.type {cfg.model['type']!r} is an autoencoder, not a diffusion model; train it "
                          f"with train.py and use its run as diffusion.first_stage of a `latent` config")
    model = model if model is not None else build_model(cfg)
    if cfg.diffusion["type"] not in LATENT_TYPES:
        return DIFFUSIONS.build(cfg.diffusion, model=model)
    info = None
    if first_stage_model is None and cfg.diffusion.get("first_stage"):
        try:
            first_stage_model, info = load_autoencoder(cfg.diffusion["first_stage"])
        except CheckpointError as err:
            raise ConfigError(f"diffusion.first_stage: {err}") from None
    text_info = None
    text = cfg.diffusion.get("text")
    if text_encoder is None and isinstance(text, dict) and text.get("encoder"):
        try:
            text_encoder, text_info = load_text_encoder(text["encoder"])
        except CheckpointError as err:
            raise ConfigError(f"diffusion.text.encoder: {err}") from None
    diffusion = DIFFUSIONS.build(cfg.diffusion, model=model, first_stage_model=first_stage_model,
                                 text_encoder=text_encoder)
    diffusion.first_stage_info = info
    diffusion.text_encoder_info = text_info
    return diffusion


def build_recorded_diffusion(cfg: ExperimentConfig, meta: Mapping[str, Any]) -> nn.Cell:
    """The diffusion of ``cfg`` whose pretrained parts are those a checkpoint's metadata ``meta`` records (a
    latent diffusion's ``first_stage``, a ``text_encoder``), built from their recorded architectures and left
    uninitialised: their weights are in that checkpoint, and the files they were first read from are not
    needed. The records are kept as ``first_stage_info`` / ``text_encoder_info`` for the next checkpoints."""
    parts = {}
    if cfg.diffusion and cfg.diffusion["type"] in LATENT_TYPES and meta.get("first_stage"):
        parts["first_stage_model"] = build_uninitialised(build_network, meta["first_stage"]["model"])
    if meta.get("text_encoder"):
        parts["text_encoder"] = build_uninitialised(build_network, meta["text_encoder"]["network"])
    diffusion = build_diffusion(cfg, **parts)
    if "first_stage_model" in parts:
        diffusion.first_stage_info = dict(meta["first_stage"])
    if "text_encoder" in parts:
        diffusion.text_encoder_info = dict(meta["text_encoder"])
    return diffusion


def build_ema_copy(cfg: ExperimentConfig, diffusion: nn.Cell) -> nn.Cell:
    """A second diffusion of ``cfg`` to hold the EMA weights of ``diffusion``; a latent diffusion's frozen first
    stage is rebuilt from ``diffusion``'s, weights copied, rather than loaded from its file again."""
    if not isinstance(diffusion, LatentSpace):
        return build_diffusion(cfg)
    online = diffusion.first_stage_model
    first_stage = _copy_of(online, AutoencoderKL, ddconfig=dict(online.ddconfig), embed_dim=online.embed_dim)
    for param in first_stage.get_parameters():
        param.requires_grad = False
    text_encoder = None
    if getattr(diffusion, "text_encoder_info", None):
        pretrained = diffusion.model.cond_stage_model.transformer
        text_encoder = _copy_of(pretrained, CLIPTextModel, **pretrained.config)
    return build_diffusion(cfg, first_stage_model=first_stage, text_encoder=text_encoder)


def _copy_of(cell: nn.Cell, factory, **kwargs) -> nn.Cell:
    """``factory(**kwargs)`` (``cell``'s architecture) holding ``cell``'s weights, in evaluation mode."""
    copy = build_uninitialised(factory, **kwargs)
    load_arrays_into(copy, state_arrays(cell))
    copy.set_train(False)
    return copy


def build_autoencoder_loss(cfg: ExperimentConfig) -> LPIPSWithDiscriminator:
    """The ``loss:`` section of an autoencoder config as its loss Cell (discriminator, logvar, LPIPS)."""
    if cfg.loss is None:
        raise ConfigError("this config has no `loss:` section (only autoencoder models have one)")
    return LOSSES.build(cfg.loss)


def data_geometry(built: nn.Cell) -> Tuple[Tuple[int, int], int]:
    """((H, W), channels) of the training images of a built diffusion or autoencoder.

    A latent diffusion trains on images of its first stage's size, not on its latents.
    """
    if isinstance(built, AutoencoderKL):
        res = int(built.ddconfig["resolution"])
        return (res, res), built.in_channels
    if isinstance(built, LatentSpace):
        return tuple(built.pixel_size), built.first_stage_model.in_channels
    return tuple(built.image_size), built.channels


def build_data_source(cfg: ExperimentConfig, built: nn.Cell, shard_id: int = 0, num_shards: int = 1) -> ImageSource:
    """The data source of ``cfg.data`` shaped for ``built`` (a built diffusion or autoencoder), this rank's shard."""
    size, channels = data_geometry(built)
    return DATASETS.build(cfg.data, image_size=size, channels=channels, seed=cfg.seed, num_shards=num_shards,
                          shard_id=shard_id)


def run_prompts(cfg: ExperimentConfig, source: ImageSource) -> List[str]:
    """The prompts a text-conditional run's grids and evaluations cycle: ``sample.prompts``, else the data's
    example prompts (captioned Fashion-MNIST: all 40 class x attribute prompts)."""
    return list(cfg.sample.prompts or source.example_prompts(cfg.train.num_samples))


#: where a text-conditional run keeps the tokenizer it was trained with (a diffusers-style tokenizer/ folder)
TOKENIZER_DIR = "tokenizer"


def run_tokenizer_folder(run_dir: Union[str, Path]) -> Optional[Path]:
    """The run folder's copy of its tokenizer, if it has one."""
    folder = Path(run_dir) / TOKENIZER_DIR
    return folder if (folder / "vocab.json").is_file() else None


def use_run_tokenizer(cfg: ExperimentConfig, run_dir: Union[str, Path]) -> Optional[Path]:
    """Point a text config's ``diffusion.text.tokenizer`` at the run folder's copy (what the run was trained
    with, whatever has become of the file the config named); returns that copy, or None (no text / no copy)."""
    text = (cfg.diffusion or {}).get("text")
    folder = run_tokenizer_folder(run_dir)
    if not isinstance(text, dict) or folder is None:
        return None
    cfg.diffusion["text"] = dict(text, tokenizer=str(folder))
    return folder


def save_run_tokenizer(tokenizer, run_dir: Union[str, Path]) -> Path:
    """Write ``tokenizer`` (a ``text.CLIPTokenizer``) to ``run_dir/tokenizer/``, each file replaced atomically
    (a torn copy would not match the checkpoints' fingerprint and is refused, never used)."""
    import os
    import shutil
    import tempfile

    folder = Path(run_dir) / TOKENIZER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=run_dir))
    try:
        tokenizer.save(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_tokenizer(diffusion: nn.Cell, meta: Mapping[str, Any], where: Union[str, Path]) -> None:
    """A text model's tokenizer must be the one its checkpoint was trained with (``meta["tokenizer_sha256"]``)."""
    expected = meta.get("tokenizer_sha256")
    tokenizer = getattr(diffusion, "tokenizer", None)
    if expected is None or tokenizer is None:
        return
    found = tokenizer.fingerprint()
    if found == expected:
        return
    raise CheckpointError(f"{where}: this text model was trained with another tokenizer (sha256 {expected[:12]}) than "
                          f"the one its config now gives ({tokenizer.vocab_size} tokens, sha256 "
                          f"{found[:12]}): the same prompts would become other token ids. Keep "
                          f"the model in its run folder (whose {TOKENIZER_DIR}/ holds the one it was trained with), "
                          f"or point diffusion.text.tokenizer at that tokenizer")


def load_weights_into(cell: nn.Cell, arrays: Mapping[str, np.ndarray], p: Path) -> None:
    """Load ``arrays`` into ``cell``; a mismatch is a CheckpointError naming the file ``p``."""
    try:
        load_arrays_into(cell, arrays)
    except ConversionError as err:
        raise CheckpointError(f"{p}: {err}") from None


def load_autoencoder(path: Union[str, Path]) -> Tuple[AutoencoderKL, Dict[str, Any]]:
    """A trained autoencoder (run folder, step checkpoint or model.safetensors) as a frozen first stage.

    Returns (AutoencoderKL in eval mode with every parameter frozen, info) with info = {"path",
    "sha256" of the file, "step", "model": its config's model section}: what a latent diffusion
    records so that its own checkpoints rebuild the first stage without this file.
    """
    p, arrays, meta = read_weights(path, "online")
    cfg = config_from_dict(meta["config"])
    if not cfg.is_autoencoder:
        raise CheckpointError(f"{str(p)!r} is a {cfg.model['type']!r} checkpoint, not an autoencoder; name the run "
                              f"folder of a model trained with an autoencoder config (model.type autoencoder_kl)")
    autoencoder = build_model(cfg)
    load_weights_into(autoencoder, arrays, p)
    for param in autoencoder.get_parameters():
        param.requires_grad = False
    autoencoder.set_train(False)
    info = {"path": str(p), "sha256": file_sha256(p), "step": meta.get("step"), "model": dict(meta["config"]["model"])}
    return autoencoder, info




def load_network_file(path: Union[str, Path], kind: Optional[str] = None, fix: str = ""
                      ) -> Tuple[nn.Cell, Dict[str, np.ndarray], Dict[str, Any]]:
    """A network file (``.safetensors`` whose metadata has a ``network`` section, as ``convert_checkpoint.py``
    writes) -> (the network that section builds, holding the file's weights, in eval mode; {name: array};
    metadata). ``kind``: the network type required (else CheckpointError, ending with ``fix``). Every
    problem raises CheckpointError naming the file."""
    p = Path(path).expanduser()
    arrays, meta = load_safetensors(p)
    network = meta.get("network") or {}
    if not network.get("type") or (kind and network["type"] != kind):
        what = f"a {network['type']!r} network" if network.get("type") else "no network section (a model's export?)"
        raise CheckpointError(f"{str(p)!r} holds {what}" + (f", not a {kind!r} network" if kind else "")
                              + (f"; {fix}" if fix else ""))
    try:
        built = build_uninitialised(build_network, network)       # every weight is loaded next
    except ConfigError as err:
        raise CheckpointError(f"{str(p)!r}: its recorded network section does not build: {err}") from None
    load_weights_into(built, arrays, p)
    built.set_train(False)
    return built, arrays, meta


def load_text_encoder(path: Union[str, Path]) -> Tuple[CLIPTextModel, Dict[str, Any]]:
    """A pretrained CLIP text encoder's network file (``clip_text``, as ``convert_checkpoint.py from-diffusers
    --subfolder text_encoder`` writes it) -> (``CLIPTextModel`` in eval mode, info), info = {"path", "sha256",
    "network": its model section}: what a text diffusion records so that its checkpoints rebuild the encoder
    without this file."""
    p = Path(path).expanduser()
    convert = (f"convert a CLIP text encoder with: python scripts/convert_checkpoint.py from-diffusers PIPELINE_FOLDER "
               f"{p.with_suffix('.safetensors').name} --subfolder text_encoder")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{str(p)!r} is not a text encoder's network file (.safetensors); {convert}")
    encoder, _, meta = load_network_file(p, "clip_text", convert)
    return encoder, {"path": str(p), "sha256": file_sha256(p), "network": dict(meta["network"])}
