from ms_diffusion.models.autoencoder import AutoencoderKL, Decoder, Encoder
from ms_diffusion.models.discriminator import NLayerDiscriminator
from ms_diffusion.models.distributions import DiagonalGaussianDistribution
from ms_diffusion.models.unet import Unet
from ms_diffusion.models.unet_ldm import UNetModel

__all__ = ["Unet", "UNetModel", "AutoencoderKL", "Encoder", "Decoder", "NLayerDiscriminator",
           "DiagonalGaussianDistribution"]
