"""Latent diffusion (Rombach et al. 2022): a diffusion objective in the latent space of a frozen AutoencoderKL.

``LatentDiffusion`` is ldm's (GaussianDiffusion on latents); ``LatentEDM`` and ``LatentFlowMatching`` put
the EDM and flow-matching objectives there, with the same first stage, conditionings and checkpoints
(``LatentSpace``, the mixin they share).

    ldm = LatentDiffusion(autoencoder, unet, conditioning_key="crossattn",
                          cond_stage_model=ClassEmbedder(embed_dim=64, n_classes=10), scale_by_std=True)
    ldm.maybe_init_scale_factor(first_batch, global_step=0)     # once, before training
    loss = ldm(images, labels)                                 # images (B, C, H, W) in [0, 1]
    imgs = ldm.sample(16, classes=labels, guidance_scale=3.0)  # (16, C, H, W) in [0, 1]

The diffusion objective, schedules, loss options (l_simple_weight, original_elbo_weight,
per-timestep learned logvar, ...) and the samplers are GaussianDiffusion's: the network it sees is
``LatentDenoiser``, an adapter with GaussianDiffusion's contract ``model(x, t, x_self_cond, cond)``
around ldm's ``UNetModel`` and an optional conditioning stage. How each conditioning key routes
``cond`` (the slot GaussianDiffusion calls ``classes``):

* ``None``: unconditional, ``unet(z_t, t)``.
* ``"concat"``: cond (B, Cc, h, w) is concatenated to z_t along channels (unet in_channels = z + Cc).
* ``"crossattn"``: with a ``ClassEmbedder``, cond are labels (B,) -> context (B, 1, D); otherwise cond
  is the context (B, M, D) itself, or integers (token ids (B, N) for a text encoder) that go through
  ``cond_stage_model``: with a cond stage, integer conditioning is encoded and floating-point
  conditioning is taken as an already encoded context (prompts encoded once for sampling).
  ``unet(z_t, t, context)``.
* ``"hybrid"``: cond = (c_concat, c_crossattn), both of the above.
* ``"adm"``: cond are labels (B,) -> ``unet(z_t, t, y=labels)``; build the UNetModel with
  ``num_classes = N + 1``.

Class labels live in [0, N]; N is the null class used for label dropout (``cond_drop_prob``) and
classifier-free guidance, exactly as for ``Unet(num_classes=N)``.

Text: with a text encoder as ``cond_stage_model`` (``CLIPTextEmbedder``) and ``set_text_conditioning(tokenizer)``
the model trains on captions and samples from prompts. ``training_inputs`` takes the batch's captions in
place of labels, replaces each by the empty prompt with probability ``cond_drop_prob`` and tokenizes them;
``sample(n, prompts=..., negative_prompt=..., guidance_scale=...)`` guides away from the negative (default:
empty) prompt, ldm's and Stable Diffusion's unconditional branch.

Parameter names match an ldm LatentDiffusion checkpoint: ``model.diffusion_model.*`` (the
UNetModel), ``first_stage_model.*``, ``scale_factor``, ``logvar``; only the conditioning stage sits
at ``model.cond_stage_model.*`` (ldm: ``cond_stage_model.*``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_diffusion.diffusion.base import ImageDiffusion
from ms_diffusion.diffusion.edm import EDMDiffusion
from ms_diffusion.diffusion.flow import FlowMatching
from ms_diffusion.diffusion.gaussian import GaussianDiffusion
from ms_diffusion.models.autoencoder import AutoencoderKL
from ms_diffusion.models.distributions import DiagonalGaussianDistribution, gaussian_sample, split_moments
from ms_diffusion.models.unet_ldm import UNetModel
from ms_diffusion.nn.layers import to_float32
from ms_diffusion.runtime import maybe_jit

__all__ = ["LatentSpace", "LatentDiffusion", "LatentEDM", "LatentFlowMatching", "LatentDenoiser", "ClassEmbedder",
           "CONDITIONING_KEYS", "LDM_DIFFUSION_DEFAULTS"]

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")

# ldm's LatentDiffusion configs: eps prediction, "linear" (= our ldm_linear) betas 0.0015..0.0155,
# DDIM on the uniform grid, no clipping of x0 in latent space
LDM_DIFFUSION_DEFAULTS: Dict[str, Any] = {
    "timesteps": 1000,
    "objective": "pred_noise",
    "beta_schedule": "ldm_linear",
    "schedule_fn_kwargs": {"beta_start": 0.0015, "beta_end": 0.0155},
    "ddim_timestep_spacing": "uniform",
    "clip_denoised": False,
}


class ClassEmbedder(nn.Cell):
    """Labels (B,) int in [0, n_classes] -> context tokens (B, 1, embed_dim); row n_classes is the null class.

    ldm's ``ClassEmbedder`` (``embedding`` = nn.Embedding) plus the null row for classifier-free
    guidance (an ldm checkpoint has ``n_classes`` rows: append one when converting).
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000):
        super().__init__()
        if n_classes < 1 or embed_dim < 1:
            raise ValueError(f"ClassEmbedder needs n_classes >= 1 and embed_dim >= 1, got {n_classes}, {embed_dim}")
        self.n_classes = int(n_classes)
        self.embed_dim = int(embed_dim)
        self.embedding = nn.Embedding(n_classes + 1, embed_dim)

    def construct(self, labels):
        return self.embedding(labels.astype(ms.int32))[:, None, :]


class LatentDenoiser(nn.Cell):
    """GaussianDiffusion's network contract around ``UNetModel``: ``construct(x, t, x_self_cond=None, cond=None)``.

    x: (B, channels, h, w) noisy latents; t: (B,) int; x_self_cond is ignored (ldm has no
    self-conditioning); cond as the module docstring describes. Returns (B, out_dim, h, w).
    Exposes ``channels``, ``out_dim``, ``self_condition``, ``num_classes`` (N, or None when
    ``cond`` is not class labels) and ``cond_drop_prob``.
    """

    def __init__(self, unet: UNetModel, conditioning_key: Optional[str] = None,
                 cond_stage_model: Optional[nn.Cell] = None, cond_drop_prob: float = 0.1,
                 latent_channels: Optional[int] = None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}; choose one of {CONDITIONING_KEYS}")
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob}")
        concat = conditioning_key in ("concat", "hybrid")
        cross = conditioning_key in ("crossattn", "hybrid")
        if concat and latent_channels is None:
            raise ValueError(f"conditioning_key={conditioning_key!r} needs latent_channels (the unet's in_channels "
                             f"are latent channels + conditioning channels)")
        self.channels = int(latent_channels if latent_channels is not None else unet.in_channels)
        if concat and self.channels >= unet.in_channels:
            raise ValueError(f"concat conditioning needs unet in_channels ({unet.in_channels}) > latent_channels "
                             f"({self.channels})")
        if not concat and self.channels != unet.in_channels:
            raise ValueError(f"latent_channels={self.channels} differs from the unet's in_channels "
                             f"{unet.in_channels} without concat conditioning")
        if cross and not unet.use_spatial_transformer:
            raise ValueError(f"conditioning_key={conditioning_key!r} needs UNetModel(use_spatial_transformer=True, "
                             f"context_dim=...)")
        if conditioning_key == "adm" and unet.num_classes is None:
            raise ValueError("conditioning_key='adm' needs UNetModel(num_classes=N + 1): N classes and the null class")
        if conditioning_key != "adm" and unet.num_classes is not None:
            raise ValueError("the unet has class embeddings (num_classes) but conditioning_key is not 'adm'")
        if cond_stage_model is not None and not cross:
            raise ValueError("a cond_stage_model is only used with conditioning_key 'crossattn' or 'hybrid'")

        self.diffusion_model = unet   # ldm's DiffusionWrapper name: parameters are model.diffusion_model.*
        self.conditioning_key = conditioning_key
        self.concat = concat
        self.cross = cross
        self.has_cond_stage = cond_stage_model is not None
        if self.has_cond_stage:
            self.cond_stage_model = cond_stage_model
        self.out_dim = int(unet.out_channels)
        self.self_condition = False
        if conditioning_key == "adm":
            self.num_classes = int(unet.num_classes) - 1
        elif conditioning_key == "crossattn" and isinstance(cond_stage_model, ClassEmbedder):
            self.num_classes = cond_stage_model.n_classes
        else:
            self.num_classes = None
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError("class conditioning needs at least one class besides the null class")
        self.cond_drop_prob = float(cond_drop_prob) if self.num_classes is not None else 0.0
        self.tensor_conditioning = conditioning_key is not None and self.num_classes is None

    @property
    def unet(self) -> UNetModel:
        return self.diffusion_model

    def check_input_shape(self, shape: Sequence[int]) -> None:
        if len(shape) != 4 or shape[1] != self.channels:
            raise ValueError(f"latents must be (batch, {self.channels}, h, w), got {tuple(shape)}")
        f = self.diffusion_model.downsample_factor
        if shape[2] % f or shape[3] % f:
            raise ValueError(f"latent size {shape[2]}x{shape[3]} is not divisible by the unet's {f}; change the "
                             f"image size or the unet's channel_mult")

    def _context(self, c):
        if self.has_cond_stage and (c.dtype == ms.int32 or c.dtype == ms.int64):
            return self.cond_stage_model(c)
        return c

    def construct(self, x, t, x_self_cond=None, cond=None):
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if self.num_classes is not None and cond is None:
            cond = ops.fill(ms.int32, (x.shape[0],), self.num_classes)
        if cond is None:
            raise ValueError(f"conditioning_key={key!r} needs a conditioning input")
        if key == "concat":
            return self.diffusion_model(ops.cat((x, cond), axis=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, self._context(cond))
        if key == "hybrid":
            return self.diffusion_model(ops.cat((x, cond[0]), axis=1), t, self._context(cond[1]))
        return self.diffusion_model(x, t, None, cond)


def _as_conditioning_array(value) -> np.ndarray:
    """Host conditioning -> int32 (labels, token ids) or float32 (maps, contexts)."""
    a = np.asarray(value)
    return a.astype(np.int32) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32)


def _compile_decode(ldm: "LatentDiffusion"):
    # a closure, not ms.jit(ldm.decode_first_stage): jit of a bound method makes MindSpore parse that
    # method instead of construct wherever the Cell is later called inside another graph (a train step)
    def decode(z):
        return ldm.decode_first_stage(z)

    return maybe_jit(decode)


class LatentSpace:
    """The first-stage side of a latent diffusion, for any objective: mixed in before the objective's class
    (``LatentDiffusion``, ``LatentEDM``, ``LatentFlowMatching``), which then trains and samples on
    ``scale_factor * z``, z ~ q(z | x) of a frozen ``AutoencoderKL``.

    ``construct(img, cond=None, times=None, noise=None, self_cond=None, cond_drop_prob=None,
    loss_reduction="mean", posterior_noise=None)`` -> loss: the objective's signature (so a
    trainer calls both alike) plus ``posterior_noise``; img (B, C, H, W) in [0, 1]
    (``auto_normalize``, default) or [-1, 1]; ``times`` / ``noise`` (latent-shaped) /
    ``posterior_noise`` (latent-shaped) are drawn in the graph when omitted, or on the host with
    ``training_inputs`` and passed to ``training_loss(img, times=, noise=, classes=, posterior_noise=)``;
    ``self_cond`` is accepted and ignored (ldm has no self-conditioning). ``sample`` returns images
    in [0, 1] (or [-1, 1]). Any keyword of the objective is accepted (``learn_logvar``,
    ``sampling_timesteps``, ``sigma_data``, ``shift``, ...).

    ``scale_factor`` is a non-trainable Parameter, so checkpoints carry it; with ``scale_by_std``
    call ``maybe_init_scale_factor(batch, global_step)`` on the first batch (it sets 1 / std of the
    latents of that batch at step 0, as ldm does, and nothing on resume).
    """

    def __init_subclass__(cls, **kwargs):
        # MindSpore's graph parser resolves super() from type(self), not from the class that calls it, so in a
        # mixin super().construct would find this class's construct again: the methods that run inside compiled
        # graphs reach the objective's through these class attributes instead.
        super().__init_subclass__(**kwargs)
        objective = next(c for c in cls.__mro__[1:] if issubclass(c, ImageDiffusion) and not issubclass(c, LatentSpace))
        cls._objective_construct = objective.construct
        cls._objective_training_loss = objective.training_loss

    def _objective_options(self, diffusion_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The keyword arguments of the objective's constructor (``LatentDiffusion``: with ldm's defaults)."""
        return dict(diffusion_kwargs)

    def __init__(self, first_stage_model: AutoencoderKL, unet: UNetModel, *, image_size: Optional[int] = None,
                 conditioning_key: Optional[str] = None, cond_stage_model: Optional[nn.Cell] = None,
                 cond_drop_prob: float = 0.1, latent_channels: Optional[int] = None, scale_factor: float = 1.0,
                 scale_by_std: bool = False, auto_normalize: bool = True, **diffusion_kwargs):
        if "model" in diffusion_kwargs:
            raise ValueError(f"{type(self).__name__} builds its own denoiser from `unet`; do not pass `model`")
        if diffusion_kwargs.get("immiscible"):
            raise ValueError("immiscible noise assignment is not supported for latent diffusion")
        if diffusion_kwargs.get("self_condition"):
            raise ValueError("self-conditioning is not supported for latent diffusion")
        if scale_factor <= 0:
            raise ValueError(f"scale_factor must be positive, got {scale_factor}")
        image_size = int(first_stage_model.ddconfig["resolution"] if image_size is None else image_size)
        f = first_stage_model.downsample_factor
        if image_size % f:
            raise ValueError(f"image_size {image_size} is not divisible by the autoencoder's factor {f}")
        latent_channels = first_stage_model.embed_dim if latent_channels is None else latent_channels
        if latent_channels != first_stage_model.embed_dim:
            raise ValueError(f"latent_channels={latent_channels} but the autoencoder's embed_dim is "
                             f"{first_stage_model.embed_dim}")
        denoiser = LatentDenoiser(unet, conditioning_key, cond_stage_model, cond_drop_prob,
                                  latent_channels if conditioning_key in ("concat", "hybrid") else None)
        if denoiser.channels != first_stage_model.embed_dim:
            raise ValueError(f"the unet denoises {denoiser.channels}-channel latents but the autoencoder's "
                             f"embed_dim is {first_stage_model.embed_dim}")
        super().__init__(denoiser, image_size=image_size // f, auto_normalize=False,
                         **self._objective_options(diffusion_kwargs))
        self.first_stage_model = first_stage_model
        for p in first_stage_model.get_parameters():
            p.requires_grad = False
        first_stage_model.set_train(False)
        self.conditioning_key = conditioning_key
        self.pixel_size = (image_size, image_size)
        self.images_auto_normalize = bool(auto_normalize)
        self.scale_by_std = bool(scale_by_std)
        self.scale_factor = Parameter(Tensor(float(scale_factor), ms.float32), name="scale_factor",
                                      requires_grad=False)
        self._decode_fn = None
        self.tokenizer = None
        self.prompt_drop_prob = 0.0

    # ------------------------------------------------------------------ text conditioning

    def set_text_conditioning(self, tokenizer, prompt_drop_prob: float = 0.1) -> "LatentSpace":
        """Train on captions and sample from prompts: ``tokenizer(texts) -> (B, L) int32`` ids for the
        ``cond_stage_model`` (a text encoder); captions become the empty prompt with ``prompt_drop_prob``."""
        if not (self.conditioning_key == "crossattn" and self.model.has_cond_stage and self.model.tensor_conditioning):
            raise ValueError("text conditioning needs conditioning_key='crossattn' and a text encoder as "
                             "cond_stage_model (e.g. CLIPTextEmbedder)")
        if not 0.0 <= prompt_drop_prob <= 1.0:
            raise ValueError(f"prompt_drop_prob must lie in [0, 1], got {prompt_drop_prob}")
        self.tokenizer = tokenizer
        self.prompt_drop_prob = float(prompt_drop_prob)
        return self

    @property
    def text_conditional(self) -> bool:
        return self.tokenizer is not None

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> token ids (B, L) int32, the tokenizer's padding and truncation."""
        if not self.text_conditional:
            raise ValueError("this model is not text-conditional (no tokenizer): it takes no prompts")
        return np.asarray(self.tokenizer(list(prompts)), np.int32)

    def prompt_conditioning(self, prompts: Union[str, Sequence[str]], batch_size: int,
                            negative_prompt: Optional[str] = None, guided: bool = False):
        """(cond, uncond) token ids for ``batch_size`` images: one prompt for all or one per image; uncond is
        the negative (default: empty) prompt when ``guided``, else None."""
        prompts = [prompts] * batch_size if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch_size:
            raise ValueError(f"{len(prompts)} prompts for a batch of {batch_size}; give one prompt or one per image")
        uncond = self.tokenize([negative_prompt or ""] * batch_size) if guided or negative_prompt else None
        return self.tokenize(prompts), uncond

    # ------------------------------------------------------------------ modes and images

    def set_train(self, mode: bool = True):
        """Train the denoiser; the first stage stays in evaluation mode (ldm's ``disabled_train``)."""
        super().set_train(mode)
        self.first_stage_model.set_train(False)
        return self

    def normalize_images(self, img):
        return img * 2.0 - 1.0 if self.images_auto_normalize else img

    def unnormalize_images(self, x):
        return (x + 1.0) * 0.5 if self.images_auto_normalize else x

    def check_pixel_images(self, shape: Sequence[int]) -> None:
        self.first_stage_model.check_input_shape(shape)
        if tuple(shape[2:]) != self.pixel_size:
            raise ValueError(f"images are {shape[2]}x{shape[3]} but the latent diffusion was built for "
                             f"{self.pixel_size[0]}x{self.pixel_size[1]}; resize the data or set image_size")

    # ------------------------------------------------------------------ first stage

    def encode_first_stage(self, x) -> DiagonalGaussianDistribution:
        """Images (B, C, H, W) in [-1, 1] -> q(z | x) (unscaled latents)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, moments, noise=None):
        """Posterior moments (B, 2z, h, w) -> scale_factor * z with z ~ q(z | x) (noise: (B, z, h, w) or None)."""
        mean, logvar = split_moments(moments)
        return self.scale_factor * gaussian_sample(mean, logvar, noise)

    def decode_first_stage(self, z):
        """Scaled latents (B, z, h, w) -> images (B, C, H, W) float32, nominally [-1, 1]."""
        return to_float32(self.first_stage_model.decode(z / self.scale_factor))

    def measure_scale_factor(self, images, noise=None) -> float:
        """Set ``scale_factor`` = 1 / std of the (unscaled) sampled latents of ``images``; return it.

        images (B, C, H, W) as given to the loss; std is the unbiased std over all elements (ldm).
        """
        img = images if isinstance(images, Tensor) else Tensor(np.asarray(images, np.float32))
        self.check_pixel_images(img.shape)
        moments = self.first_stage_model.encode_moments(self.normalize_images(img))
        mean, logvar = split_moments(moments)
        z = gaussian_sample(mean, logvar, noise).asnumpy().astype(np.float64)
        std = float(z.std(ddof=1))
        if not np.isfinite(std) or std <= 0:
            raise ValueError(f"cannot set scale_factor from a latent std of {std}")
        self.scale_factor.set_data(Tensor(np.float32(1.0 / std)))
        return 1.0 / std

    def maybe_init_scale_factor(self, images, global_step: int, noise=None) -> bool:
        """With ``scale_by_std``, measure the scale on the first training batch (step 0). True if it did."""
        if not self.scale_by_std or int(global_step) != 0:
            return False
        self.measure_scale_factor(images, noise)
        return True

    # ------------------------------------------------------------------ training

    def _training_latents(self, img, posterior_noise=None):
        """Images (B, C, H, W) as given to the loss -> scaled latents (B, z, h, w), no gradient to the first stage."""
        self.check_pixel_images(img.shape)
        moments = self.first_stage_model.encode_moments(self.normalize_images(img))
        return ops.stop_gradient(self.get_first_stage_encoding(moments, posterior_noise))

    def construct(self, img, cond=None, times=None, noise=None, self_cond=None, cond_drop_prob=None,
                  loss_reduction: str = "mean", posterior_noise=None):
        z = self._training_latents(img, posterior_noise)
        return self._objective_construct(z, cond, times, noise, False, cond_drop_prob, loss_reduction)

    def training_loss(self, images, *, times, noise, classes=None, self_cond: bool = False, posterior_noise=None,
                      loss_reduction: str = "mean"):
        """The objective's ``training_loss`` on the latents of ``images`` (host-drawn inputs; graph-safe).

        ``noise`` and ``posterior_noise`` (the first stage's posterior sample; None: drawn in the
        graph) are latent-shaped (B, z, h, w); ``classes`` is the conditioning after label dropout;
        ``self_cond`` is ignored.
        """
        z = self._training_latents(images, posterior_noise)
        return self._objective_training_loss(z, times=times, noise=noise, classes=classes, self_cond=False,
                                     loss_reduction=loss_reduction)

    def latent_shape(self, batch_size: int) -> tuple:
        return (batch_size, self.channels) + self.image_size

    def training_inputs(self, images: np.ndarray, rng: np.random.Generator,
                        classes: Optional[np.ndarray] = None) -> Dict[str, object]:
        """The objective's host-drawn batch inputs for latents, plus ``posterior_noise``.

        Returns numpy ``times`` (B,), latent-shaped ``noise`` and ``posterior_noise``, the labels
        after dropout in ``classes`` (class-conditional models; None otherwise) and ``self_cond``
        (always False). Pass them to ``training_loss``. A text-conditional model takes the captions (B
        str) as ``classes`` and returns their token ids (B, L) int32 after prompt dropout.
        """
        shape = self.latent_shape(int(np.shape(images)[0]))
        captions = None
        if self.text_conditional:
            if classes is None or isinstance(classes, np.ndarray) and classes.dtype != object:
                raise ValueError("a text-conditional model trains on captions: pass the batch's captions (list of "
                                 "str) as `classes`")
            captions, classes = list(classes), None
        out = super().training_inputs(np.zeros(shape, np.float32), rng, classes)
        out["posterior_noise"] = rng.standard_normal(shape).astype(np.float32)
        if captions is not None:
            dropped = rng.random(len(captions)) < self.prompt_drop_prob
            out["classes"] = self.tokenize(["" if d else c for d, c in zip(dropped, captions)])
        return out

    # ------------------------------------------------------------------ sampling

    def decode_to_images(self, z) -> ms.Tensor:
        """Scaled latents -> images clipped to [-1, 1] and mapped like the training images ([0, 1] by default)."""
        if self._decode_fn is None:
            self._decode_fn = _compile_decode(self)
        images = self.first_stage_model.tiled(self._decode_fn, z, latents=True)   # whole unless tiling is on
        return self.unnormalize_images(ops.clamp(images, -1.0, 1.0))

    def sample(self, batch_size: int = 16, return_all_timesteps: bool = False, *, cond=None, uncond=None,
               return_latents: bool = False, prompts: Optional[Union[str, Sequence[str]]] = None,
               negative_prompt: Optional[str] = None, **kwargs) -> ms.Tensor:
        """Generate ``batch_size`` images (B, C, H, W) in [0, 1] (or [-1, 1] without auto_normalize).

        Class-conditional models take ``classes`` (B,) (and ``guidance_scale``); other conditionings
        take ``cond`` (a tensor, or the (c_concat, c_crossattn) pair for "hybrid") and, to guide with
        ``guidance_scale``, ``uncond`` shaped alike (e.g. the empty prompt's ids or embeddings). Every
        option of the objective's ``sample`` applies (sampler, steps, eta, seed, x_T in latent
        space, ...). ``return_all_timesteps`` decodes every step: (B, S + 1, C, H, W).
        ``return_latents`` returns the scaled latents (B, z, h, w) undecoded. A text-conditional model takes
        ``prompts`` (one str, or one per image) and ``negative_prompt`` instead of ``cond`` / ``uncond``.
        """
        if prompts is not None:
            if cond is not None or uncond is not None:
                raise ValueError("pass either `prompts` or `cond` / `uncond`")
            cond, uncond = self.prompt_conditioning(prompts, batch_size, negative_prompt,
                                                    guided=kwargs.get("guidance_scale", 1.0) != 1.0)
        elif negative_prompt is not None:
            raise ValueError("`negative_prompt` goes with `prompts`")
        if cond is not None:
            if not self.model.tensor_conditioning:
                raise ValueError("this model is unconditional or class-conditional: pass `classes`, not `cond`")
            if "classes" in kwargs:
                raise ValueError("pass either `cond` or `classes`")
            kwargs["classes"] = cond
        elif self.model.tensor_conditioning:
            raise ValueError(f"conditioning_key={self.conditioning_key!r} needs `cond` to sample")
        if uncond is not None:
            if cond is None:
                raise ValueError("`uncond` goes with `cond` (tensor conditionings)")
            kwargs["uncond"] = uncond
        latents = super().sample(batch_size, return_all_timesteps, **kwargs)
        if return_latents:
            return latents
        if return_all_timesteps:
            b, s = latents.shape[:2]
            frames = self.decode_to_images(latents.reshape((b * s,) + tuple(latents.shape[2:])))
            return frames.reshape((b, s) + tuple(frames.shape[1:]))
        return self.decode_to_images(latents)

    def model_condition(self, classes, batch_size: int):
        """The conditioning tensor(s) the denoiser receives at sampling time (``ImageDiffusion``'s hook).

        Class labels are checked and converted by ``ImageDiffusion``; tensor conditionings
        (concat maps (B, Cc, h, w), cross-attention contexts (B, M, D), hybrid pairs) must have
        ``batch_size`` rows and pass through unchanged.
        """
        if not self.model.tensor_conditioning or classes is None:
            return super().model_condition(classes, batch_size)
        parts = classes if isinstance(classes, (tuple, list)) else (classes,)
        if self.conditioning_key == "hybrid" and len(parts) != 2:
            raise ValueError("hybrid conditioning takes cond=(c_concat, c_crossattn)")
        tensors = tuple(p if isinstance(p, Tensor) else Tensor(_as_conditioning_array(p)) for p in parts)
        for p in tensors:
            if p.shape[0] != batch_size:
                raise ValueError(f"the conditioning has {p.shape[0]} rows for a batch of {batch_size}")
        return tensors if self.conditioning_key == "hybrid" else tensors[0]


class LatentDiffusion(LatentSpace, GaussianDiffusion):
    """GaussianDiffusion on the latents of a frozen ``AutoencoderKL`` (ldm's LatentDiffusion); see ``LatentSpace``.

    Diffusion options not given take ``LDM_DIFFUSION_DEFAULTS``; any GaussianDiffusion keyword is accepted
    (``learn_logvar``, ``l_simple_weight``, ``original_elbo_weight``, ``sampling_timesteps``, ...).

    DDIM / PLMS sampling ends on the model's clean estimate (``final_alpha_cumprod=1.0``, as every
    other diffusion here and diffusers' ``set_alpha_to_one``), not on ldm's ``alphas_cumprod[0]``,
    which leaves latent noise of std sqrt(1 - alphas_cumprod[0]) (0.039 with ldm's betas) in the
    decoded image and exists only as a detail of ldm's sampler. To reproduce ldm exactly, pass
    ``final_alpha_cumprod=float(ldm.schedule.alphas_cumprod[0])`` to ``sample``.
    """

    def _objective_options(self, diffusion_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        options = dict(LDM_DIFFUSION_DEFAULTS)
        if "beta_schedule" in diffusion_kwargs or "betas" in diffusion_kwargs:
            options.pop("schedule_fn_kwargs")   # ldm's beta range belongs to ldm's schedule only
        options.update(diffusion_kwargs)
        return options


class LatentEDM(LatentSpace, EDMDiffusion):
    """EDM (``EDMDiffusion``) on the latents of a frozen ``AutoencoderKL``; see ``LatentSpace``. Set
    ``sigma_data`` to the scaled latents' std (1.0 with ``scale_by_std``)."""


class LatentFlowMatching(LatentSpace, FlowMatching):
    """Flow matching (``FlowMatching``) on the latents of a frozen ``AutoencoderKL``; see ``LatentSpace``."""
