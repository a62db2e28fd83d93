"""Layer 2: networks only. Every network a config can name is registered once, in ``MODELS``."""
from ms_diffusion.models.autoencoder import AutoencoderKL, Decoder, Encoder
from ms_diffusion.models.contract import DenoiserNetwork, check_denoiser_network
from ms_diffusion.models.discriminator import NLayerDiscriminator
from ms_diffusion.models.distributions import DiagonalGaussianDistribution
from ms_diffusion.models.unet import Unet
from ms_diffusion.models.unet_ldm import UNetModel
from ms_diffusion.registry import Registry

__all__ = ["Unet", "UNetModel", "AutoencoderKL", "Encoder", "Decoder", "NLayerDiscriminator",
           "DiagonalGaussianDistribution", "MODELS", "build_network"]
__all__ += ["DenoiserNetwork", "check_denoiser_network"]

#: networks by config name: a ``model:`` section is ``{type: name, **constructor arguments}``
MODELS = Registry("model")
MODELS.register("unet", Unet)
MODELS.register("unet_ldm", UNetModel)
MODELS.register("autoencoder_kl", AutoencoderKL)


def build_network(section):
    """A network from a ``model:`` section ({type, arguments}), checked against its constructor (ConfigError)."""
    return MODELS.build(section)
