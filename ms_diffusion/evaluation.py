"""Periodic evaluation during training: a Fréchet distance of EMA samples, used to keep the best weights.

``SampleEvaluator(diffusion) -> {"fd": ..., ...}`` draws ``num`` images from one fixed seed (so two
evaluations differ only by the weights, and a resumed run reproduces them), maps them to the
feature extractor's input (``fit_to_extractor``) and measures the Fréchet distance to the cached
statistics of the real training split. ``build_evaluator(cfg)`` makes one from the ``train.eval_*``
keys of an experiment config; it is handed to the Trainer (``evaluate_fn``), which calls it every
``train.eval_every`` updates: training itself knows nothing of metrics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from mindspore import nn

from ms_diffusion.experiment import data_geometry
from ms_diffusion.metrics.features import fit_to_extractor, get_extractor
from ms_diffusion.metrics.frechet import frechet_distance_from_features
from ms_diffusion.metrics.reference import reference_features
from ms_diffusion.pipeline import cycled_classes, cycled_prompts, generate

__all__ = ["SampleEvaluator", "build_evaluator"]


@dataclass
class SampleEvaluator:
    """Fréchet distance of ``num`` generated images against ``reference`` (lower is better).

    ``sample_options`` go to ``pipeline.generate`` (sampler, steps, eta, guidance_scale, ...);
    ``num_classes`` (class-conditional models) cycles the labels 0, 1, ..., so every class is
    represented equally.
    """

    extractor: Any                      # metrics.FeatureExtractor
    reference: Any                      # metrics.Reference
    num: int
    batch_size: int = 250
    seed: int = 0
    num_classes: Optional[int] = None
    prompts: Optional[List[str]] = None     # text-conditional models: cycled over the samples
    sample_options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.num <= self.extractor.dim:
            raise ValueError(f"train.eval_num ({self.num}) must exceed the feature dimension ({self.extractor.dim}) "
                             f"of the {self.extractor.description} for the covariance; raise train.eval_num "
                             f"(500 or more gives a steadier distance)")

    def __call__(self, diffusion: nn.Cell) -> Dict[str, Any]:
        start = time.perf_counter()
        classes = cycled_classes(self.num, self.num_classes)
        prompts = cycled_prompts(self.num, self.prompts) if self.prompts else None
        out = generate(diffusion, self.num, batch_size=min(self.batch_size, self.num), seed=self.seed,
                       classes=classes, prompts=prompts, **self.sample_options)
        features = self.extractor(fit_to_extractor(out.images, self.extractor))
        fd = frechet_distance_from_features(features, self.reference.stats).value
        return {"fd": float(fd), "num": self.num, "features": self.extractor.key,
                "reference": self.reference.describe(), "seconds": time.perf_counter() - start}


def build_evaluator(cfg, diffusion: Optional[nn.Cell] = None, log: Callable[[str], None] = print,
                    prompts: Optional[List[str]] = None) -> Optional[SampleEvaluator]:
    """The evaluator an experiment config asks for (``train.eval_every > 0``), else None.

    ``diffusion`` (the model to be trained) tells whether samples are class-conditional; a text-conditional
    one samples ``prompts`` in turn.

    Features: ``train.eval_features: classifier`` (the shipped Fashion-MNIST classifier, or
    ``train.eval_weights``) or ``inception`` (FID; ``train.eval_weights`` = the converted
    Inception-v3). The reference is the training split of ``data.name``, computed once and cached.
    Sampling follows the ``sample:`` section (sampler, steps, eta, guidance).
    """
    t = cfg.train
    if not t.eval_every:
        return None
    if cfg.is_autoencoder:
        raise ValueError("train.eval_every applies to diffusion models; an autoencoder run writes reconstruction "
                         "grids instead (set train.eval_every: 0)")
    extractor = get_extractor(t.eval_features, t.eval_weights)
    dataset = cfg.data["name"]
    if t.eval_features == "classifier" and dataset != "fashion_mnist":
        log(f"note: the classifier features were learned on Fashion-MNIST; on {dataset} the distance ranks "
            f"checkpoints but is not comparable across datasets (train.eval_features: inception for FID)")
    image_shape = None
    if diffusion is not None:
        (height, width), channels = data_geometry(diffusion)
        image_shape = (channels, height, width)
    reference = reference_features(extractor, dataset, data_dir=cfg.data.get("data_dir"), image_shape=image_shape,
                                   log=log)
    s = cfg.sample
    num_classes = getattr(diffusion, "num_classes", None)
    return SampleEvaluator(extractor, reference, t.eval_num, batch_size=s.batch_size, seed=s.seed,
                           num_classes=num_classes, prompts=prompts,
                           sample_options=s.generate_options(bool(num_classes), text=bool(prompts)))
