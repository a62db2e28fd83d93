from ms_diffusion.models.unet import Unet

__all__ = ["Unet"]
