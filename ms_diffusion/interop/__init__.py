"""PyTorch <-> ms_diffusion weight conversion. Nothing here imports torch at package import time."""
from ms_diffusion.interop.names import LUCIDRAINS_UNET_TO_MS, MS_TO_LUCIDRAINS_UNET, rename
from ms_diffusion.interop.state import ConversionError, load_arrays_into, state_arrays

__all__ = ["LUCIDRAINS_UNET_TO_MS", "MS_TO_LUCIDRAINS_UNET", "rename", "ConversionError", "load_arrays_into",
           "state_arrays"]
