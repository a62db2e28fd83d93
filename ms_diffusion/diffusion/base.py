"""What every image diffusion objective shares: the network contract, image geometry, the [0, 1] <-> model
space mapping, sampling-time conditioning and the sampling entry points.

An objective (``GaussianDiffusion``, ``EDMDiffusion``, ``FlowMatching``) subclasses ``ImageDiffusion`` and
provides ``schedule`` (the ``NoiseSchedule`` of levels its samplers walk), its compiled denoiser graph and
per-level inputs (``_compile_predict``, ``level_inputs``; ``denoiser`` builds the samplers' ``denoise``
from them), ``sampling_plan`` and ``_sampler_options``, plus
its training side: ``training_inputs`` (host-drawn randomness) and ``training_loss``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ms_diffusion.diffusion import training_inputs as inputs
from ms_diffusion.diffusion.denoiser import denoiser_options, make_denoiser
from ms_diffusion.diffusion.guidance import stack_halves
from ms_diffusion.models.contract import check_denoiser_network
from ms_diffusion.samplers import run_sampler
from ms_diffusion.samplers.base import Denoise, SampleResult, gaussian, make_rng
from ms_diffusion.schedules import NoiseSchedule

__all__ = ["ImageDiffusion"]


class ImageDiffusion(nn.Cell):
    """Base of the diffusion objectives: images (B, channels, *image_size) in [0, 1] (``auto_normalize``)
    or [-1, 1], around a network with the ``models.contract.DenoiserNetwork`` contract."""

    schedule: NoiseSchedule

    def __init__(self, model: nn.Cell, image_size: Union[int, Sequence[int]], auto_normalize: bool = True):
        super().__init__()
        check_denoiser_network(model, type(self).__name__)
        self.model = model
        self.channels = int(model.channels)
        self.self_condition = bool(getattr(model, "self_condition", False))
        self.num_classes = getattr(model, "num_classes", None)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be an int or (height, width), got {image_size}")
        if hasattr(model, "check_input_shape"):
            model.check_input_shape((1, self.channels) + image_size)
        self.image_size = image_size
        self.auto_normalize = bool(auto_normalize)
        self._predict_fn = None

    # ------------------------------------------------------------------ images

    def normalize(self, img):
        return img * 2.0 - 1.0 if self.auto_normalize else img

    def unnormalize(self, x):
        return (x + 1.0) * 0.5 if self.auto_normalize else x

    def check_images(self, shape: Sequence[int]) -> None:
        """Raise ValueError naming the problem if a batch of this shape cannot be trained on."""
        if len(shape) != 4:
            raise ValueError(f"images must be (batch, channels, height, width), got shape {tuple(shape)}")
        if shape[1] != self.channels:
            raise ValueError(f"images have {shape[1]} channel(s) but the model was built for {self.channels}; "
                             f"convert the data (e.g. grayscale <-> RGB) or rebuild the model")
        if tuple(shape[2:]) != self.image_size:
            raise ValueError(f"images are {shape[2]}x{shape[3]} but the diffusion was built for "
                             f"{self.image_size[0]}x{self.image_size[1]}; resize the data or set image_size")

    def class_dropout_prob(self, classes, cond_drop_prob: Optional[float] = None) -> float:
        """The label-dropout probability of a batch with these labels: ``cond_drop_prob`` if given, else the
        model's; 0 for an unconditional model or a batch without labels."""
        if classes is None or self.num_classes is None:
            return 0.0
        return float(self.model.cond_drop_prob if cond_drop_prob is None else cond_drop_prob)

    # ------------------------------------------------------------------ per-batch randomness

    # the training distribution of ``times``: None for integer timesteps in [0, num_timesteps); a continuous-time
    # objective's ``draw_times(rng, B)`` (host) and ``draw_times_in_graph(B)`` (MindSpore RNG ops)
    draw_times = None
    draw_times_in_graph = None

    def _complete_inputs(self, x_start, classes, times, noise, self_cond, cond_drop_prob):
        """construct's missing inputs drawn in the graph; label dropout at cond_drop_prob (default: the model's)."""
        return inputs.complete_in_graph(x_start, classes, times, noise, self_cond, num_timesteps=self.num_timesteps,
                                        offset_noise_strength=self.offset_noise_strength, immiscible=self.immiscible,
                                        self_condition=self.self_condition, num_classes=self.num_classes,
                                        cond_drop_prob=self.class_dropout_prob(classes, cond_drop_prob),
                                        draw_times=self.draw_times_in_graph)

    def training_inputs(self, images: np.ndarray, rng: np.random.Generator,
                        classes: Optional[np.ndarray] = None) -> Dict[str, object]:
        """Draw a batch's times, noise, self-conditioning coin and label dropout on the host.

        ``images`` (B, C, H, W) as given to the loss (e.g. [0, 1]). Returns numpy ``times`` (B,)
        (int32 timesteps, or a continuous-time objective's float32 times) and ``noise`` (B, C, H, W)
        float32 (offset noise and immiscible assignment applied), ``self_cond`` (bool) and ``classes``
        (B,) int32 or None. Pass them to ``training_loss`` (label dropout is already applied).
        """
        return inputs.draw_host_inputs(images, rng, classes, num_timesteps=self.num_timesteps,
                                       offset_noise_strength=self.offset_noise_strength, immiscible=self.immiscible,
                                       normalize=self.normalize, self_condition=self.self_condition,
                                       num_classes=self.num_classes, cond_drop_prob=self.class_dropout_prob(classes),
                                       draw_times=self.draw_times)

    # ------------------------------------------------------------------ sampling

    def model_condition(self, classes, batch_size: int) -> Optional[Tensor]:
        """The conditioning the denoiser passes to the network at sampling time (its 4th input).

        Class labels (B,) int32 in [0, num_classes] (num_classes is the null class) for a
        class-conditional model, None otherwise. Subclasses with other conditionings override it
        (``LatentDiffusion``: concat maps, cross-attention contexts).
        """
        if classes is None or self.num_classes is None:
            return None
        labels = np.asarray(classes.asnumpy() if isinstance(classes, Tensor) else classes)
        if labels.shape != (batch_size,):
            raise ValueError(f"classes must have shape ({batch_size},), got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"classes must lie in [0, {self.num_classes - 1}] ({self.num_classes} is the "
                             f"null class), got {labels.min()}..{labels.max()}")
        return Tensor(labels.astype(np.int32))

    def _compile_predict(self) -> Callable:
        """The objective's compiled denoiser graph (``denoiser.compile_predict`` or ``compile_predict_preconditioned``)."""
        raise NotImplementedError

    def level_inputs(self, t: int, alpha_cumprod: float, batch_size: int) -> Tuple:
        """The compiled graph's inputs at a level: the network's time input (B,), then 0-d coefficients."""
        raise NotImplementedError

    def denoiser(self, batch_size: int, classes: Optional[Sequence[int]] = None, guidance_scale: float = 1.0,
                 guidance_rescale: float = 0.0, clip_denoised: Optional[Union[bool, str]] = None,
                 threshold_ratio: float = 0.995, sample_max_value: float = 1.0, uncond=None) -> Denoise:
        """``denoise(x, t, x_self_cond=None, alpha_cumprod=None) -> (eps, x0[, log_var])`` for the samplers.

        The contract is in ``ms_diffusion.samplers.base``. The network call, guidance, the conversion
        to (eps, x0) and clipping run as one jit-compiled graph, compiled once per configuration and
        reused for every timestep (the time input, the level coefficients and the guidance weights are
        tensors). ``classes``: the network's conditioning through ``model_condition`` (class labels (B,)
        in [0, num_classes) for a class-conditional model; None: unconditional); ``guidance_scale``
        != 1 runs classifier-free guidance, ``guidance_rescale`` in [0, 1] rescales it (diffusers
        ``rescale_noise_cfg``); ``clip_denoised``: True / "static" clips x0 to [-1, 1], "dynamic"
        applies Imagen's dynamic thresholding (``threshold_ratio`` quantile, ``sample_max_value``),
        False / "none" nothing; None uses the constructor's choice. ``uncond``: for a tensor conditioning
        (``LatentDiffusion``'s cross-attention contexts, e.g. prompt embeddings), what guidance steers away
        from (the empty or negative prompt's embeddings), shaped like ``classes``; class-conditional models
        guide away from the null class instead.
        """
        cond = self.model_condition(classes, batch_size)
        if uncond is not None and self.num_classes is not None:
            raise ValueError("uncond is for tensor conditionings; a class-conditional model guides away from its "
                             "null class")
        options = denoiser_options(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                   conditional=cond is not None and (self.num_classes is not None
                                                                     or uncond is not None),
                                   clip_denoised=clip_denoised, default_clip=self.clip_denoised,
                                   threshold_ratio=threshold_ratio, sample_max_value=sample_max_value)
        if options.guided and self.num_classes is None:
            cond = stack_halves(cond, self.model_condition(uncond, batch_size))
        if self._predict_fn is None:
            self._predict_fn = self._compile_predict()
        return make_denoiser(self._predict_fn, batch_size, self.schedule.alphas_cumprod, cond, options,
                             guidance_scale, guidance_rescale, level_inputs=self.level_inputs)

    def sampling_plan(self, sampler: Optional[str] = None, steps: Optional[int] = None) -> Tuple[str, int]:
        """(canonical sampler name, steps) with this diffusion's defaults filled in."""
        raise NotImplementedError

    def _sampler_options(self, name: str, eta: Optional[float], options: Dict) -> Dict:
        """The keyword options ``run_sampler`` gets: the diffusion's defaults for sampler ``name``, then the
        caller's ``options``; the inpainting image ``x0`` (given like training images) mapped to model space."""
        merged = dict(options)
        if merged.get("x0") is not None:
            merged["x0"] = self.normalize(merged["x0"] if isinstance(merged["x0"], Tensor)
                                          else Tensor(np.asarray(merged["x0"], np.float32)))
        return merged

    def sample(self, batch_size: int = 16, return_all_timesteps: bool = False, *, seed=None,
               sampler: Optional[str] = None, steps: Optional[int] = None, eta: Optional[float] = None,
               classes: Optional[Sequence[int]] = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
               clip_denoised: Optional[Union[bool, str]] = None, x_T: Optional[ms.Tensor] = None,
               log_every_t: Optional[int] = None, progress: bool = False, uncond=None,
               size: Optional[Tuple[int, int]] = None, **sampler_options) -> ms.Tensor:
        """Generate ``batch_size`` images (B, C, H, W) in [0, 1] (model space if not auto_normalize).

        ``sampler`` is any of ``samplers.SAMPLER_NAMES`` with ``steps`` steps (default: the
        diffusion's ``sampling_plan``); further options (``order``, ``karras``, ``temperature``,
        ``mask`` + ``x0`` inpainting with x0 given like training images, ...) go to the sampler.
        ``classes``, ``guidance_scale``, ``guidance_rescale``, ``clip_denoised`` (True / False /
        "dynamic", with ``threshold_ratio`` and ``sample_max_value``), ``uncond``: see ``denoiser``.
        ``size`` (h, w): another spatial size than ``image_size`` (fully convolutional networks).
        ``return_all_timesteps`` returns (B, S + 1, C, H, W) from noise to image.
        ``seed`` (int or numpy Generator) makes the result reproducible.
        """
        result = self.sample_with_trajectory(batch_size, seed=seed, sampler=sampler, steps=steps, eta=eta,
                                             classes=classes, guidance_scale=guidance_scale,
                                             guidance_rescale=guidance_rescale, clip_denoised=clip_denoised, x_T=x_T,
                                             log_every_t=(1 if return_all_timesteps else 0) if log_every_t is None
                                             else log_every_t, progress=progress, uncond=uncond, size=size,
                                             **sampler_options)
        if return_all_timesteps:
            frames = np.stack(result.trajectory.xs, axis=1)
            return self.unnormalize(Tensor(frames))
        return self.unnormalize(result.sample)

    def sample_with_trajectory(self, batch_size: int = 16, *, seed=None, sampler: Optional[str] = None,
                               steps: Optional[int] = None, eta: Optional[float] = None,
                               classes: Optional[Sequence[int]] = None, guidance_scale: float = 1.0,
                               guidance_rescale: float = 0.0, clip_denoised: Optional[Union[bool, str]] = None,
                               threshold_ratio: float = 0.995, sample_max_value: float = 1.0,
                               x_T: Optional[ms.Tensor] = None, log_every_t: int = 0, progress: bool = False,
                               uncond=None, size: Optional[Tuple[int, int]] = None,
                               **sampler_options) -> SampleResult:
        """Like ``sample`` but returns the sampler's ``SampleResult`` (model space, with trajectory)."""
        name, steps = self.sampling_plan(sampler, steps)
        rng = make_rng(seed)
        shape = (batch_size, self.channels) + (self.image_size if size is None else tuple(int(s) for s in size))
        if x_T is None:
            x_T = gaussian(rng, shape)
        elif tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        denoise = self.denoiser(batch_size, classes, guidance_scale, guidance_rescale, clip_denoised,
                                threshold_ratio, sample_max_value, uncond=uncond)
        return run_sampler(name, denoise, self.schedule, x_T, rng, steps=steps, self_condition=self.self_condition,
                           log_every_t=log_every_t, progress=progress,
                           **self._sampler_options(name, eta, sampler_options))
