"""GaussianDiffusion: the DDPM training objective as a Cell, and sampling through ms_diffusion.samplers.

API-compatible with lucidrains' ``GaussianDiffusion``::

    diffusion = GaussianDiffusion(Unet(dim=32, dim_mults=(1, 2, 4), channels=1), image_size=28)
    loss = diffusion(images)                    # images (B, C, H, W) in [0, 1]
    samples = diffusion.sample(batch_size=16)   # (16, C, H, W) in [0, 1]

plus ldm's loss options (l1 / l2 / huber, l_simple_weight, original_elbo_weight with ELBO weights,
v_posterior, learned per-timestep logvar) and improved-DDPM learned variances (a Unet with
``learned_variance=True``; hybrid loss with ``vb_loss_weight``).

The class holds the schedule buffers, the loss and the entry points; the parts live beside it:
``parameterization`` (eps / x0 / v), ``gaussian_terms`` (loss terms), ``training_inputs`` (the
per-batch randomness), ``guidance`` and ``denoiser`` (the compiled network call of the samplers).

Randomness: ``diffusion(images)`` draws timesteps and noise with MindSpore's seeded RNG ops.
Training code draws them on the host instead (``training_inputs``) and passes them to
``training_loss``, which makes runs resumable bit-for-bit and is required for immiscible noise
assignment in graph mode.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_diffusion.diffusion import training_inputs as inputs
from ms_diffusion.diffusion.denoiser import compile_predict, timestep_level_inputs
from ms_diffusion.diffusion.gaussian_terms import LOSS_TYPES, check_loss_type, elementwise_loss, mean_flat, vb_bits
from ms_diffusion.diffusion import parameterization
from ms_diffusion.diffusion.parameterization import OBJECTIVES, check_objective, diffuse, training_target
from ms_diffusion.diffusion.base import ImageDiffusion
from ms_diffusion.nn.layers import to_float32
from ms_diffusion.samplers import ddim_invert, resolve_sampler, run_sampler, sampler_options
from ms_diffusion.samplers.base import gaussian, make_rng
from ms_diffusion.schedules import NoiseSchedule, make_beta_schedule, rescale_zero_terminal_snr

__all__ = ["GaussianDiffusion", "OBJECTIVES", "LOSS_TYPES"]


class GaussianDiffusion(ImageDiffusion):
    """DDPM objective around a denoising network (``models.contract.DenoiserNetwork``, e.g. ``Unet``).

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
        check_objective(objective)
        check_loss_type(loss_type)
        super().__init__(model, image_size, auto_normalize)
        self.learned_variance = int(model.out_dim) == 2 * self.channels
        if int(model.out_dim) != self.channels and not self.learned_variance:
            raise ValueError(f"the model outputs {model.out_dim} channels for {self.channels}-channel images; "
                             f"GaussianDiffusion needs out_dim == channels (or 2x channels for learned variance)")
        if self.learned_variance and self.self_condition:
            raise ValueError("learned variance together with self-conditioning is not supported "
                             "(neither does lucidrains); turn one of them off")

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

        self.offset_noise_strength = float(offset_noise_strength)
        self.immiscible = bool(immiscible)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _extract(a, t, ndim: int):
        out = ops.gather(a, t.astype(ms.int32), 0)
        return out.reshape((t.shape[0],) + (1,) * (ndim - 1))

    def _level(self, t, ndim: int):
        """(alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)) at timesteps t (B,), shaped (B, 1, ...) for ndim."""
        return self._extract(self.sqrt_alphas_cumprod, t, ndim), self._extract(self.sqrt_one_minus_alphas_cumprod, t,
                                                                                ndim)

    # ------------------------------------------------------------------ forward process and conversions at timestep t

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        alpha, sigma = self._level(t, x_start.ndim)
        return diffuse(x_start, noise, alpha, sigma)

    def predict_start_from_noise(self, x_t, t, noise):
        nd = x_t.ndim
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, nd) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, nd) * noise)

    def predict_noise_from_start(self, x_t, t, x0):
        # (x_t - sqrt(abar) x0) / sqrt(1 - abar): equal to lucidrains' (x_t / sqrt(abar) - x0) /
        # sqrt(1 / abar - 1) but finite at zero terminal SNR (abar = 0)
        alpha, sigma = self._level(t, x_t.ndim)
        return (x_t - alpha * x0) / sigma

    def predict_v(self, x_start, t, noise):
        alpha, sigma = self._level(t, x_start.ndim)
        return training_target("pred_v", x_start, noise, alpha, sigma)

    def predict_start_from_v(self, x_t, t, v):
        alpha, sigma = self._level(t, x_t.ndim)
        return alpha * x_t - sigma * v

    def q_posterior(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        nd = x_t.ndim
        mean = (self._extract(self.posterior_mean_coef1, t, nd) * x_start
                + self._extract(self.posterior_mean_coef2, t, nd) * x_t)
        return (mean, self._extract(self.posterior_variance, t, nd),
                self._extract(self.posterior_log_variance_clipped, t, nd))

    # ------------------------------------------------------------------ the network

    def _split_output(self, model_output):
        model_output = to_float32(model_output)  # a mixed-precision network's output; the loss stays fp32
        if self.learned_variance:
            return model_output[:, : self.channels], model_output[:, self.channels:]
        return model_output, None

    def network_output(self, x, t, x_self_cond=None, cond=None):
        """The network at (x, t): (prediction (B, C, H, W) float32, learned-variance fraction or None)."""
        return self._split_output(self.model(x, t, x_self_cond, cond))

    def output_to_eps_x0(self, x, t, out, clip_x_start: bool = False, rederive_pred_noise: bool = False):
        """(pred_noise, pred_x_start) from the model's prediction of its objective at timesteps t (B,)."""
        alpha, sigma = self._level(t, x.ndim)
        # through the module: MindSpore's graph parser resolves a bare name equal to the method's own to the method
        return parameterization.output_to_eps_x0(self.objective, x, out, alpha, sigma,
                                                 "static" if clip_x_start else "none",
                                                 rederive_pred_noise=rederive_pred_noise)

    def model_predictions(self, x, t, x_self_cond=None, classes=None, clip_x_start: bool = False,
                          rederive_pred_noise: bool = False):
        """(pred_noise, pred_x_start) of the model at (x, t). x: (B, C, H, W) in model space."""
        out, _ = self.network_output(x, t, x_self_cond, classes)
        return self.output_to_eps_x0(x, t, out, clip_x_start, rederive_pred_noise)

    def learned_log_variance(self, t, var_frac, ndim: int):
        """Interpolate log-variance between the posterior's (min) and beta's (max); frac in [-1, 1]."""
        frac = (var_frac + 1.0) * 0.5
        min_log = self._extract(self.posterior_log_variance_clipped, t, ndim)
        max_log = self._extract(self.log_betas, t, ndim)
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, x, t, x_self_cond=None, classes=None, clip_denoised: bool = True):
        """Mean, variance, log-variance of p(x_{t-1} | x_t) and the x0 estimate."""
        out, var_frac = self.network_output(x, t, x_self_cond, classes)
        _, x_start = self.output_to_eps_x0(x, t, out, clip_denoised)
        mean, var, log_var = self.q_posterior(x_start, x, t)
        if var_frac is not None:
            log_var = self.learned_log_variance(t, var_frac, x.ndim)
            var = ops.exp(log_var)
        return mean, var, log_var, x_start

    # ------------------------------------------------------------------ training objective

    def p_losses(self, x_start, t, noise, classes=None, self_cond: bool = False, loss_reduction: str = "mean"):
        """Loss of one batch. x_start (B, C, H, W) in model space, t (B,) int, noise like x_start."""
        alpha, sigma = self._level(t, x_start.ndim)
        x = diffuse(x_start, noise, alpha, sigma)
        x_self_cond = None
        if self.self_condition and self_cond:
            _, x0_hat = self.model_predictions(x, t, None, classes)
            x_self_cond = ops.stop_gradient(x0_hat)
        out, var_frac = self.network_output(x, t, x_self_cond, classes)
        target = training_target(self.objective, x_start, noise, alpha, sigma)

        per_sample = mean_flat(elementwise_loss(out, target, self.loss_type))     # (B,)
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
        """improved-DDPM variational bound in bits/dim (B,), with the predicted mean detached."""
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        _, x0_hat = self.output_to_eps_x0(x_t, t, out, False)
        model_mean, _, _ = self.q_posterior(x0_hat, x_t, t)
        model_mean = ops.stop_gradient(model_mean)
        model_log_var = self.learned_log_variance(t, var_frac, x_t.ndim)
        return vb_bits(x_start, t, true_mean, true_log_var, model_mean, model_log_var)

    def construct(self, img, classes=None, times=None, noise=None, self_cond=None, cond_drop_prob=None,
                  loss_reduction: str = "mean"):
        """Training loss of a batch of images (B, C, H, W) in [0, 1] (or [-1, 1] without auto_normalize).

        ``times`` (B,) int, ``noise`` (B, C, H, W) and ``self_cond`` (bool) are drawn here when not
        given (``training_inputs.complete_in_graph``); given noise is used as is (offset noise and
        immiscible assignment already applied, see ``training_inputs``). ``classes`` (B,) int are
        dropped to the null class with probability ``cond_drop_prob`` (default: the model's).
        """
        self.check_images(img.shape)
        x_start = self.normalize(img)
        times, noise, self_cond, classes = self._complete_inputs(x_start, classes, times, noise, self_cond,
                                                                 cond_drop_prob)
        return self.p_losses(x_start, times, noise, classes, self_cond, loss_reduction)

    def training_loss(self, images, *, times, noise, classes=None, self_cond: bool = False, posterior_noise=None,
                      loss_reduction: str = "mean"):
        """Loss of a batch whose randomness was drawn on the host (``training_inputs``); graph-safe.

        images (B, C, H, W) in [0, 1] (or [-1, 1] without auto_normalize); ``times`` (B,) int32;
        ``noise`` like images; ``classes`` (B,) int32 after label dropout, or None; ``self_cond`` a
        Python bool. ``posterior_noise`` is LatentDiffusion's (None here). Returns the scalar mean
        loss, or (B,) with ``loss_reduction="none"``.
        """
        if posterior_noise is not None:
            raise ValueError("posterior_noise is only used by LatentDiffusion")
        self.check_images(images.shape)
        return self.p_losses(self.normalize(images), times, noise, classes, self_cond, loss_reduction)

    # ------------------------------------------------------------------ per-batch randomness

    @staticmethod
    def noise_assignment(x_start: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Immiscible diffusion: the permutation of noise (B, ...) closest to the batch (B, ...), (B,) indices."""
        return inputs.noise_assignment(x_start, noise)

    # ------------------------------------------------------------------ sampling

    def _compile_predict(self):
        return compile_predict(self)

    def level_inputs(self, t: int, alpha_cumprod: float, batch_size: int) -> Tuple:
        return timestep_level_inputs(t, alpha_cumprod, batch_size)

    def sampling_plan(self, sampler: Optional[str] = None, steps: Optional[int] = None) -> Tuple[str, int]:
        """(canonical sampler name, network-evaluation steps) with this diffusion's defaults filled in.

        As lucidrains: DDIM with ``sampling_timesteps`` steps when fewer than the training timesteps
        were configured, else ancestral DDPM over all ``num_timesteps``; a named non-DDPM sampler
        defaults to ``sampling_timesteps`` steps, DDPM to ``num_timesteps``. ``steps`` given is
        returned as is (the sampler validates it).
        """
        name = resolve_sampler(sampler or ("ddim" if self.is_ddim_sampling else "ddpm"))
        if steps is None:
            steps = self.sampling_timesteps if name != "ddpm" else self.num_timesteps
        return name, steps

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
        taken = sampler_options(name)
        merged = {k: v for k, v in merged.items() if k in taken or k == "eta"}   # an unused eta is an error
        merged.update(options)
        return super()._sampler_options(name, eta, merged)

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
