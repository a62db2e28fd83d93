"""GaussianDiffusion: the DDPM training objective as a Cell, and sampling through ms_diffusion.samplers.

API-compatible with lucidrains' ``GaussianDiffusion``::

    diffusion = GaussianDiffusion(Unet(dim=32, dim_mults=(1, 2, 4), channels=1), image_size=28)
    loss = diffusion(images)                    # images (B, C, H, W) in [0, 1]
    samples = diffusion.sample(batch_size=16)   # (16, C, H, W) in [0, 1]

plus ldm's loss options (l1 / l2 / huber, l_simple_weight, original_elbo_weight with ELBO weights,
v_posterior, learned per-timestep logvar) and improved-DDPM learned variances (a Unet with
``learned_variance=True``; hybrid loss with ``vb_loss_weight``).

Randomness: ``diffusion(images)`` draws timesteps and noise with MindSpore's seeded RNG ops.
Training code draws them on the host instead (``training_inputs``) and passes them in, which
makes runs resumable bit-for-bit and is required for immiscible noise assignment in graph mode.
"""
from __future__ import annotations

import math
import random
from typing import Dict, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_diffusion.diffusion.assignment import linear_sum_assignment, pairwise_distances
from ms_diffusion.nn.layers import to_float32
from ms_diffusion.runtime import maybe_jit
from ms_diffusion.samplers import ddim_invert, resolve_sampler, run_sampler
from ms_diffusion.samplers.base import gaussian, make_rng
from ms_diffusion.samplers.thresholding import check_threshold, clip_x0, resolve_clip
from ms_diffusion.schedules import NoiseSchedule, make_beta_schedule, rescale_zero_terminal_snr

__all__ = ["GaussianDiffusion", "OBJECTIVES", "LOSS_TYPES"]

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")
LOSS_TYPES = ("l2", "l1", "huber")
_LN2 = math.log(2.0)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * ops.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales, thres: float = 0.999):
    """log p(x) of 8-bit data x in [-1, 1] under N(means, exp(log_scales)^2), bins of width 2/255."""
    centered = x - means
    inv_std = ops.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = ops.log(ops.clamp(cdf_plus, min=1e-15))
    log_one_minus_cdf_min = ops.log(ops.clamp(1.0 - cdf_min, min=1e-15))
    log_delta = ops.log(ops.clamp(cdf_plus - cdf_min, min=1e-15))
    return ops.where(x < -thres, log_cdf_plus, ops.where(x > thres, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
    return x.mean(axis=tuple(range(1, x.ndim)))


class GaussianDiffusion(nn.Cell):
    """DDPM objective around a denoising network (``Unet``-like: channels, out_dim, self_condition).

    Images in [0, 1] (``auto_normalize``) or [-1, 1]; shape (B, channels, *image_size).
    """

    def __init__(
        self,
        model: nn.Cell,
        *,
        image_size: Union[int, Sequence[int]],
        timesteps: int = 1000,
        sampling_timesteps: Optional[int] = None,
        objective: str = "pred_v",
        beta_schedule: str = "sigmoid",
        schedule_fn_kwargs: Optional[Dict] = None,
        betas: Optional[Sequence[float]] = None,
        zero_terminal_snr: bool = False,
        ddim_sampling_eta: float = 0.0,
        ddim_timestep_spacing: str = "lucidrains",
        auto_normalize: bool = True,
        offset_noise_strength: float = 0.0,
        min_snr_loss_weight: bool = False,
        min_snr_gamma: float = 5.0,
        p2_loss_weight_gamma: float = 0.0,
        p2_loss_weight_k: float = 1.0,
        immiscible: bool = False,
        loss_type: str = "l2",
        l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        clip_denoised: bool = True,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        vb_loss_weight: float = 0.001,
    ):
        super().__init__()
        for attr in ("channels", "out_dim"):
            if not hasattr(model, attr):
                raise ValueError(f"the model must expose `{attr}` (as ms_diffusion.Unet does)")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
        self.model = model
        self.channels = int(model.channels)
        self.self_condition = bool(getattr(model, "self_condition", False))
        self.num_classes = getattr(model, "num_classes", None)
        self.learned_variance = int(model.out_dim) == 2 * self.channels
        if int(model.out_dim) != self.channels and not self.learned_variance:
            raise ValueError(f"the model outputs {model.out_dim} channels for {self.channels}-channel images; "
                             f"GaussianDiffusion needs out_dim == channels (or 2x channels for learned variance)")
        if self.learned_variance and self.self_condition:
            raise ValueError("learned variance together with self-conditioning is not supported "
                             "(neither does lucidrains); turn one of them off")

        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be an int or (height, width), got {image_size}")
        if hasattr(model, "check_input_shape"):
            model.check_input_shape((1, self.channels) + image_size)
        self.image_size = image_size
        self.objective = objective

        # ---- schedule (numpy float64) and its float32 buffers
        if betas is not None:
            betas = np.asarray(betas, dtype=np.float64)
            timesteps = int(betas.shape[0])
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, **(schedule_fn_kwargs or {}))
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.schedule = NoiseSchedule(betas, v_posterior=v_posterior)
        if self.schedule.has_zero_terminal_snr and objective == "pred_noise":
            raise ValueError("zero_terminal_snr leaves no signal at the last step, so x0 cannot be recovered "
                             "from a noise prediction: use objective='pred_v' (or 'pred_x0')")
        self.num_timesteps = self.schedule.num_timesteps
        for name, arr in self.schedule.arrays().items():
            setattr(self, name, Tensor(arr.astype(np.float32)))
        with np.errstate(divide="ignore"):
            self.log_betas = Tensor(np.log(self.schedule.betas).astype(np.float32))

        weight = self.schedule.loss_weight(objective, min_snr_gamma if min_snr_loss_weight else None)
        weight = weight * self.schedule.p2_loss_weight(p2_loss_weight_k, p2_loss_weight_gamma)
        self.loss_weight = Tensor(np.nan_to_num(weight, nan=0.0, posinf=0.0).astype(np.float32))
        self.original_elbo_weight = float(original_elbo_weight)
        if self.original_elbo_weight > 0:
            self.lvlb_weights = Tensor(np.nan_to_num(self.schedule.lvlb_weights(objective)).astype(np.float32))
        self.l_simple_weight = float(l_simple_weight)
        self.loss_type = loss_type
        self.use_logvar = bool(learn_logvar) or logvar_init != 0.0
        self.learn_logvar = bool(learn_logvar)
        logvar = np.full((self.num_timesteps,), logvar_init, np.float32)
        self.logvar = Parameter(Tensor(logvar), name="logvar", requires_grad=self.learn_logvar)
        self.vb_loss_weight = float(vb_loss_weight)

        # ---- sampling
        self.sampling_timesteps = int(sampling_timesteps or timesteps)
        if not 1 <= self.sampling_timesteps <= self.num_timesteps:
            raise ValueError(f"sampling_timesteps must lie in [1, {self.num_timesteps}], got {sampling_timesteps}")
        self.is_ddim_sampling = self.sampling_timesteps < self.num_timesteps
        self.ddim_sampling_eta = float(ddim_sampling_eta)
        self.ddim_timestep_spacing = ddim_timestep_spacing
        self.clip_denoised = bool(clip_denoised)

        self.auto_normalize = bool(auto_normalize)
        self.offset_noise_strength = float(offset_noise_strength)
        self.immiscible = bool(immiscible)
        self._predict_fn = None

    # ------------------------------------------------------------------ helpers

    def normalize(self, img):
        return img * 2.0 - 1.0 if self.auto_normalize else img

    def unnormalize(self, x):
        return (x + 1.0) * 0.5 if self.auto_normalize else x

    @staticmethod
    def _extract(a, t, ndim: int):
        out = ops.gather(a, t.astype(ms.int32), 0)
        return out.reshape((t.shape[0],) + (1,) * (ndim - 1))

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

    # ------------------------------------------------------------------ forward process and conversions

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        nd = x_start.ndim
        return (self._extract(self.sqrt_alphas_cumprod, t, nd) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, nd) * noise)

    def predict_start_from_noise(self, x_t, t, noise):
        nd = x_t.ndim
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, nd) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, nd) * noise)

    def predict_noise_from_start(self, x_t, t, x0):
        # (x_t - sqrt(abar) x0) / sqrt(1 - abar): equal to lucidrains' (x_t / sqrt(abar) - x0) /
        # sqrt(1 / abar - 1) but finite at zero terminal SNR (abar = 0)
        nd = x_t.ndim
        return ((x_t - self._extract(self.sqrt_alphas_cumprod, t, nd) * x0)
                / self._extract(self.sqrt_one_minus_alphas_cumprod, t, nd))

    def predict_v(self, x_start, t, noise):
        nd = x_start.ndim
        return (self._extract(self.sqrt_alphas_cumprod, t, nd) * noise
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, nd) * x_start)

    def predict_start_from_v(self, x_t, t, v):
        nd = x_t.ndim
        return (self._extract(self.sqrt_alphas_cumprod, t, nd) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, nd) * v)

    def q_posterior(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        nd = x_t.ndim
        mean = (self._extract(self.posterior_mean_coef1, t, nd) * x_start
                + self._extract(self.posterior_mean_coef2, t, nd) * x_t)
        return (mean, self._extract(self.posterior_variance, t, nd),
                self._extract(self.posterior_log_variance_clipped, t, nd))

    def _split_output(self, model_output):
        model_output = to_float32(model_output)  # a mixed-precision network's output; the loss stays fp32
        if self.learned_variance:
            return model_output[:, : self.channels], model_output[:, self.channels:]
        return model_output, None

    def output_to_eps_x0(self, x, t, out, clip_x_start: bool = False, rederive_pred_noise: bool = False):
        """(pred_noise, pred_x_start) from the model's prediction of its objective at timesteps t (B,)."""
        nd = x.ndim
        alpha = self._extract(self.sqrt_alphas_cumprod, t, nd)
        sigma = self._extract(self.sqrt_one_minus_alphas_cumprod, t, nd)
        return self._eps_x0_at(x, out, alpha, sigma, "static" if clip_x_start else "none",
                               rederive_pred_noise=rederive_pred_noise)

    def _eps_x0_at(self, x, out, alpha, sigma, clip: str = "none", threshold_ratio: float = 0.995,
                   sample_max_value: float = 1.0, rederive_pred_noise: bool = False):
        """(eps, x0) from the model output ``out`` for x = alpha x0 + sigma eps (alpha, sigma broadcast to x).

        x0 is clipped per ``clip`` (see ``samplers.thresholding``); eps is then re-derived from the
        clipped x0 (always for pred_x0 / pred_v, as lucidrains; for pred_noise if ``rederive_pred_noise``).
        The v conversion never divides, so it stays finite at zero SNR (alpha = 0) and for clean
        data (sigma = 0).
        """
        eps = None
        if self.objective == "pred_noise":
            eps = out
            x0 = (x - sigma * out) / alpha
        elif self.objective == "pred_x0":
            x0 = out
        else:
            x0 = alpha * x - sigma * out
            eps = alpha * out + sigma * x
        if clip != "none":
            x0 = clip_x0(x0, clip, threshold_ratio, sample_max_value)
            if self.objective != "pred_noise" or rederive_pred_noise:
                eps = None
        if eps is None:
            eps = (x - alpha * x0) / sigma
        return eps, x0

    def model_predictions(self, x, t, x_self_cond=None, classes=None, clip_x_start: bool = False,
                          rederive_pred_noise: bool = False):
        """(pred_noise, pred_x_start) of the model at (x, t). x: (B, C, H, W) in model space."""
        out, _ = self._split_output(self.model(x, t, x_self_cond, classes))
        return self.output_to_eps_x0(x, t, out, clip_x_start, rederive_pred_noise)

    def learned_log_variance(self, t, var_frac, ndim: int):
        """Interpolate log-variance between the posterior's (min) and beta's (max); frac in [-1, 1]."""
        frac = (var_frac + 1.0) * 0.5
        min_log = self._extract(self.posterior_log_variance_clipped, t, ndim)
        max_log = self._extract(self.log_betas, t, ndim)
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, x, t, x_self_cond=None, classes=None, clip_denoised: bool = True):
        """Mean, variance, log-variance of p(x_{t-1} | x_t) and the x0 estimate."""
        out, var_frac = self._split_output(self.model(x, t, x_self_cond, classes))
        _, x_start = self.output_to_eps_x0(x, t, out, clip_denoised)
        mean, var, log_var = self.q_posterior(x_start, x, t)
        if var_frac is not None:
            log_var = self.learned_log_variance(t, var_frac, x.ndim)
            var = ops.exp(log_var)
        return mean, var, log_var, x_start

    # ------------------------------------------------------------------ training objective

    def _elementwise_loss(self, pred, target):
        d = pred - target
        if self.loss_type == "l2":
            return d * d
        if self.loss_type == "l1":
            return ops.abs(d)
        ad = ops.abs(d)  # huber / smooth L1 with beta 1 (the MindSpore tutorial's loss)
        return ops.where(ad < 1.0, 0.5 * d * d, ad - 0.5)

    def p_losses(self, x_start, t, noise, classes=None, self_cond: bool = False, loss_reduction: str = "mean"):
        """Loss of one batch. x_start (B, C, H, W) in model space, t (B,) int, noise like x_start."""
        x = self.q_sample(x_start, t, noise)
        x_self_cond = None
        if self.self_condition and self_cond:
            _, x0_hat = self.model_predictions(x, t, None, classes)
            x_self_cond = ops.stop_gradient(x0_hat)
        model_out = self.model(x, t, x_self_cond, classes)
        out, var_frac = self._split_output(model_out)

        if self.objective == "pred_noise":
            target = noise
        elif self.objective == "pred_x0":
            target = x_start
        else:
            target = self.predict_v(x_start, t, noise)

        per_sample = _mean_flat(self._elementwise_loss(out, target))          # (B,)
        loss = per_sample * ops.gather(self.loss_weight, t.astype(ms.int32), 0)
        if self.use_logvar:
            logvar_t = ops.gather(self.logvar, t.astype(ms.int32), 0)
            loss = loss / ops.exp(logvar_t) + logvar_t
        loss = self.l_simple_weight * loss
        if self.original_elbo_weight > 0:
            loss = loss + self.original_elbo_weight * ops.gather(self.lvlb_weights, t.astype(ms.int32), 0) * per_sample
        if var_frac is not None:
            loss = loss + self.vb_loss_weight * self._vb_terms(x_start, x, t, out, var_frac)
        if loss_reduction == "none":
            return loss
        return loss.mean()

    def _vb_terms(self, x_start, x_t, t, out, var_frac):
        """improved-DDPM variational bound in bits/dim, with the predicted mean detached."""
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        _, x0_hat = self.output_to_eps_x0(x_t, t, out, False)
        model_mean, _, _ = self.q_posterior(x0_hat, x_t, t)
        model_mean = ops.stop_gradient(model_mean)
        model_log_var = self.learned_log_variance(t, var_frac, x_t.ndim)
        kl = _mean_flat(_normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / _LN2
        nll = -_mean_flat(_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var)) / _LN2
        return ops.where(t == 0, nll, kl)

    def construct(self, img, classes=None, times=None, noise=None, self_cond=None, cond_drop_prob=None,
                  loss_reduction: str = "mean"):
        """Training loss of a batch of images (B, C, H, W) in [0, 1] (or [-1, 1] without auto_normalize).

        ``times`` (B,) int, ``noise`` (B, C, H, W) and ``self_cond`` (bool) are drawn here when not
        given; given noise is used as is (offset noise and immiscible assignment already applied,
        see ``training_inputs``). ``classes`` (B,) int are dropped to the null class with
        probability ``cond_drop_prob`` (default: the model's).
        """
        self.check_images(img.shape)
        b = img.shape[0]
        x_start = self.normalize(img)
        if times is None:
            times = ops.randint(0, self.num_timesteps, (b,), dtype=ms.int32)
        if noise is None:
            noise = ops.standard_normal(x_start.shape).astype(x_start.dtype)
            if self.offset_noise_strength > 0:
                offset = ops.standard_normal((b, self.channels, 1, 1)).astype(x_start.dtype)
                noise = noise + self.offset_noise_strength * offset
            if self.immiscible:
                # host-side assignment: works in PyNative; compiled training passes noise instead
                assign = self.noise_assignment(x_start.asnumpy(), noise.asnumpy())
                noise = noise[Tensor(assign, ms.int32)]
        if self_cond is None:
            self_cond = self.self_condition and random.random() < 0.5
        if classes is not None and self.num_classes is not None:
            p = self.model.cond_drop_prob if cond_drop_prob is None else cond_drop_prob
            if p > 0:
                keep = ops.uniform((b,), Tensor(0.0, ms.float32), Tensor(1.0, ms.float32)) >= p
                classes = ops.where(keep, classes.astype(ms.int32), ops.full_like(classes, self.num_classes,
                                                                                   dtype=ms.int32))
        return self.p_losses(x_start, times, noise, classes, self_cond, loss_reduction)

    # ------------------------------------------------------------------ host-side randomness

    @staticmethod
    def noise_assignment(x_start: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Immiscible diffusion (Li et al. 2024): the permutation of noise closest to the batch.

        lucidrains permutes the noise inside ``q_sample`` but keeps training against the
        unpermuted noise; the noise actually added must be the target, which is what we do.
        """
        b = x_start.shape[0]
        dist = pairwise_distances(x_start.reshape(b, -1), noise.reshape(b, -1))
        return linear_sum_assignment(dist)

    def training_inputs(self, images: np.ndarray, rng: np.random.Generator,
                        classes: Optional[np.ndarray] = None) -> Dict[str, object]:
        """Draw a batch's timesteps, noise, self-conditioning coin and label dropout on the host.

        ``images`` (B, C, H, W) as given to the loss (e.g. [0, 1]). Returns numpy ``times`` (B,)
        int32 and ``noise`` (B, C, H, W) float32 (offset noise and immiscible assignment applied),
        ``self_cond`` (bool) and ``classes`` (B,) int32 or None. Pass them to the loss with
        ``cond_drop_prob=0.0`` (dropout is already applied).
        """
        b = images.shape[0]
        times = rng.integers(0, self.num_timesteps, size=(b,)).astype(np.int32)
        noise = rng.standard_normal(images.shape).astype(np.float32)
        if self.offset_noise_strength > 0:
            noise += self.offset_noise_strength * rng.standard_normal(images.shape[:2] + (1, 1)).astype(np.float32)
        if self.immiscible:
            x_start = images * 2.0 - 1.0 if self.auto_normalize else images
            noise = noise[self.noise_assignment(x_start, noise)]
        self_cond = bool(self.self_condition and rng.random() < 0.5)
        if classes is not None and self.num_classes is not None:
            classes = np.asarray(classes, np.int32).copy()
            p = float(self.model.cond_drop_prob)
            if p > 0:
                classes[rng.random(b) < p] = self.num_classes
        elif classes is not None:
            classes = None
        return {"times": times, "noise": noise, "self_cond": self_cond, "classes": classes}

    # ------------------------------------------------------------------ sampling

    def _raw_prediction(self, x, t, x_self_cond, classes, guidance_scale, guidance_rescale, guided: bool,
                        rescaled: bool):
        """Model output at (x, t) split into (prediction (B, C, H, W), learned-variance fraction or None).

        With ``guided`` the conditional and null-class passes run as one batch of 2B and combine as
        uncond + s (cond - uncond) (Ho & Salimans); with ``rescaled`` the result's per-sample std is
        pulled towards the conditional one's by phi = ``guidance_rescale`` (Lin et al. 2023,
        diffusers ``rescale_noise_cfg``). Guidance acts on the mean prediction only; a learned
        variance comes from the conditional pass (GLIDE). ``guidance_scale`` / ``guidance_rescale``
        are 0-d tensors, so changing them does not recompile.
        """
        if not guided:
            return self._split_output(self.model(x, t, x_self_cond, classes))
        b = x.shape[0]
        classes = classes.astype(ms.int32)
        null = ops.full_like(classes, self.num_classes, dtype=ms.int32)
        sc = None if x_self_cond is None else ops.cat((x_self_cond, x_self_cond), axis=0)
        out, var_frac = self._split_output(self.model(ops.cat((x, x), axis=0), ops.cat((t, t), axis=0), sc,
                                                      ops.cat((classes, null), axis=0)))
        cond, uncond = out[:b], out[b:]
        guided_out = uncond + guidance_scale * (cond - uncond)
        if rescaled:
            axes = tuple(range(1, guided_out.ndim))
            ratio = cond.std(axis=axes, keepdims=True) / guided_out.std(axis=axes, keepdims=True)
            guided_out = guidance_rescale * (guided_out * ratio) + (1.0 - guidance_rescale) * guided_out
        return guided_out, (None if var_frac is None else var_frac[:b])

    def _predict(self, x, t, x_self_cond, classes, alpha, sigma, guidance_scale, guidance_rescale, guided: bool,
                 rescaled: bool, clip: str, threshold_ratio: float, sample_max_value: float):
        """(eps, x0[, log_var]) at (x, t), converted at level x = alpha x0 + sigma eps (0-d tensors)."""
        out, var_frac = self._raw_prediction(x, t, x_self_cond, classes, guidance_scale, guidance_rescale, guided,
                                             rescaled)
        eps, x0 = self._eps_x0_at(x, out, alpha, sigma, clip, threshold_ratio, sample_max_value, True)
        if var_frac is None:
            return eps, x0
        return eps, x0, self.learned_log_variance(t, var_frac, x.ndim)

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

    def denoiser(self, batch_size: int, classes: Optional[Sequence[int]] = None, guidance_scale: float = 1.0,
                 guidance_rescale: float = 0.0, clip_denoised: Optional[Union[bool, str]] = None,
                 threshold_ratio: float = 0.995, sample_max_value: float = 1.0):
        """``denoise(x, t, x_self_cond=None, alpha_cumprod=None) -> (eps, x0[, log_var])`` for the samplers.

        The contract is in ``ms_diffusion.samplers.base``. The network call, guidance, the conversion
        to (eps, x0) and clipping run as one jit-compiled graph, compiled once per configuration and
        reused for every timestep (t, the level coefficients and the guidance weights are tensors).
        ``classes``: the network's conditioning through ``model_condition`` (class labels (B,) in
        [0, num_classes) for a class-conditional model; None: unconditional); ``guidance_scale``
        != 1 runs classifier-free guidance; ``clip_denoised``: True / "static"
        clips x0 to [-1, 1], "dynamic" applies Imagen's dynamic thresholding (``threshold_ratio``
        quantile, ``sample_max_value``), False / "none" nothing; None uses the constructor's choice.
        """
        cond = self.model_condition(classes, batch_size)
        guided = float(guidance_scale) != 1.0
        if guided and (self.num_classes is None or cond is None):
            raise ValueError("guidance_scale != 1 needs a class-conditional model (Unet(num_classes=...)) "
                             "and classes to guide towards")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
        if guidance_rescale > 0 and not guided:
            raise ValueError("guidance_rescale only acts on guided sampling: set guidance_scale != 1 too")
        clip = resolve_clip(clip_denoised, self.clip_denoised)
        if clip == "dynamic":
            check_threshold(threshold_ratio, sample_max_value)
        if self._predict_fn is None:
            self._predict_fn = maybe_jit(self._predict)
        fn = self._predict_fn
        scale = Tensor(np.float32(guidance_scale))
        rescale = Tensor(np.float32(guidance_rescale))
        consts = (guided, float(guidance_rescale) > 0.0, clip, float(threshold_ratio), float(sample_max_value))
        abar = self.schedule.alphas_cumprod
        cache: Dict[Tuple[int, Optional[float]], Tuple[Tensor, Tensor, Tensor]] = {}

        def denoise(x, t: int, x_self_cond=None, alpha_cumprod: Optional[float] = None):
            key = (int(t), alpha_cumprod)
            if key not in cache:
                if not 0 <= key[0] < self.num_timesteps:
                    raise ValueError(f"timestep {t} outside [0, {self.num_timesteps - 1}]")
                ac = float(abar[key[0]]) if alpha_cumprod is None else float(alpha_cumprod)
                cache[key] = (Tensor(np.full((batch_size,), key[0], np.int32)), Tensor(np.float32(math.sqrt(ac))),
                              Tensor(np.float32(math.sqrt(1.0 - ac))))
            tt, alpha, sigma = cache[key]
            return fn(x, tt, x_self_cond, cond, alpha, sigma, scale, rescale, *consts)

        return denoise

    def _sampler_options(self, name: str, eta: Optional[float], options: Dict) -> Dict:
        """Options for ``run_sampler``: the diffusion's spacing and DDIM eta, then the caller's.

        PLMS (ldm's sampler; lucidrains has none) runs on ldm's grid when the spacing is ``lucidrains``,
        whose first timestep T - 1 is ill-conditioned for it (see ``samplers.plms``): ``leading`` + 1,
        which is ldm's ``uniform`` with exactly ``steps`` steps for every T.
        """
        if name == "plms" and self.ddim_timestep_spacing == "lucidrains":
            merged = {"spacing": "leading", "steps_offset": 1}
        else:
            merged = {"spacing": self.ddim_timestep_spacing}
        if eta is not None:
            merged["eta"] = eta
        elif name == "ddim":
            merged["eta"] = self.ddim_sampling_eta
        merged.update(options)
        if merged.get("x0") is not None:  # the known image of inpainting, given like training images
            merged["x0"] = self.normalize(merged["x0"] if isinstance(merged["x0"], Tensor)
                                          else Tensor(np.asarray(merged["x0"], np.float32)))
        return merged

    def sample(self, batch_size: int = 16, return_all_timesteps: bool = False, *, seed=None,
               sampler: Optional[str] = None, steps: Optional[int] = None, eta: Optional[float] = None,
               classes: Optional[Sequence[int]] = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
               clip_denoised: Optional[Union[bool, str]] = None, x_T: Optional[ms.Tensor] = None,
               log_every_t: Optional[int] = None, progress: bool = False, **sampler_options) -> ms.Tensor:
        """Generate ``batch_size`` images (B, C, H, W) in [0, 1] (model space if not auto_normalize).

        Default sampler as lucidrains: DDIM with ``sampling_timesteps`` steps and
        ``ddim_sampling_eta`` when fewer steps than training timesteps, else ancestral DDPM.
        ``sampler`` is any of ``samplers.SAMPLER_NAMES`` with ``steps`` network evaluations (PLMS
        adds one); further options (``order``, ``karras``, ``temperature``, ``mask`` + ``x0``
        inpainting with x0 given like training images, ...) go to the sampler. ``classes``,
        ``guidance_scale``, ``guidance_rescale``, ``clip_denoised`` (True / False / "dynamic", with
        ``threshold_ratio`` and ``sample_max_value``): see ``denoiser``.
        ``return_all_timesteps`` returns (B, S + 1, C, H, W) from noise to image.
        ``seed`` (int or numpy Generator) makes the result reproducible.
        """
        result = self.sample_with_trajectory(batch_size, seed=seed, sampler=sampler, steps=steps, eta=eta,
                                             classes=classes, guidance_scale=guidance_scale,
                                             guidance_rescale=guidance_rescale, clip_denoised=clip_denoised, x_T=x_T,
                                             log_every_t=(1 if return_all_timesteps else 0) if log_every_t is None
                                             else log_every_t, progress=progress, **sampler_options)
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
                               **sampler_options):
        """Like ``sample`` but returns the sampler's ``SampleResult`` (model space, with trajectory)."""
        name = resolve_sampler(sampler or ("ddim" if self.is_ddim_sampling else "ddpm"))
        rng = make_rng(seed)
        shape = (batch_size, self.channels) + self.image_size
        if x_T is None:
            x_T = gaussian(rng, shape)
        elif tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        if steps is None:
            steps = self.sampling_timesteps if name != "ddpm" else self.num_timesteps
        denoise = self.denoiser(batch_size, classes, guidance_scale, guidance_rescale, clip_denoised,
                                threshold_ratio, sample_max_value)
        return run_sampler(name, denoise, self.schedule, x_T, rng, steps=steps, self_condition=self.self_condition,
                           log_every_t=log_every_t, progress=progress,
                           **self._sampler_options(name, eta, sampler_options))

    def invert(self, img: ms.Tensor, *, steps: Optional[int] = None, classes: Optional[Sequence[int]] = None,
               guidance_scale: float = 1.0, guidance_rescale: float = 0.0, progress: bool = False,
               **inversion_options) -> ms.Tensor:
        """DDIM inversion of images (B, C, H, W) in [0, 1] (or [-1, 1] without auto_normalize) to noise.

        Returns model-space noise (B, C, H, W) that ``sample(x_T=..., sampler="ddim", steps=...)`` with
        the same steps, eta = 0 and the same classes maps back to (approximately) the images: the
        starting point for editing. ``steps`` default ``sampling_timesteps``; the grid is the
        diffusion's DDIM spacing unless ``spacing`` is given. No clipping (see ``ddim_invert``).
        """
        self.check_images(img.shape)
        options = {"spacing": self.ddim_timestep_spacing}
        options.update(inversion_options)
        denoise = self.denoiser(img.shape[0], classes, guidance_scale, guidance_rescale, clip_denoised=False)
        return ddim_invert(denoise, self.schedule, self.normalize(img), steps=steps or self.sampling_timesteps,
                           self_condition=self.self_condition, progress=progress, **options).sample

    def interpolate(self, x1: ms.Tensor, x2: ms.Tensor, t: Optional[int] = None, lam: float = 0.5,
                    seed=None) -> ms.Tensor:
        """Noise two batches (B, C, H, W) in model space to step t, mix with weight lam, denoise to 0."""
        if tuple(x1.shape) != tuple(x2.shape):
            raise ValueError(f"interpolate needs equal shapes, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        rng = make_rng(seed)
        t = self.num_timesteps - 1 if t is None else int(t)
        if not 1 <= t < self.num_timesteps:
            raise ValueError(f"t must lie in [1, {self.num_timesteps - 1}], got {t}")
        b = x1.shape[0]
        tb = Tensor(np.full((b,), t, np.int32))
        xt1 = self.q_sample(x1, tb, gaussian(rng, x1.shape))
        xt2 = self.q_sample(x2, tb, gaussian(rng, x2.shape))
        img = (1.0 - lam) * xt1 + lam * xt2
        denoise = self.denoiser(b)
        # lucidrains: the mix is at level t and is denoised from step t - 1 down to 0
        return run_sampler("ddpm", denoise, self.schedule, img, rng, timesteps=list(range(t - 1, -1, -1)),
                           self_condition=self.self_condition).sample
