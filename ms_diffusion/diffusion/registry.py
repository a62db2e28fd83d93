"""Diffusion objectives by config name: a ``diffusion:`` section is ``{type: name, **arguments}``.

The network (and a latent diffusion's first stage) are built elsewhere and handed in.
"""
from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from ms_diffusion.diffusion.edm import EDMDiffusion
from ms_diffusion.diffusion.flow import FlowMatching
from ms_diffusion.diffusion.gaussian import GaussianDiffusion
from ms_diffusion.diffusion.latent import (LDM_DIFFUSION_DEFAULTS, ClassEmbedder, LatentDiffusion, LatentEDM,
                                           LatentFlowMatching, LatentSpace)
from ms_diffusion.models import AutoencoderKL, UNetModel
from ms_diffusion.registry import ConfigError, Registry
from ms_diffusion.text import CLIPTextEmbedder, CLIPTextModel, CLIPTokenizer, TokenizerFileError, default_bpe_file

__all__ = ["DIFFUSIONS", "LATENT_TYPES", "build_latent_diffusion", "build_text_encoder", "build_tokenizer",
           "TEXT_DEFAULTS"]

DIFFUSIONS = Registry("diffusion", build_only=("model", "first_stage_model", "text_encoder"))


_CLASS_CONDITIONINGS = (None, "crossattn", "adm")


def build_latent_diffusion(model: UNetModel, *, first_stage: Optional[str] = None,
                           first_stage_model: Optional[AutoencoderKL] = None, conditioning_key: Optional[str] = None,
                           num_classes: Optional[int] = None, cond_drop_prob: float = 0.1, scale_factor: float = 1.0,
                           scale_by_std: bool = False, image_size: Optional[int] = None, auto_normalize: bool = True,
                           text: Optional[Dict[str, Any]] = None, text_encoder: Optional[CLIPTextModel] = None,
                           latent_class: type = LatentDiffusion, **diffusion_kwargs) -> LatentSpace:
    """The ``latent`` diffusion type: ``LatentDiffusion`` around an ldm ``UNetModel`` and a frozen autoencoder
    (``latent_edm`` / ``latent_flow``: ``latent_class`` ``LatentEDM`` / ``LatentFlowMatching``, the same otherwise).

    ``first_stage_model``: the frozen autoencoder, handed in by the code that built it;
    ``first_stage`` is the config's record of where it came from (an autoencoder run folder, step
    checkpoint or ``model.safetensors`` written by ``train.py``), loaded by
    ``experiment.build_diffusion`` -- the latent diffusion's checkpoints hold the first stage's
    weights too and load without it.

    Class conditioning from the data's labels: ``conditioning_key: crossattn`` with ``num_classes``
    (a ``ClassEmbedder`` into the unet's ``context_dim``) or ``adm`` (the unet's ``num_classes`` is
    N + 1: N classes and the null class). Any ``GaussianDiffusion`` option (``timesteps``,
    ``sampling_timesteps``, ``learn_logvar``, ...) may follow; unset ones take ldm's defaults.

    Text conditioning from the data's captions: ``conditioning_key: crossattn`` with a ``text:`` section
    (``TEXT_DEFAULTS``; see ``build_text_encoder``): a CLIP tokenizer and a CLIP text transformer of
    width ``model.context_dim`` trained with the UNet (ldm's text-to-image recipe from scratch), or the
    pretrained one ``text.encoder`` names, frozen (ldm's ``FrozenCLIPEmbedder``), handed in as
    ``text_encoder`` by ``experiment.build_diffusion``, which loads it; ``cond_drop_prob`` is then the
    prompt dropout.
    """
    if text is not None:
        options = dict(scale_factor=scale_factor, scale_by_std=scale_by_std, image_size=image_size,
                       auto_normalize=auto_normalize)
        return _build_text_latent(model, first_stage, first_stage_model, conditioning_key, num_classes,
                                  cond_drop_prob, text, text_encoder, options, latent_class, diffusion_kwargs)
    if conditioning_key not in _CLASS_CONDITIONINGS:
        raise ConfigError(f"diffusion.conditioning_key {conditioning_key!r}: a config trains on images and class "
                          f"labels, so choose one of {list(_CLASS_CONDITIONINGS)} (concat / hybrid conditionings "
                          f"need conditioning inputs: use LatentDiffusion from Python)")
    cond_stage = None
    if conditioning_key == "crossattn":
        if num_classes is None:
            raise ConfigError("diffusion.num_classes: conditioning_key crossattn embeds class labels; set the number "
                              "of classes")
        if model.context_dim is None:
            raise ConfigError("model.context_dim: crossattn conditioning needs use_spatial_transformer: true and "
                              "context_dim in the unet_ldm model")
        cond_stage = ClassEmbedder(model.context_dim, num_classes)
    elif conditioning_key == "adm":
        if model.num_classes is None or (num_classes is not None and model.num_classes != num_classes + 1):
            raise ConfigError(f"model.num_classes: adm conditioning needs the unet's num_classes = classes + 1 (the "
                              f"null class); got {model.num_classes} for num_classes={num_classes}")
    elif num_classes is not None:
        raise ConfigError("diffusion.num_classes is set but conditioning_key is not: choose crossattn or adm")
    _check_first_stage(model, first_stage, first_stage_model)
    ldm = latent_class(first_stage_model, model, image_size=image_size, conditioning_key=conditioning_key,
                          cond_stage_model=cond_stage, cond_drop_prob=cond_drop_prob, scale_factor=scale_factor,
                          scale_by_std=scale_by_std, auto_normalize=auto_normalize, **diffusion_kwargs)
    return ldm


def _check_first_stage(model: UNetModel, first_stage: Optional[str], first_stage_model: Optional[AutoencoderKL]):
    if first_stage_model is None:
        if not first_stage:
            raise ConfigError("diffusion.first_stage: the latent diffusion needs its autoencoder: set it to the run "
                              "folder (or checkpoint) of an autoencoder trained with train.py")
        raise ConfigError(f"diffusion.first_stage {first_stage!r}: build a latent diffusion from a config with "
                          f"ms_diffusion.experiment.build_diffusion, which loads the autoencoder and hands it in")
    latent_channels = first_stage_model.embed_dim
    if (model.in_channels, model.out_channels) != (latent_channels, latent_channels):
        raise ConfigError(f"model.in_channels / out_channels are {model.in_channels} / {model.out_channels} but the "
                          f"first stage's latents have {latent_channels} channels (its embed_dim); set both to "
                          f"{latent_channels}")


#: the ``diffusion.text`` section: tokenizer (a tokenizer/ folder with vocab.json + merges.txt, or OpenAI's
#: bpe_simple_vocab_16e6.txt.gz; null: the one the open-clip-torch wheel ships), max_length (tokens incl.
#: start and end), and either the text transformer trained with the UNet (layers, heads, mlp_ratio, act; its
#: width is model.context_dim) or ``encoder``: a pretrained CLIP text encoder's network file
#: (``convert_checkpoint.py from-diffusers PIPELINE OUT.safetensors --subfolder text_encoder``), ``frozen``
#: unless set false.
TEXT_DEFAULTS: Dict[str, Any] = {"tokenizer": None, "max_length": 77, "layers": 2, "heads": 4, "mlp_ratio": 4,
                                 "act": "quick_gelu", "encoder": None, "frozen": None}
#: what a pretrained encoder's file decides (so a text section with ``encoder`` may not set them)
_ARCHITECTURE_KEYS = ("layers", "heads", "mlp_ratio", "act")


def build_tokenizer(spec: Optional[str], max_length: int) -> CLIPTokenizer:
    """The CLIP tokenizer of ``diffusion.text.tokenizer`` (a folder, a .gz vocabulary, or None: open_clip's)."""
    try:
        if spec is None:
            if default_bpe_file() is None:
                raise ConfigError("diffusion.text.tokenizer: no tokenizer given and none found: install the CLIP "
                                  "vocabulary (pip install --no-deps open-clip-torch) or set it to a tokenizer/ "
                                  "folder (vocab.json + merges.txt) or bpe_simple_vocab_16e6.txt.gz")
            return CLIPTokenizer.from_bpe_file(max_length=max_length)
        path = Path(spec).expanduser()
        if not path.exists():
            raise ConfigError(f"diffusion.text.tokenizer: {path} does not exist (give a tokenizer/ folder with "
                              f"vocab.json + merges.txt, OpenAI's bpe_simple_vocab_16e6.txt.gz, or null for the one "
                              f"open-clip-torch ships)")
        if path.is_dir():
            return CLIPTokenizer.from_folder(path, max_length=max_length)
        return CLIPTokenizer.from_bpe_file(path, max_length=max_length)
    except (TokenizerFileError, OSError, ImportError) as err:
        raise ConfigError(f"diffusion.text.tokenizer: {err}") from None


def build_text_encoder(text: Dict[str, Any], width: int, encoder: Optional[CLIPTextModel] = None
                       ) -> Tuple[CLIPTokenizer, CLIPTextEmbedder]:
    """The tokenizer and the text encoder (ids (B, L) -> context (B, L, width)) of ``diffusion.text``: a new
    trainable transformer, or ``encoder`` (the pretrained one ``text.encoder`` names, loaded by the caller)."""
    unknown = sorted(set(text) - set(TEXT_DEFAULTS))
    if unknown:
        raise ConfigError(f"diffusion.text: unknown key(s) {unknown}; known: {sorted(TEXT_DEFAULTS)}")
    opts = {**TEXT_DEFAULTS, **text}
    max_length = int(opts["max_length"])
    if max_length < 3:
        raise ConfigError(f"diffusion.text.max_length must be >= 3 (start, a token, end), got {max_length}")
    if opts["encoder"] is None:
        if encoder is not None:
            raise ConfigError("a pretrained text encoder was handed in but diffusion.text.encoder does not name one")
        if opts["frozen"]:
            raise ConfigError("diffusion.text.frozen: a new text transformer is trained with the UNet; to use a frozen "
                              "pretrained one, set diffusion.text.encoder to its network file")
        if width % int(opts["heads"]):
            raise ConfigError(f"diffusion.text.heads ({opts['heads']}) must divide the width, model.context_dim "
                              f"({width})")
        tokenizer = build_tokenizer(opts["tokenizer"], max_length)
        encoder = CLIPTextModel(vocab_size=tokenizer.vocab_size, hidden_size=width,
                                intermediate_size=int(opts["mlp_ratio"]) * width,
                                num_hidden_layers=int(opts["layers"]), num_attention_heads=int(opts["heads"]),
                                max_position_embeddings=max_length, hidden_act=str(opts["act"]),
                                eos_token_id=tokenizer.eos_id)
        return tokenizer, CLIPTextEmbedder(encoder, frozen=False)
    if encoder is None:
        raise ConfigError(f"diffusion.text.encoder {opts['encoder']!r}: build a text diffusion from a config with "
                          f"ms_diffusion.experiment.build_diffusion, which loads the encoder and hands it in")
    fixed = sorted(k for k in _ARCHITECTURE_KEYS if k in text)
    if fixed:
        raise ConfigError(f"diffusion.text: {fixed} describe a new text transformer, but diffusion.text.encoder "
                          f"names a pretrained one whose file fixes its architecture; remove them")
    if encoder.hidden_size != width:
        raise ConfigError(f"model.context_dim is {width} but the text encoder {opts['encoder']} is "
                          f"{encoder.hidden_size} wide; set model.context_dim: {encoder.hidden_size}")
    positions = encoder.config["max_position_embeddings"]
    if max_length > positions:
        raise ConfigError(f"diffusion.text.max_length {max_length} exceeds the text encoder's {positions} positions; "
                          f"set it to at most {positions}")
    tokenizer = build_tokenizer(opts["tokenizer"], max_length)
    if tokenizer.vocab_size != encoder.config["vocab_size"]:
        raise ConfigError(f"diffusion.text.tokenizer has {tokenizer.vocab_size} tokens but the text encoder "
                          f"{opts['encoder']} embeds {encoder.config['vocab_size']}: use the tokenizer it was "
                          f"trained with (a pipeline's tokenizer/ folder)")
    frozen = True if opts["frozen"] is None else bool(opts["frozen"])
    return tokenizer, CLIPTextEmbedder(encoder, frozen=frozen)


def _build_text_latent(model, first_stage, first_stage_model, conditioning_key, num_classes, cond_drop_prob, text,
                       text_encoder, options, latent_class, diffusion_kwargs) -> LatentSpace:
    if conditioning_key != "crossattn":
        raise ConfigError(f"diffusion.text needs conditioning_key: crossattn (got {conditioning_key!r})")
    if num_classes is not None:
        raise ConfigError("diffusion.num_classes and diffusion.text exclude each other: the model is conditioned on "
                          "captions, not labels")
    if model.context_dim is None:
        raise ConfigError("model.context_dim: text conditioning needs use_spatial_transformer: true and context_dim "
                          "(the text transformer's width) in the unet_ldm model")
    if not isinstance(text, dict):
        raise ConfigError(f"diffusion.text must be a mapping (e.g. {{max_length: 16}}), got {text!r}")
    _check_first_stage(model, first_stage, first_stage_model)
    tokenizer, encoder = build_text_encoder(text, model.context_dim, text_encoder)
    ldm = latent_class(first_stage_model, model, conditioning_key="crossattn", cond_stage_model=encoder, **options,
                       **diffusion_kwargs)
    return ldm.set_text_conditioning(tokenizer, cond_drop_prob)      # the prompt dropout (host side)


def _with_diffusion_options(builder: Callable, objective: type, defaults: dict) -> Callable:
    """``builder`` (which forwards ``**diffusion_kwargs``) with a signature that lists ``objective``'s options
    with ``defaults`` (ldm's for ``latent``), so config keys are checked and coerced against them."""
    own = inspect.signature(builder)
    params = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD and p.name != "latent_class"]
    taken = {p.name for p in params}
    hints = typing.get_type_hints(objective.__init__)
    for name, p in inspect.signature(objective.__init__).parameters.items():
        if name in ("self", "model", "immiscible") or name in taken:
            continue
        params.append(p.replace(kind=p.KEYWORD_ONLY, annotation=hints.get(name, p.annotation),
                                default=defaults.get(name, p.default)))
    builder.__signature__ = own.replace(parameters=params)
    return builder


def _latent_type(latent_class: type, objective: type, defaults: dict) -> Callable:
    def build(model: UNetModel, **kwargs) -> LatentSpace:
        return build_latent_diffusion(model, latent_class=latent_class, **kwargs)

    build.__doc__ = build_latent_diffusion.__doc__
    build.__signature__ = inspect.signature(build_latent_diffusion)
    return _with_diffusion_options(build, objective, defaults)


LATENT_TYPES = ("latent", "latent_edm", "latent_flow")

DIFFUSIONS.register("gaussian", GaussianDiffusion)
DIFFUSIONS.register("edm", EDMDiffusion)
DIFFUSIONS.register("flow", FlowMatching)
DIFFUSIONS.register("latent", _latent_type(LatentDiffusion, GaussianDiffusion, LDM_DIFFUSION_DEFAULTS))
DIFFUSIONS.register("latent_edm", _latent_type(LatentEDM, EDMDiffusion, {}))
DIFFUSIONS.register("latent_flow", _latent_type(LatentFlowMatching, FlowMatching, {}))
