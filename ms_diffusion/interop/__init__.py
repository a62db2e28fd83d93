"""PyTorch <-> ms_diffusion weight conversion. Nothing here imports torch at package import time.

* ``names``: the name tables (one per source, ours -> PyTorch, as data); ``transforms``: shape
  transforms; ``plan``: the engine that checks and converts in both directions.
* Sources: ``lucidrains`` (denoising-diffusion-pytorch), ``ldm`` (CompVis latent-diffusion and
  Stable Diffusion checkpoints), ``diffusers`` (model folders). Import them as submodules
  (``from ms_diffusion.interop import lucidrains``); ``scripts/convert_checkpoint.py`` is the CLI.
* ``checkpoints``: converted weights <-> ms_diffusion checkpoint / network files.
"""
from ms_diffusion.interop.names import LUCIDRAINS_UNET_TO_MS, MS_TO_LUCIDRAINS_UNET, rename
from ms_diffusion.interop.plan import Plan, build_plan
from ms_diffusion.io.state import ConversionError, load_arrays_into, named_parameters, state_arrays
from ms_diffusion.interop.transforms import Transform

__all__ = ["LUCIDRAINS_UNET_TO_MS", "MS_TO_LUCIDRAINS_UNET", "rename", "ConversionError", "load_arrays_into",
           "named_parameters", "state_arrays", "Plan", "build_plan", "Transform"]
