from ms_diffusion.diffusion.gaussian import GaussianDiffusion

__all__ = ["GaussianDiffusion"]
