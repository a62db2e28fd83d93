"""Parameter-name maps between PyTorch anchors and ms_diffusion, as data (ordered regex rules)."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Tuple

Rule = Tuple[str, str]

__all__ = ["Rule", "rename", "LUCIDRAINS_UNET_TO_MS", "MS_TO_LUCIDRAINS_UNET"]


def rename(name: str, rules: Sequence[Rule]) -> str:
    """Apply the first matching rule (regex, replacement); names no rule matches are unchanged."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


# lucidrains keeps each U-Net stage as ModuleList([block1, block2, attn, down/upsample]); its
# Down/Upsample are Sequential(rearrange or upsample, conv), the last stage a bare conv.
LUCIDRAINS_UNET_TO_MS: List[Rule] = [
    (r"^downs\.(\d+)\.3\.1\.", r"downs.\1.downsample.conv."),
    (r"^downs\.(\d+)\.3\.", r"downs.\1.downsample."),
    (r"^ups\.(\d+)\.3\.1\.", r"ups.\1.upsample.conv."),
    (r"^ups\.(\d+)\.3\.", r"ups.\1.upsample."),
    (r"^(downs|ups)\.(\d+)\.0\.", r"\1.\2.block1."),
    (r"^(downs|ups)\.(\d+)\.1\.", r"\1.\2.block2."),
    (r"^(downs|ups)\.(\d+)\.2\.", r"\1.\2.attn."),
]

MS_TO_LUCIDRAINS_UNET: List[Rule] = [
    (r"^downs\.(\d+)\.downsample\.conv\.", r"downs.\1.3.1."),
    (r"^downs\.(\d+)\.downsample\.", r"downs.\1.3."),
    (r"^ups\.(\d+)\.upsample\.conv\.", r"ups.\1.3.1."),
    (r"^ups\.(\d+)\.upsample\.", r"ups.\1.3."),
    (r"^(downs|ups)\.(\d+)\.block1\.", r"\1.\2.0."),
    (r"^(downs|ups)\.(\d+)\.block2\.", r"\1.\2.1."),
    (r"^(downs|ups)\.(\d+)\.attn\.", r"\1.\2.2."),
]
