"""ms_diffusion: diffusion models in MindSpore.

Importing the package caps oneDNN at AVX2 on x86 CPUs before MindSpore creates a kernel (a ~65x
faster convolution path on MindSpore >= 2.9; see ms_diffusion.runtime). Opt out with
MS_DIFFUSION_ONEDNN_ISA=native.
"""
from ms_diffusion.runtime import apply_cpu_workarounds as _apply_cpu_workarounds

_apply_cpu_workarounds()

from ms_diffusion.diffusion import EDMDiffusion, FlowMatching, GaussianDiffusion  # noqa: E402
from ms_diffusion.models import Unet  # noqa: E402
from ms_diffusion.runtime import setup  # noqa: E402

__version__ = "0.1.0"
__all__ = ["GaussianDiffusion", "EDMDiffusion", "FlowMatching", "Unet", "setup", "__version__"]
