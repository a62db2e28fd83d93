"""Stable Diffusion 1.x / 2.x text-to-image: a diffusers pipeline folder or an original checkpoint in, images out.

    sd = StableDiffusion.from_diffusers("path/to/stable-diffusion-v1-5")   # or .from_single_file("sd-v1-5.ckpt")
    images = sd("an astronaut riding a horse", negative_prompt="blurry", guidance_scale=7.5, steps=30, seed=0)
    # (B, 3, H, W) in [0, 1]
    edited = sd.img2img("a watercolour of a horse", images, strength=0.6)
    filled = sd.inpaint("a red door", images, mask)     # mask (B, 1, H, W), 1 = repaint

The pieces are ours: ``CLIPTokenizer`` (``tokenizer/``), ``CLIPTextModel`` (``text_encoder/``), ldm's
``UNetModel`` (``unet/``) and ``AutoencoderKL`` (``vae/``) inside a ``LatentDiffusion`` whose schedule,
parameterisation (epsilon or SD 2.x's v-prediction) and sampler grid come from ``scheduler/``. As
diffusers' pipeline: the prompts and the negative (or empty) prompts are encoded once, guidance runs
both halves in one batch (uncond + s (cond - uncond)), latents start as N(0, 1) (or ``latents``), and the
VAE decodes ``latents / scaling_factor``. Every sampler of ``ms_diffusion.samplers`` can be used.

Image-to-image (SDEdit, diffusers' ``StableDiffusionImg2ImgPipeline``): the image's latent (a posterior
sample) is noised to the grid's step ``steps - int(steps * strength)`` and denoised from there.
Inpainting (diffusers' ``StableDiffusionInpaintPipeline``): an inpainting UNet (9 input channels) sees the
latents, the mask at latent resolution and the latents of the image with the masked region blanked
(``conditioning_key="hybrid"``: they are its concat conditioning); an ordinary model repaints the masked
region while the rest is blended back in after every step. Below ``strength`` 1 both start, as image-to-image
does, from the image's latents noised part-way along the grid.

Files: ``from_diffusers`` / ``save_diffusers`` (pipeline folders), ``from_single_file`` / ``save_single_file``
(original SD 1.x / 2.x checkpoints with their ldm YAML; see ``interop.sd_formats``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np
import yaml
from mindspore import Tensor

from ms_diffusion.diffusion.latent import LatentDiffusion
from ms_diffusion.interop.clip import text_encoder_from_transformers
from ms_diffusion.interop.diffusers import autoencoder_config_from_diffusers, unet_kwargs_from_diffusers
from ms_diffusion.interop.diffusers import unet_plan as diffusers_unet_plan
from ms_diffusion.interop.diffusers import vae_plan as diffusers_vae_plan
from ms_diffusion.interop.names import LDM_SCHEDULE_BUFFERS
from ms_diffusion.interop.plan import Plan
from ms_diffusion.interop.sd_formats import (read_sd_checkpoint, sd_checkpoint_state, sd_ldm_config,
                                             write_diffusers_pipeline)
from ms_diffusion.interop.torch_io import PathLike, read_diffusers_folder, write_weights
from ms_diffusion.io.state import ConversionError, build_uninitialised, load_arrays_into
from ms_diffusion.models import AutoencoderKL, UNetModel
from ms_diffusion.nn.attention import set_attention_slicing
from ms_diffusion.samplers import resolve_sampler, sampler_grid, sampler_options
from ms_diffusion.samplers.base import make_rng
from ms_diffusion.text import CLIPTextEmbedder, CLIPTextModel, CLIPTokenizer
from ms_diffusion.text.tokenizer import EOS
from ms_diffusion.training.amp import apply_amp, refuse_bfloat16_on_cpu

__all__ = ["StableDiffusion", "diffusion_kwargs_from_scheduler", "sampler_defaults_from_scheduler", "PRECISIONS",
           "resolve_precision"]

#: compute precisions of ``StableDiffusion.set_precision``
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_precision(precision: str, device: Optional[str] = None) -> str:
    """``"auto"`` -> ``"fp16"`` on Ascend and GPU, ``"fp32"`` on CPU (``device``: MindSpore's device target,
    default the current one); other names are checked and returned."""
    if precision == "auto":
        device = device or ms.get_context("device_target")
        return "fp32" if device == "CPU" else "fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of auto, {', '.join(PRECISIONS)}")
    return precision

_PREDICTIONS = {"epsilon": "pred_noise", "v_prediction": "pred_v", "sample": "pred_x0"}
_BETAS = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}


def diffusion_kwargs_from_scheduler(config: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """A diffusers scheduler config (``scheduler/scheduler_config.json``) -> (our GaussianDiffusion arguments,
    what does not map): training timesteps, beta schedule, prediction type."""
    problems: List[str] = []
    beta = config.get("beta_schedule", "linear")
    prediction = config.get("prediction_type", "epsilon")
    if beta not in _BETAS:
        problems.append(f"beta_schedule {beta!r} (supported: {', '.join(_BETAS)})")
    if prediction not in _PREDICTIONS:
        problems.append(f"prediction_type {prediction!r} (supported: {', '.join(_PREDICTIONS)})")
    if config.get("trained_betas") is not None:
        problems.append("trained_betas")
    if config.get("rescale_betas_zero_snr"):
        problems.append("rescale_betas_zero_snr")
    kwargs: Dict[str, Any] = {"timesteps": int(config.get("num_train_timesteps", 1000)),
                              "beta_schedule": _BETAS.get(beta, beta), "objective": _PREDICTIONS.get(prediction),
                              "clip_denoised": bool(config.get("clip_sample", False))}
    if beta in ("scaled_linear", "linear"):
        kwargs["schedule_fn_kwargs"] = {"beta_start": float(config.get("beta_start", 0.0001)),
                                        "beta_end": float(config.get("beta_end", 0.02))}
    return kwargs, problems


def sampler_defaults_from_scheduler(config: Mapping[str, Any], alphas_cumprod: np.ndarray) -> Dict[str, Any]:
    """The sampler options a diffusers scheduler config implies: its timestep spacing and offset, and for
    DDIM / PNDM ``set_alpha_to_one`` (False: the last step lands on alphas_cumprod[0], SD 1.x's setting)."""
    out: Dict[str, Any] = {"spacing": config.get("timestep_spacing", "leading"),
                           "steps_offset": int(config.get("steps_offset", 0))}
    if not config.get("set_alpha_to_one", True):
        out["final_alpha_cumprod"] = float(alphas_cumprod[0])
    return out


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path.parent} is not a Stable Diffusion pipeline folder: {path.name} is missing")
    return json.loads(path.read_text())


@dataclass
class StableDiffusion:
    """A text-to-image latent diffusion: tokenizer, frozen text encoder, UNet + VAE + schedule.

    ``ldm``: a ``LatentDiffusion`` with ``conditioning_key="crossattn"`` and the text encoder as its
    ``cond_stage_model`` (a ``CLIPTextEmbedder``); ``sampler_defaults``: options every sampling call starts
    from (the scheduler's grid).
    """

    tokenizer: CLIPTokenizer
    ldm: LatentDiffusion
    default_sampler: str = "ddim"
    default_steps: int = 50
    sampler_defaults: Dict[str, Any] = field(default_factory=dict)
    scheduler_config: Dict[str, Any] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.ldm.model.cond_stage_model.transformer

    @property
    def vae_scale_factor(self) -> int:
        return self.ldm.first_stage_model.downsample_factor

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_diffusers(cls, folder: PathLike, *, clip_skip: int = 0) -> "StableDiffusion":
        """A diffusers ``StableDiffusionPipeline`` folder (``model_index.json``, ``tokenizer/``, ``text_encoder/``,
        ``unet/``, ``vae/``, ``scheduler/``). ``clip_skip``: condition on the output of that many layers before
        the text encoder's last (after its final LayerNorm), as diffusers' ``clip_skip``."""
        root = Path(folder)
        index = _read_json(root / "model_index.json")
        for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
            if part not in index or not (root / part).is_dir():
                raise ConversionError(f"{root} has no {part}/ (a StableDiffusionPipeline folder has tokenizer, "
                                      f"text_encoder, unet, vae and scheduler)")
        tokenizer = CLIPTokenizer.from_folder(root / "tokenizer")
        text_encoder = text_encoder_from_transformers(root, "text_encoder", skip_last_layers=clip_skip)

        # each network is built once and its weights converted straight into it (diffusers_to_ms would build
        # a second copy of the UNet: 3.4 GB more at SD 1.5's size)
        config, state = read_diffusers_folder(root, "unet")
        kwargs, problems = unet_kwargs_from_diffusers(config, config.get("_class_name"))
        if problems:
            raise ConversionError("this diffusers UNet does not map onto ldm's UNetModel: " + "; ".join(problems))
        unet = build_uninitialised(UNetModel, **kwargs)
        arrays, state = diffusers_unet_plan(unet).to_ms(state), None      # the converted dict alone holds them
        load_arrays_into(unet, arrays, consume=True)
        config, state = read_diffusers_folder(root, "vae")
        section, problems = autoencoder_config_from_diffusers(config)
        if problems:
            raise ConversionError("this diffusers AutoencoderKL does not map onto ldm's: " + "; ".join(problems))
        vae = build_uninitialised(AutoencoderKL, **section)
        arrays, state = diffusers_vae_plan(vae).to_ms(state), None
        load_arrays_into(vae, arrays, consume=True)
        scaling = config.get("scaling_factor") or 0.18215
        scheduler = _read_json(root / "scheduler" / "scheduler_config.json")
        return cls._assemble(tokenizer, text_encoder, unet, vae, float(scaling), scheduler)

    @classmethod
    def from_single_file(cls, path: PathLike, *, config: Union[None, PathLike, Mapping[str, Any]] = None,
                         prediction_type: Optional[str] = None, use_ema: bool = True,
                         tokenizer: Optional[PathLike] = None, clip_skip: int = 0) -> "StableDiffusion":
        """An original Stable Diffusion 1.x / 2.x checkpoint (``.ckpt`` / ``.safetensors`` holding UNet, VAE and
        text encoder; ``sd-v1-5.safetensors``, ``v2-1_768-ema-pruned.ckpt``, ``sd-v1-5-inpainting.ckpt``, ...).

        ``config``: its ldm YAML (default ``NAME.yaml`` beside it, else read off the tensors: see
        ``interop.sd_formats``); ``prediction_type``: ``epsilon`` / ``v_prediction`` (needed for SD 2.x without a
        YAML); ``use_ema``: LitEma's UNet weights when present; ``tokenizer``: a tokenizer folder (default:
        CLIP's BPE vocabulary from open-clip-torch, cleaned and padded as the model's own text encoder did);
        ``clip_skip``: further layers to skip. Scheduler: SD's DDIM grid (leading, offset 1, final alpha of step 0).
        """
        parts = read_sd_checkpoint(path, config, use_ema=use_ema, prediction_type=prediction_type,
                                   clip_skip=clip_skip)
        max_length = parts.config.text_stage["max_length"]
        if tokenizer is not None:
            tok = CLIPTokenizer.from_folder(tokenizer, max_length=max_length)
        elif parts.text_source == "transformers":      # FrozenCLIPEmbedder: transformers' tokenizer, end-token padding
            tok = CLIPTokenizer.from_bpe_file(pad_token=EOS, clean="transformers", max_length=max_length)
        else:                                           # FrozenOpenCLIPEmbedder: open_clip.tokenize
            tok = CLIPTokenizer.from_bpe_file(clean="clip", max_length=max_length)
        d = parts.config.diffusion
        schedule = d.get("schedule_fn_kwargs", {})
        scheduler = {"num_train_timesteps": d["timesteps"], "beta_start": schedule.get("beta_start", 0.00085),
                     "beta_end": schedule.get("beta_end", 0.012),
                     "beta_schedule": {"ldm_linear": "scaled_linear", "sqrt_linear": "linear"}.get(d["beta_schedule"],
                                                                                               d["beta_schedule"]),
                     "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[d["objective"]],
                     "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
        sd = cls._assemble(tok, parts.text_encoder, parts.unet, parts.vae, float(d["scale_factor"]), scheduler,
                           image_size=d.get("image_size"))
        sd.source = dict(parts.meta)
        if parts.buffers:
            Plan(source=f"{path}", checked={k: getattr(sd.ldm, k).asnumpy() for k in parts.buffers},
                 hint="the config's schedule differs from the one the model was trained with").check_buffers(
                parts.buffers)
        return sd

    @classmethod
    def _assemble(cls, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNetModel, vae: AutoencoderKL,
                  scaling: float, scheduler: Mapping[str, Any], image_size: Optional[int] = None) -> "StableDiffusion":
        """The latent diffusion of these parts, with the schedule and sampler grid of a diffusers scheduler config."""
        kwargs, problems = diffusion_kwargs_from_scheduler(scheduler)
        if problems:
            raise ConversionError("the pipeline's scheduler does not map onto our schedule: " + "; ".join(problems))
        if text_encoder.hidden_size != unet.context_dim:
            raise ConversionError(f"the text encoder's width {text_encoder.hidden_size} is not the unet's "
                                  f"cross-attention context_dim {unet.context_dim}")
        z = vae.embed_dim
        if unet.in_channels not in (z, 2 * z + 1):
            raise ConversionError(f"the unet takes {unet.in_channels} channels: neither the VAE's {z} latent channels "
                                  f"nor an inpainting unet's {2 * z + 1} (latents, mask, masked-image latents)")
        inpainting = unet.in_channels == 2 * z + 1
        ldm = LatentDiffusion(vae, unet, conditioning_key="hybrid" if inpainting else "crossattn",
                              cond_stage_model=CLIPTextEmbedder(text_encoder), latent_channels=z if inpainting else None,
                              scale_factor=scaling, image_size=image_size or unet.image_size * vae.downsample_factor,
                              ddim_timestep_spacing=scheduler.get("timestep_spacing", "leading"), **kwargs)
        ldm.set_train(False)
        defaults = sampler_defaults_from_scheduler(scheduler, ldm.schedule.alphas_cumprod)
        keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "clip_sample",
                "set_alpha_to_one", "steps_offset", "timestep_spacing")
        return cls(tokenizer=tokenizer, ldm=ldm, sampler_defaults=defaults,
                   scheduler_config={k: scheduler[k] for k in keep if k in scheduler})

    # ------------------------------------------------------------------ memory

    def enable_attention_slicing(self, slice_size: int = 1024) -> "StableDiffusion":
        """Compute every attention (UNet, VAE) for ``slice_size`` queries at a time (0: all at once). At 512 x 512
        the (2B, heads, 4096, 4096) scores of the UNet's first level are a step's largest tensors. Same
        images; call before the first generation (compiled graphs keep the setting they were built with)."""
        set_attention_slicing(self.ldm, slice_size)
        return self

    def enable_vae_tiling(self, tile_size: Optional[int] = None, overlap: float = 0.25) -> "StableDiffusion":
        """Decode (and encode, for image-to-image / inpainting) images larger than ``tile_size`` pixels
        (default: the model's native size) tile by tile, blended across ``overlap`` as diffusers'
        ``enable_vae_tiling`` (the images differ slightly at the seams)."""
        self.vae.enable_tiling(tile_size or self.ldm.pixel_size[0], overlap)
        return self

    def set_precision(self, precision: str = "fp32") -> "StableDiffusion":
        """Compute the text encoder, UNet and VAE in ``precision``: ``"fp32"``, or ``"fp16"`` / ``"bf16"`` (for Ascend
        and GPU; mindone's and diffusers' half-precision inference): convolutions, matmuls and activations in half
        precision, normalisation layers and attention softmax in float32, weights kept float32 (amp O2). The
        sampler's arithmetic, the latents and the decoded images stay float32. On CPU float16 runs (more slowly
        than float32) and bfloat16 is refused. Call before the first generation (compiled graphs keep theirs)."""
        precision = resolve_precision(precision)
        if precision == self.precision:
            return self
        if precision == "fp32":
            raise ValueError(f"this pipeline already computes in {self.precision}; load it again for fp32")
        refuse_bfloat16_on_cpu(PRECISIONS[precision], "use fp32 (or fp16) on CPU")
        for network in (self.text_encoder, self.unet, self.vae):
            apply_amp(network, "O2", PRECISIONS[precision])
        self.precision = precision
        return self

    # ------------------------------------------------------------------ saving

    @property
    def unet(self) -> UNetModel:
        return self.ldm.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.ldm.first_stage_model

    def save_diffusers(self, folder: PathLike) -> Path:
        """Write a diffusers pipeline folder (``StableDiffusionPipeline.from_pretrained`` loads it; an inpainting
        model as ``StableDiffusionInpaintPipeline``). The folder must not exist or be empty."""
        return write_diffusers_pipeline(folder, tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                                        unet=self.unet, vae=self.vae,
                                        scaling_factor=float(self.ldm.scale_factor.asnumpy()),
                                        scheduler_config=self.scheduler_config, inpainting=self.is_inpainting)

    def save_single_file(self, path: PathLike) -> Path:
        """Write an original-format checkpoint (``.safetensors`` or ``.ckpt``) and its ldm YAML beside it
        (``NAME.yaml``), as SD front-ends and ``from_single_file`` read them. SD 2.x text encoders must hold every
        layer (as loaded from an original checkpoint)."""
        path = Path(path)
        config = self.scheduler_config
        if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise ConversionError(f"original Stable Diffusion checkpoints use ldm's scaled linear schedule; this "
                                  f"model's is {config.get('beta_schedule')!r}")
        parameterization = {"epsilon": "eps", "v_prediction": "v"}.get(config.get("prediction_type", "epsilon"))
        if parameterization is None:
            raise ConversionError(f"prediction_type {config.get('prediction_type')!r} has no ldm parameterization")
        yaml_config = sd_ldm_config(self.unet, self.vae, self.text_encoder, parameterization=parameterization,
                                    scale_factor=float(self.ldm.scale_factor.asnumpy()),
                                    timesteps=int(config.get("num_train_timesteps", 1000)),
                                    linear_start=float(config.get("beta_start", 0.00085)),
                                    linear_end=float(config.get("beta_end", 0.012)),
                                    image_size=int(self.unet.image_size))
        state = sd_checkpoint_state(self.unet, self.vae, self.text_encoder,
                                    {k: getattr(self.ldm, k).asnumpy() for k in LDM_SCHEDULE_BUFFERS})
        write_weights(path, {"state_dict": state} if path.suffix == ".ckpt" else state)  # .ckpt: as Lightning
        yaml_path = path.with_suffix(".yaml")
        tmp = yaml_path.with_name(f".{yaml_path.name}.tmp")
        tmp.write_text(yaml.safe_dump(yaml_config, sort_keys=False))
        os.replace(tmp, yaml_path)
        return path

    # ------------------------------------------------------------------ text

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> the cross-attention context (B, 77, D): tokenized (padded / truncated to the tokenizer's
        length), through the text encoder."""
        ids = Tensor(self.tokenizer(list(prompts)))
        return self.ldm.model.cond_stage_model(ids)

    # ------------------------------------------------------------------ generation

    @property
    def is_inpainting(self) -> bool:
        """True for an inpainting UNet (latents + mask + masked-image latents in)."""
        return self.ldm.conditioning_key == "hybrid"

    def _contexts(self, prompt, negative_prompt, num_images_per_prompt: int, guidance_scale: float):
        """(cond (B, 77, D), uncond or None, B): prompts repeated per image; negatives default to ""."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        n = len(prompts)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if guidance_scale <= 1.0:
            if negative_prompt is not None:
                raise ValueError("negative_prompt acts through guidance: set guidance_scale > 1")
            return self.encode_prompt(prompts), None, len(prompts)
        negatives = [""] * n if negative_prompt is None else (
            [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt))
        if len(negatives) != n:
            raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
        negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
        return self.encode_prompt(prompts), self.encode_prompt(negatives), len(prompts)

    def _size(self, height: Optional[int], width: Optional[int]) -> Tuple[int, int]:
        h = height or self.ldm.pixel_size[0]
        w = width or self.ldm.pixel_size[1]
        step = self.vae_scale_factor * self.ldm.model.unet.downsample_factor
        if h % step or w % step:
            raise ValueError(f"height and width must be multiples of {step}, got {h}x{w}")
        return h, w

    def _run(self, b: int, cond, uncond, guidance_scale: float, *, size: Tuple[int, int], sampler: Optional[str],
             steps: Optional[int], eta: float, seed, x_T, grid_start: int = 0, image_latents: Optional[Tensor] = None,
             return_latents: bool = False, progress: bool = False, **options_) -> Tensor:
        """Sample from ``x_T`` (or noise) on the sampler's grid of ``steps``. From its entry ``grid_start`` on
        (image-to-image): ``image_latents`` noised with ``x_T`` to that entry's timestep is the start."""
        name = resolve_sampler(sampler or self.default_sampler)
        steps = steps or self.default_steps
        taken = sampler_options(name)
        options = {k: v for k, v in self.sampler_defaults.items() if k in taken}
        if name == "ddim":
            options["eta"] = eta
        options.update(options_)
        if x_T is not None and not isinstance(x_T, Tensor):
            x_T = Tensor(np.asarray(x_T, np.float32))
        if grid_start:
            if "timesteps" not in taken:
                raise ValueError(f"sampler {name!r} cannot start part-way along its grid (image-to-image)")
            ts, prev = sampler_grid(name, self.ldm.schedule, steps, **options)
            options["timesteps"] = ts[grid_start:]
            if prev is not None:
                options["prev_timesteps"] = prev[grid_start:]
            steps = len(ts) - grid_start
            ac = float(self.ldm.schedule.alphas_cumprod[int(ts[grid_start])])
            x_T = math.sqrt(ac) * image_latents + math.sqrt(1.0 - ac) * x_T
        f = self.vae_scale_factor
        return self.ldm.sample(b, cond=cond, uncond=uncond, guidance_scale=guidance_scale if uncond is not None else 1.0,
                               sampler=name, steps=steps, seed=seed, x_T=x_T, size=(size[0] // f, size[1] // f),
                               return_latents=return_latents, progress=progress, **options)

    def __call__(self, prompt: Union[str, Sequence[str]], *, negative_prompt: Union[None, str, Sequence[str]] = None,
                 num_images_per_prompt: int = 1, height: Optional[int] = None, width: Optional[int] = None,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, sampler: Optional[str] = None,
                 steps: Optional[int] = None, eta: float = 0.0, seed=None, latents: Optional[Tensor] = None,
                 return_latents: bool = False, progress: bool = False, **sampler_options_) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] for the prompts (B = prompts x ``num_images_per_prompt``).

        ``negative_prompt``: what guidance steers away from (default: the empty prompt), one or one per prompt;
        ``height`` / ``width``: multiples of the VAE's factor times the unet's (default: the unet's
        sample size); ``guidance_scale`` <= 1 turns guidance off, as diffusers; ``latents``: the initial
        noise (B, 4, H / f, W / f); ``sampler`` / ``steps`` / ``eta`` / further options: any of our samplers
        (default DDIM on the scheduler's grid).
        """
        if self.is_inpainting:
            raise ValueError("this is an inpainting model: call inpaint(prompt, image, mask)")
        cond, uncond, b = self._contexts(prompt, negative_prompt, num_images_per_prompt, guidance_scale)
        return self._run(b, cond, uncond, guidance_scale, size=self._size(height, width), sampler=sampler, steps=steps,
                         eta=eta, seed=seed, x_T=latents, return_latents=return_latents, progress=progress,
                         guidance_rescale=guidance_rescale, **sampler_options_)

    def _image_latents(self, image, batch_size: int, noise, what: str) -> Tensor:
        """Images (B or 1, 3, H, W) in [0, 1] -> scaled posterior samples (B, z, h, w) with the given noise."""
        img = image if isinstance(image, Tensor) else Tensor(np.asarray(image, np.float32))
        if img.ndim != 4 or img.shape[1] != self.ldm.first_stage_model.ddconfig["in_channels"]:
            raise ValueError(f"{what} must be (batch, {self.ldm.first_stage_model.ddconfig['in_channels']}, H, W) "
                             f"in [0, 1], got shape {tuple(img.shape)}")
        if img.shape[0] not in (1, batch_size):
            raise ValueError(f"{what} has {img.shape[0]} images for a batch of {batch_size}")
        if img.shape[0] == 1 and batch_size > 1:
            img = ms.ops.tile(img, (batch_size, 1, 1, 1))
        vae = self.ldm.first_stage_model
        moments = vae.tiled(vae.encode_moments, self.ldm.normalize_images(img), latents=False)
        return self.ldm.get_first_stage_encoding(moments, noise)

    def img2img(self, prompt: Union[str, Sequence[str]], image, *, strength: float = 0.8,
                negative_prompt: Union[None, str, Sequence[str]] = None, num_images_per_prompt: int = 1,
                guidance_scale: float = 7.5, sampler: Optional[str] = None, steps: Optional[int] = None,
                eta: float = 0.0, seed=None, posterior_noise=None, noise=None, return_latents: bool = False,
                progress: bool = False, **sampler_options_) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from ``image`` (B or 1, 3, H, W) in [0, 1] re-imagined by the prompts.

        ``strength`` in (0, 1]: how far along the grid of ``steps`` the image is noised (1: from pure noise,
        keeping nothing of it); ``steps * strength`` steps run, as diffusers. ``posterior_noise`` / ``noise``
        (B, z, h, w): the VAE posterior sample's and the forward noising's standard normals (default: drawn
        from ``seed``). Samplers that take explicit timesteps (all but flow_euler).
        """
        if self.is_inpainting:
            raise ValueError("this is an inpainting model: call inpaint(prompt, image, mask)")
        steps = steps or self.default_steps
        start = self._strength_start(strength, steps)
        cond, uncond, b = self._contexts(prompt, negative_prompt, num_images_per_prompt, guidance_scale)
        img_shape = tuple(image.shape)
        size = self._size(img_shape[2] if len(img_shape) == 4 else None, img_shape[3] if len(img_shape) == 4 else None)
        rng = make_rng(seed)
        shape = self._latent_shape(b, size)
        posterior_noise = _normal(posterior_noise, rng, shape, "posterior_noise")
        noise = _normal(noise, rng, shape, "noise")
        z0 = self._image_latents(image, b, posterior_noise, "image")
        return self._run(b, cond, uncond, guidance_scale, size=size, sampler=sampler, steps=steps, eta=eta, seed=rng,
                         x_T=noise, grid_start=start, image_latents=z0, return_latents=return_latents,
                         progress=progress, **sampler_options_)

    def inpaint(self, prompt: Union[str, Sequence[str]], image, mask, *, strength: float = 1.0,
                negative_prompt: Union[None, str, Sequence[str]] = None, num_images_per_prompt: int = 1,
                guidance_scale: float = 7.5, sampler: Optional[str] = None, steps: Optional[int] = None,
                eta: float = 0.0, seed=None, latents: Optional[Tensor] = None, posterior_noise=None,
                masked_image_noise=None, return_latents: bool = False, progress: bool = False,
                **sampler_options_) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] that repaint ``image`` where ``mask`` is 1, as diffusers'
        ``StableDiffusionInpaintPipeline``.

        ``image`` (B or 1, 3, H, W) in [0, 1]; ``mask`` (B or 1, 1, H, W) in [0, 1], binarised at 0.5 as
        diffusers does. ``strength`` in (0, 1]: 1 starts from pure noise; below 1 the start is the image's
        latents noised to the grid's step ``steps - int(steps * strength)`` and ``steps * strength`` steps
        run, as in ``img2img`` (the repainted region then keeps some of the image). ``latents`` (B, 4, H / f,
        W / f): the initial noise (below strength 1 the noise added to the image's latents, where diffusers
        would ignore the image); ``posterior_noise`` / ``masked_image_noise``: the standard normals of the VAE
        posterior samples of the image and of the masked image (default: drawn from ``seed``).

        With an inpainting UNet (9 input channels) the UNet sees the mask and the masked image's latents.
        With an ordinary model the kept region is blended in after every step: the image's latents noised
        with ``latents`` to the level the step reached (then the clean latents after the last step), the
        repainted region left to the model.
        """
        steps = steps or self.default_steps
        start = self._strength_start(strength, steps)
        cond, uncond, b = self._contexts(prompt, negative_prompt, num_images_per_prompt, guidance_scale)
        img = np.asarray(image.asnumpy() if isinstance(image, Tensor) else image, np.float32)
        m = np.asarray(mask.asnumpy() if isinstance(mask, Tensor) else mask, np.float32)
        if img.ndim != 4 or m.ndim != 4 or m.shape[1] != 1 or m.shape[2:] != img.shape[2:]:
            raise ValueError(f"mask must be (batch, 1, H, W) matching the image's H x W, got mask {m.shape} and "
                             f"image {img.shape}")
        if m.shape[0] not in (1, b):
            raise ValueError(f"mask has {m.shape[0]} masks for a batch of {b}")
        size = self._size(img.shape[2], img.shape[3])
        m = (m >= 0.5).astype(np.float32)
        rng = make_rng(seed)
        shape = self._latent_shape(b, size)
        f = self.vae_scale_factor
        small = Tensor(np.broadcast_to(m[:, :, ::f, ::f], (b, 1) + shape[2:]).astype(np.float32))  # nearest
        # the draws in diffusers' order: the image's posterior (when used), the noise, the masked image's posterior
        z0 = None
        if start or not self.is_inpainting:
            z0 = self._image_latents(img, b, _normal(posterior_noise, rng, shape, "posterior_noise"), "image")
        latents = _normal(latents, rng, shape, "latents")
        run = dict(sampler=sampler, steps=steps, eta=eta, seed=rng, x_T=latents, grid_start=start, image_latents=z0,
                   progress=progress)
        if self.is_inpainting:
            masked = img * (1.0 - m) + 0.5 * m            # the masked region at 0 in [-1, 1], as diffusers blanks it
            masked_latents = self._image_latents(masked, b, _normal(masked_image_noise, rng, shape,
                                                                    "masked_image_noise"), "image")
            c_concat = ms.ops.cat((small, masked_latents), axis=1)
            return self._run(b, (c_concat, cond), None if uncond is None else (c_concat, uncond), guidance_scale,
                             size=size, return_latents=return_latents, **run, **sampler_options_)
        keep = 1.0 - small
        out = self._run(b, cond, uncond, guidance_scale, size=size, return_latents=True, mask=keep, x0=z0,
                        mask_noise=latents, mask_from_step=1, **run, **sampler_options_)
        out = z0 * keep + out * small
        return out if return_latents else self.ldm.decode_to_images(out)

    def _strength_start(self, strength: float, steps: int) -> int:
        """The grid entry image-to-image starts from: ``steps - int(steps * strength)`` (0 at strength 1)."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        run = min(int(steps * strength), steps)
        if run < 1:
            raise ValueError(f"strength {strength} with {steps} steps runs no step; raise either")
        return steps - run

    def _latent_shape(self, batch_size: int, size: Tuple[int, int]) -> Tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return batch_size, self.ldm.channels, size[0] // f, size[1] // f


def _normal(value, rng: np.random.Generator, shape: Tuple[int, ...], what: str) -> Tensor:
    """``value`` as a float32 tensor of ``shape``, or standard normals from ``rng``."""
    if value is None:
        return Tensor(rng.standard_normal(shape).astype(np.float32))
    a = np.asarray(value.asnumpy() if isinstance(value, Tensor) else value, np.float32)
    if a.shape != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {a.shape}")
    return Tensor(a)
