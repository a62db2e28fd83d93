"""Prompt adherence of images generated from captioned Fashion-MNIST prompts (``data.fashion_mnist_captions``).

For each image and the prompt it was generated from (``"a sneaker, black on white, upside down"``):

* **colour**: black on white (inverted) when the mean of the image's outer 2-pixel border is above 0.5 --
  Fashion-MNIST garments never fill the frame, so the border is background;
* **orientation**: upside down when the shipped classifier is more confident (highest class probability)
  on the image turned over than on the image as it is (the classifier only ever saw upright garments);
  measured on the image with the colours the prompt asked for undone;
* **class**: the shipped classifier's top class, on the image with the prompt's attributes undone (what
  the image should be, turned back to an ordinary Fashion-MNIST picture), equals the prompt's class.

``adherence(images, prompts)`` returns the per-image checks; ``adherence_table`` aggregates them per
prompt. The same checks on real captioned images (``real_check_accuracy``) are the ceiling the
checks themselves allow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ms_diffusion.data.fashion_mnist_captions import ATTRIBUTES, parse_caption, undo_attributes

__all__ = ["Adherence", "adherence", "adherence_table", "BORDER"]

BORDER = 2   # pixels of the frame taken as background


@dataclass
class Adherence:
    """Per image (N,): the checks of ``adherence`` and what they read off the images."""

    prompts: List[str]
    class_ok: np.ndarray        # bool: the classifier's top class is the prompt's
    colour_ok: np.ndarray       # bool: inverted or not, as the prompt says
    orientation_ok: np.ndarray  # bool: upside down or not, as the prompt says
    predicted: np.ndarray       # int: the classifier's class (attributes undone)

    @property
    def all_ok(self) -> np.ndarray:
        return self.class_ok & self.colour_ok & self.orientation_ok


def _border_mean(images: np.ndarray) -> np.ndarray:
    x = images.mean(axis=1)
    frame = np.ones(x.shape[1:], bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    return x[:, frame].mean(axis=1)


def _probabilities(net, images: np.ndarray) -> np.ndarray:
    from ms_diffusion.metrics.classifier import classifier_outputs

    logits = classifier_outputs(net, images)[1].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def adherence(images: np.ndarray, prompts: Sequence[str], classifier=None) -> Adherence:
    """Check ``images`` (N, 1, H, W) in [0, 1] (any size: resized for the classifier) against their ``prompts``
    (N captions with both attributes, as ``fashion_mnist_captions`` writes them)."""
    from ms_diffusion.metrics.classifier import load_classifier
    from ms_diffusion.metrics.features import classifier_extractor, fit_to_extractor

    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    attributes = tuple(ATTRIBUTES)
    parsed = [parse_caption(p, attributes) for p in prompts]
    labels = np.array([c for c, _ in parsed])
    flags = np.array([f for _, f in parsed], bool)                    # (N, 2): invert, upside down
    net = classifier if classifier is not None else load_classifier()[0]
    x = fit_to_extractor(np.asarray(images, np.float32), classifier_extractor())
    inverted = _border_mean(x) > 0.5
    upright_colours = undo_attributes(x.copy(), np.stack([flags[:, 0], np.zeros(len(x), bool)], 1), attributes)
    as_is = _probabilities(net, upright_colours).max(axis=1)
    turned = _probabilities(net, upright_colours[:, :, ::-1, :].copy()).max(axis=1)
    upside_down = turned > as_is
    restored = undo_attributes(x.copy(), flags, attributes)
    predicted = _probabilities(net, restored).argmax(axis=1)
    return Adherence(prompts, predicted == labels, inverted == flags[:, 0], upside_down == flags[:, 1], predicted)


def adherence_table(result: Adherence) -> Dict[str, Dict[str, float]]:
    """{prompt: {"n", "class", "colour", "orientation", "all"}} (fractions), plus ``"all prompts"``."""
    out: Dict[str, Dict[str, float]] = {}
    keys = list(dict.fromkeys(result.prompts)) + ["all prompts"]
    prompts = np.array(result.prompts)
    for key in keys:
        rows = np.ones(len(prompts), bool) if key == "all prompts" else prompts == key
        out[key] = {"n": int(rows.sum()), "class": float(result.class_ok[rows].mean()),
                    "colour": float(result.colour_ok[rows].mean()),
                    "orientation": float(result.orientation_ok[rows].mean()), "all": float(result.all_ok[rows].mean())}
    return out
