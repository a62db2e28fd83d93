"""Fashion-MNIST with captions, for text-to-image training on data that exists offline.

Each training image gets two attributes it did not have, drawn once per sample (fixed across epochs and
shards, from the seed): its colours inverted or not, and turned upside down or not; its caption names
the class and both attributes, e.g. ``"a sneaker, black on white, upside down"``. So prompts compose
(10 classes x 2 x 2 = 40 distinct prompts) and a generated image's adherence is checkable: the class by
the shipped Fashion-MNIST classifier (after undoing the attributes the prompt asked for), the colours
by the border, the orientation by which way up the classifier is more confident (``caption_checks``).

Original Fashion-MNIST images are light garments on a black background: "white on black".
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ms_diffusion.data.fashion_mnist import FashionMnistSource
from ms_diffusion.data.source import PathLike
from ms_diffusion.data.transforms import SizeLike

__all__ = ["FashionMnistCaptionsSource", "ATTRIBUTES", "CLASS_NOUNS", "caption", "parse_caption", "all_prompts",
           "apply_attributes", "undo_attributes"]

#: the noun phrase of each class, in label order
CLASS_NOUNS = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
               "a sneaker", "a bag", "an ankle boot")
#: attribute -> (words when absent, words when present); the order of the words in a caption
ATTRIBUTES: Dict[str, Tuple[str, str]] = {"invert": ("white on black", "black on white"),
                                          "upside_down": ("upright", "upside down")}
_ATTRIBUTE_STREAM = 2   # SeedSequence([seed, 2]): independent of the epoch order (0) and flips (1)


def caption(label: int, flags: Sequence[bool], attributes: Sequence[str] = tuple(ATTRIBUTES)) -> str:
    """``caption(7, (True, True))`` -> ``"a sneaker, black on white, upside down"``."""
    words = [ATTRIBUTES[a][int(bool(f))] for a, f in zip(attributes, flags)]
    return ", ".join([CLASS_NOUNS[int(label)]] + words)


def parse_caption(text: str, attributes: Sequence[str] = tuple(ATTRIBUTES)) -> Tuple[int, Tuple[bool, ...]]:
    """The inverse of ``caption``: (label, flags). A ValueError for text ``caption`` does not write."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 1 + len(attributes) or parts[0] not in CLASS_NOUNS:
        raise ValueError(f"{text!r} is not a Fashion-MNIST caption (e.g. {caption(7, (True, False))!r})")
    flags = []
    for a, word in zip(attributes, parts[1:]):
        if word not in ATTRIBUTES[a]:
            raise ValueError(f"{text!r}: {word!r} is not one of {ATTRIBUTES[a]}")
        flags.append(word == ATTRIBUTES[a][1])
    return CLASS_NOUNS.index(parts[0]), tuple(flags)


def all_prompts(attributes: Sequence[str] = tuple(ATTRIBUTES)) -> List[str]:
    """Every caption, class-major: 10 x 2^len(attributes)."""
    return [caption(c, f, attributes) for c in range(len(CLASS_NOUNS))
            for f in itertools.product((False, True), repeat=len(attributes))]


def apply_attributes(images: np.ndarray, flags: np.ndarray, attributes: Sequence[str] = tuple(ATTRIBUTES)
                     ) -> np.ndarray:
    """images (B, C, H, W) in [0, 1], flags bool (B, len(attributes)): invert (1 - x) and / or turn upside down
    (the height axis reversed), in place. Both are their own inverse."""
    for j, name in enumerate(attributes):
        rows = np.asarray(flags[:, j], dtype=bool)
        if not rows.any():
            continue
        if name == "invert":
            images[rows] = 1.0 - images[rows]
        elif name == "upside_down":
            images[rows] = images[rows][:, :, ::-1, :]
        else:
            raise ValueError(f"unknown attribute {name!r}; choose from {list(ATTRIBUTES)}")
    return images


undo_attributes = apply_attributes


class FashionMnistCaptionsSource(FashionMnistSource):
    """Fashion-MNIST whose images carry drawn attributes and whose captions name class and attributes.

    ``attributes``: a subset of ``("invert", "upside_down")``; ``attribute_prob``: the chance of each
    (default 0.5). Every other option is Fashion-MNIST's. ``epoch(..., captions=True)`` yields the
    captions; ``sample_flags`` (total_samples, len(attributes)) bool are the drawn attributes.
    """

    def __init__(self, data_dir: Optional[PathLike] = None, *, split: str = "train",
                 image_size: Optional[SizeLike] = None, channels: Optional[int] = None, random_flip: bool = False,
                 seed: int = 0, num_shards: int = 1, shard_id: int = 0, num_workers: Optional[int] = None,
                 download: bool = True, url: Optional[str] = None,
                 attributes: Sequence[str] = tuple(ATTRIBUTES), attribute_prob: float = 0.5):
        unknown = [a for a in attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"data.attributes: unknown {unknown}; choose from {list(ATTRIBUTES)}")
        if not 0.0 <= attribute_prob <= 1.0:
            raise ValueError(f"data.attribute_prob must lie in [0, 1], got {attribute_prob}")
        super().__init__(data_dir, split=split, image_size=image_size, channels=channels, random_flip=random_flip,
                         seed=seed, num_shards=num_shards, shard_id=shard_id, num_workers=num_workers,
                         download=download, url=url)
        self.title = f"Fashion-MNIST {split}, captioned"
        self.attributes = tuple(attributes)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _ATTRIBUTE_STREAM]))
        self.sample_flags = rng.random((self.total_samples, len(self.attributes))) < attribute_prob
        self.notes.append(f"captions: class, {', '.join(self.attributes) or 'no attributes'} "
                          f"(each with probability {attribute_prob:g})")

    @property
    def has_captions(self) -> bool:
        return True

    def batch_captions(self, indices: np.ndarray, labels: np.ndarray) -> List[str]:
        return [caption(int(c), self.sample_flags[int(i)], self.attributes) for i, c in zip(indices, labels)]

    def example_prompts(self, num: int) -> List[str]:
        """Every class x attribute combination (40 with both attributes), whatever ``num``."""
        return all_prompts(self.attributes)

    def _transform_batch(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return apply_attributes(images, self.sample_flags[np.asarray(indices, np.int64)], self.attributes)
