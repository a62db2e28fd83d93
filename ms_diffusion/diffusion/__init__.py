from ms_diffusion.diffusion.edm import EDMDiffusion
from ms_diffusion.diffusion.flow import FlowMatching
from ms_diffusion.diffusion.gaussian import GaussianDiffusion
from ms_diffusion.diffusion.latent import ClassEmbedder, LatentDenoiser, LatentDiffusion

__all__ = ["GaussianDiffusion", "EDMDiffusion", "FlowMatching", "LatentDiffusion", "LatentDenoiser", "ClassEmbedder"]
