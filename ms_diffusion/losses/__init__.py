"""Layer 3: training objectives other than the diffusion loss (the KL-autoencoder's)."""
from ms_diffusion.losses.autoencoder import (DISCRIMINATOR_LOG_KEYS, GENERATOR_LOG_KEYS, DiscriminatorLoss,
                                             GeneratorLoss, LPIPSWithDiscriminator, adaptive_gan_weight,
                                             adopt_weight, hinge_d_loss, logs_to_dict, vanilla_d_loss)
from ms_diffusion.losses.lpips import LPIPS, convert_lpips_state_dict
from ms_diffusion.registry import Registry

__all__ = ["LPIPSWithDiscriminator", "GeneratorLoss", "DiscriminatorLoss", "hinge_d_loss", "vanilla_d_loss",
           "adopt_weight", "adaptive_gan_weight", "logs_to_dict", "GENERATOR_LOG_KEYS", "DISCRIMINATOR_LOG_KEYS",
           "LPIPS", "convert_lpips_state_dict", "LOSSES"]

#: autoencoder losses by config name (the ``loss:`` section of an autoencoder config); the frozen
#: perceptual network is passed in by code
LOSSES = Registry("loss", build_only=("perceptual_model",))
LOSSES.register("lpips_discriminator", LPIPSWithDiscriminator)
