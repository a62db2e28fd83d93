"""Sample-quality metrics: Fréchet distance (FID), KID, precision/recall, memorisation; feature extractors.

``evaluate_samples(images, dataset)`` runs them all and returns one dict; ``evaluate.py`` is its
command line. The numeric metrics (``frechet``, ``kid``, ``neighbours``) are numpy only; the
feature extractors (``classifier``: the project's Fashion-MNIST CNN, shipped; ``inception``: the
FID Inception-v3, weights supplied by the user) are MindSpore networks. See docs/evaluation.md.
"""
from ms_diffusion.metrics.evaluate import (METRICS, Samples, check_images, evaluate_samples, format_table, load_samples,
                                          open_samples)
from ms_diffusion.metrics.features import (FeatureExtractor, classifier_extractor, fit_to_extractor, get_extractor,
                                          inception_extractor)
from ms_diffusion.metrics.frechet import (FrechetResult, GaussianStats, TooFewSamplesError, bootstrap_frechet_distance,
                                          bootstrap_ratios, frechet_distance, frechet_distance_from_features,
                                          gaussian_stats, paired_bootstrap_distances, paired_bootstrap_ratios,
                                          sqrtm_psd, trace_sqrt_product)
from ms_diffusion.metrics.kid import KIDResult, kernel_inception_distance, mmd2_unbiased, polynomial_kernel
from ms_diffusion.metrics.neighbours import (Memorization, PrecisionRecall, memorization, nearest_training_distances,
                                             precision_recall)
from ms_diffusion.metrics.reference import Reference, cache_dir, memorization_reference, reference_features

__all__ = ["METRICS", "evaluate_samples", "format_table", "load_samples", "open_samples", "Samples", "check_images",
           "FeatureExtractor",
           "classifier_extractor", "inception_extractor", "get_extractor", "fit_to_extractor", "GaussianStats",
           "FrechetResult", "TooFewSamplesError", "gaussian_stats", "sqrtm_psd", "trace_sqrt_product",
           "frechet_distance", "frechet_distance_from_features", "bootstrap_frechet_distance",
           "paired_bootstrap_distances", "bootstrap_ratios", "paired_bootstrap_ratios", "KIDResult",
           "kernel_inception_distance", "mmd2_unbiased", "polynomial_kernel", "PrecisionRecall", "precision_recall",
           "Memorization", "memorization", "nearest_training_distances", "Reference", "reference_features",
           "memorization_reference", "cache_dir"]
