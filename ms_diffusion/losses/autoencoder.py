"""The KL-autoencoder objective of ldm (``LPIPSWithDiscriminator``) as two compilable step losses.

Generator step (encoder, decoder, quant convs; ``logvar`` too with ``learn_logvar``)::

    rec_loss = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)            (B, C, H, W)
    nll      = sum(rec_loss / exp(logvar) + logvar) / B
    kl       = sum(KL(q(z|x) || N(0, I))) / B
    g_loss   = -mean(D(x_rec))
    d_weight = clamp(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, 1e4) * disc_weight   (no gradient)
    loss     = nll + kl_weight * kl + d_weight * disc_factor(step) * g_loss

with W the decoder's last convolution weight and disc_factor(step) = disc_factor once
step >= disc_start, else 0. Discriminator step: disc_factor(step) * hinge (or vanilla) loss of
D on real images and on the (detached) reconstructions.

How the adaptive weight is computed inside one compiled step: the reconstruction losses and the
discriminator are evaluated once, inside ``ms.value_and_grad`` with respect to the (detached)
output ``a`` of the last convolution. That gives their values and their gradients dL/da; a
surrogate ``value + sum(dL/da * (a - stop_gradient(a)))`` carries the same value and the same
gradient back into the autoencoder, and grad_W L = ``ms.grad`` of ``sum(dL/da * conv(h, W))``
(a single convolution). So the discriminator and LPIPS run once per step, as in PyTorch (and
BatchNorm statistics are updated once), and the norms are exactly torch.autograd.grad's.

Differences from ldm, on purpose: ``logvar`` is trained only with ``learn_logvar=True`` — ldm
declares it a Parameter but leaves it out of its optimizer, so it stays at ``logvar_init``
(our default reproduces that); ``disc_conditional`` is not supported (ldm's AutoencoderKL never
passes a condition); the discriminator step takes the generator step's reconstruction instead of
running the autoencoder again.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_diffusion.losses.lpips import LPIPS
from ms_diffusion.models.autoencoder import AutoencoderKL
from ms_diffusion.models.discriminator import NLayerDiscriminator
from ms_diffusion.models.distributions import gaussian_kl, gaussian_sample, split_moments

__all__ = ["LPIPSWithDiscriminator", "GeneratorLoss", "DiscriminatorLoss", "hinge_d_loss", "vanilla_d_loss",
           "adopt_weight", "adaptive_gan_weight", "GENERATOR_LOG_KEYS", "DISCRIMINATOR_LOG_KEYS", "logs_to_dict",
           "DISC_LOSSES"]

GENERATOR_LOG_KEYS = ("total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight", "disc_factor", "g_loss")
DISCRIMINATOR_LOG_KEYS = ("disc_loss", "logits_real", "logits_fake")
DISC_LOSSES = ("hinge", "vanilla")


def _softplus(x):
    return ops.relu(x) + ops.log1p(ops.exp(-ops.abs(x)))


def hinge_d_loss(logits_real, logits_fake):
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))."""
    return 0.5 * (ops.relu(1.0 - logits_real).mean() + ops.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real, logits_fake):
    """0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec))))."""
    return 0.5 * (_softplus(-logits_real).mean() + _softplus(logits_fake).mean())


def adopt_weight(weight: float, global_step, threshold: int, value: float = 0.0):
    """``weight`` once ``global_step >= threshold``, else ``value`` (float32 scalar Tensor; step may be a Tensor)."""
    step = global_step if isinstance(global_step, Tensor) else Tensor(global_step, ms.int32)
    return ops.select(step.astype(ms.int32) >= threshold, Tensor(weight, ms.float32), Tensor(value, ms.float32))


def adaptive_gan_weight(nll_grad, g_grad, disc_weight: float, eps: float = 1e-4, max_weight: float = 1e4):
    """clamp(|nll_grad| / (|g_grad| + eps), 0, max_weight) * disc_weight, without gradient (scalar)."""
    w = ops.sqrt((nll_grad * nll_grad).sum()) / (ops.sqrt((g_grad * g_grad).sum()) + eps)
    return ops.stop_gradient(ops.clamp(w, 0.0, max_weight)) * disc_weight


def logs_to_dict(keys: Sequence[str], values: Sequence, split: str = "train") -> Dict[str, float]:
    """``{"{split}/{key}": float}`` from a step's log tuple."""
    return {f"{split}/{k}": float(np.asarray(v.asnumpy() if hasattr(v, "asnumpy") else v))
            for k, v in zip(keys, values)}


class LPIPSWithDiscriminator(nn.Cell):
    """ldm's loss configuration and its own parameters: ``logvar``, the PatchGAN ``discriminator``, LPIPS.

    ``perceptual_weight > 0`` needs LPIPS weights: a ``perceptual_model`` (an ``LPIPS``) or an
    ``lpips_ckpt`` path (see ``ms_diffusion.losses.lpips``); with neither the perceptual term is
    disabled with a warning. Single-channel images are repeated to RGB for LPIPS.
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge",
                 disc_ndf: int = 64, lpips_ckpt: Optional[str] = None, perceptual_model: Optional[LPIPS] = None,
                 learn_logvar: bool = False):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"unknown disc_loss {disc_loss!r}; choose one of {DISC_LOSSES}")
        if disc_conditional:
            raise ValueError("disc_conditional is not supported (ldm's AutoencoderKL never passes a condition)")
        if disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {disc_start}")
        self.disc_start = int(disc_start)
        self.kl_weight = float(kl_weight)
        self.pixel_weight = float(pixelloss_weight)
        self.disc_factor = float(disc_factor)
        self.discriminator_weight = float(disc_weight)
        self.disc_loss = disc_loss
        self.learn_logvar = bool(learn_logvar)
        self.logvar = Parameter(Tensor(float(logvar_init), ms.float32), name="logvar", requires_grad=self.learn_logvar)
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)

        self.perceptual_weight = float(perceptual_weight)
        self.has_perceptual = False
        if self.perceptual_weight > 0:
            if perceptual_model is None and lpips_ckpt is not None:
                perceptual_model = LPIPS.from_checkpoint(lpips_ckpt)
            if perceptual_model is None:
                warnings.warn("no LPIPS weights given (lpips_ckpt): training the autoencoder without the perceptual "
                              "loss (perceptual_weight=0). Convert them with scripts/convert_lpips_weights.py.",
                              stacklevel=2)
                self.perceptual_weight = 0.0
            else:
                self.perceptual_loss = perceptual_model
                self.has_perceptual = True

    def perceptual_distance(self, inputs, reconstructions):
        """LPIPS (B, 1, 1, 1) of images in [-1, 1]; 1-channel images are repeated to 3 channels."""
        if inputs.shape[1] == 1:
            inputs = ops.tile(inputs, (1, 3, 1, 1))
            reconstructions = ops.tile(reconstructions, (1, 3, 1, 1))
        return self.perceptual_loss(inputs, reconstructions)

    def reconstruction_loss(self, inputs, reconstructions):
        """Per-pixel |x - x_rec| (+ perceptual_weight * LPIPS broadcast over pixels): (B, C, H, W).

        ``pixelloss_weight`` is accepted and unused, as in ldm.
        """
        rec = ops.abs(inputs - reconstructions)
        if self.has_perceptual:
            rec = rec + self.perceptual_weight * self.perceptual_distance(inputs, reconstructions)
        return rec

    def disc_factor_at(self, global_step):
        return adopt_weight(self.disc_factor, global_step, self.disc_start)

    def discriminator_objective(self, logits_real, logits_fake):
        if self.disc_loss == "hinge":
            return hinge_d_loss(logits_real, logits_fake)
        return vanilla_d_loss(logits_real, logits_fake)


class GeneratorLoss(nn.Cell):
    """The autoencoder's step loss: ``construct(images, global_step, posterior_noise=None, with_gan=True, gan=None)``.

    images (B, C, H, W) in [-1, 1]; global_step an int32 scalar Tensor; posterior_noise (B, z, h, w)
    standard normal or None (drawn in the graph). ``with_gan`` is a compile-time switch: False
    skips the discriminator entirely (d_weight and g_loss logged as 0), for steps before
    ``disc_start``. Returns (loss, logs, reconstructions): logs is a tuple ordered as
    ``GENERATOR_LOG_KEYS``, reconstructions (B, C, H, W) detached, for the discriminator step.
    Differentiate with respect to ``generator_parameters()``.

    ``gan`` = ``gan_terms(images, global_step, posterior_noise)`` computed beforehand at the same
    weights and noise: (g_loss value, its gradient w.r.t. the decoder's pre-activation output,
    d_weight). The step is then differentiated without nested gradients inside it; with
    ``gan=None`` they are computed inline (same numbers), which MindSpore's graph compiler
    handles for tiny models only: differentiating a graph that contains the discriminator's
    gradient took over 12 minutes to compile for the 32-channel Fashion-MNIST autoencoder on a CPU.
    """

    def __init__(self, autoencoder: AutoencoderKL, loss: LPIPSWithDiscriminator):
        super().__init__()
        self.autoencoder = autoencoder
        self.loss = loss
        self._grad_rec = ms.value_and_grad(self._rec_loss_sum, grad_position=1)
        self._grad_g = ms.value_and_grad(self._g_loss, grad_position=0)
        self._grad_last = ms.grad(self._last_layer_objective, grad_position=0)

    def generator_parameters(self) -> List[Parameter]:
        params = list(self.autoencoder.trainable_params())
        if self.loss.learn_logvar:
            params.append(self.loss.logvar)
        return params

    def _rec_loss_sum(self, inputs, a):
        rec = self.autoencoder.decoder.output_activation(a)
        return self.loss.reconstruction_loss(inputs, rec).sum() / inputs.shape[0]

    def _g_loss(self, a):
        return -self.loss.discriminator(self.autoencoder.decoder.output_activation(a)).mean()

    def _last_layer_objective(self, weight, h, cotangent):
        return (cotangent * self.autoencoder.decoder.conv_out_linear(h, weight)).sum()

    def last_layer_grad(self, h, cotangent):
        """grad_W of sum(cotangent * conv_out(h)) with W the last conv weight: (out_ch, C, 3, 3)."""
        weight = ops.stop_gradient(self.autoencoder.decoder.conv_out.weight)
        return self._grad_last(weight, h, cotangent)

    def _forward(self, images, posterior_noise):
        """-> (mean, logvar) of the posterior, the decoder's last features h, its pre-activation output a."""
        ae = self.autoencoder
        mean, logvar = split_moments(ae.encode_moments(images))
        z = gaussian_sample(mean, logvar, posterior_noise)
        h = ae.decoder.features(ae.post_quant_conv(z))
        return mean, logvar, h, ae.decoder.conv_out(h)

    def _gan_terms(self, images, h, a, d_rec):
        """g_loss, d g_loss / d a and the adaptive weight from detached h, a and the rec-loss cotangent."""
        g_val, d_g = self._grad_g(a)
        if self.loss.disc_factor > 0:
            inv_var = ops.exp(-self.loss.logvar)
            d_weight = adaptive_gan_weight(self.last_layer_grad(h, d_rec * inv_var), self.last_layer_grad(h, d_g),
                                           self.loss.discriminator_weight)
        else:
            d_weight = ops.zeros((), ms.float32)
        return ops.stop_gradient(g_val), ops.stop_gradient(d_g), ops.stop_gradient(d_weight)

    def gan_terms(self, images, global_step, posterior_noise):
        """(g_loss, d g_loss / d a (B, C, H, W), d_weight) at the current weights, for ``construct(..., gan=)``.

        Runs the discriminator once (in training mode, as the inline path does). ``posterior_noise``
        must be the one given to ``construct``.
        """
        _, _, h, a = self._forward(images, posterior_noise)
        h, a = ops.stop_gradient(h), ops.stop_gradient(a)
        _, d_rec = self._grad_rec(images, a)
        return self._gan_terms(images, h, a, d_rec)

    def construct(self, images, global_step, posterior_noise=None, with_gan: bool = True, gan=None):
        b = images.shape[0]
        numel = images.shape[1] * images.shape[2] * images.shape[3]
        mean, logvar, h, a = self._forward(images, posterior_noise)
        a_d = ops.stop_gradient(a)

        rec_sum, d_rec = self._grad_rec(images, a_d)    # sum(rec_loss) / B and its gradient w.r.t. a
        d_rec = ops.stop_gradient(d_rec)
        rec_sum = ops.stop_gradient(rec_sum) + (d_rec * (a - a_d)).sum()
        lv = self.loss.logvar
        nll = rec_sum * ops.exp(-lv) + lv * numel
        kl = gaussian_kl(mean, logvar).sum() / b
        loss = nll + self.loss.kl_weight * kl

        disc_factor = self.loss.disc_factor_at(global_step)
        if with_gan:
            if gan is None:
                g_val, d_g, d_weight = self._gan_terms(images, ops.stop_gradient(h), a_d, d_rec)
            else:
                g_val, d_g, d_weight = gan
            g_loss = ops.stop_gradient(g_val) + (ops.stop_gradient(d_g) * (a - a_d)).sum()
            loss = loss + ops.stop_gradient(d_weight) * disc_factor * g_loss
        else:
            g_loss = ops.zeros((), ms.float32)
            d_weight = ops.zeros((), ms.float32)

        rec = self.autoencoder.decoder.output_activation(a_d)
        logs = (loss, lv, kl, nll, rec_sum / numel, d_weight, disc_factor, g_loss)
        logs = tuple(ops.stop_gradient(v) for v in logs)
        return loss, logs, rec


class DiscriminatorLoss(nn.Cell):
    """The discriminator's step loss: ``construct(images, reconstructions, global_step)`` -> (loss, logs).

    images and reconstructions (B, C, H, W) in [-1, 1] (both detached here); logs ordered as
    ``DISCRIMINATOR_LOG_KEYS`` (disc_loss, mean real logit, mean fake logit). Differentiate with
    respect to ``discriminator_parameters()``.
    """

    def __init__(self, loss: LPIPSWithDiscriminator):
        super().__init__()
        self.loss = loss

    def discriminator_parameters(self) -> List[Parameter]:
        return list(self.loss.discriminator.trainable_params())

    def construct(self, images, reconstructions, global_step):
        disc = self.loss.discriminator
        logits_real = disc(ops.stop_gradient(images))
        logits_fake = disc(ops.stop_gradient(reconstructions))
        d_loss = self.loss.disc_factor_at(global_step) * self.loss.discriminator_objective(logits_real, logits_fake)
        logs = (ops.stop_gradient(d_loss), ops.stop_gradient(logits_real.mean()),
                ops.stop_gradient(logits_fake.mean()))
        return d_loss, logs
