from ms_diffusion.diffusion.gaussian import GaussianDiffusion
from ms_diffusion.diffusion.latent import ClassEmbedder, LatentDenoiser, LatentDiffusion

__all__ = ["GaussianDiffusion", "LatentDiffusion", "LatentDenoiser", "ClassEmbedder"]
