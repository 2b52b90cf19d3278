"""Metrics on SAEs: monosemanticity (MS), reconstruction, top-activating images, hierarchy.

Submodules import torch only; this package re-exports the functions other modules use.
"""

from vlmsae.metrics.monosemanticity import monosemanticity_scores, ms_summary
from vlmsae.metrics.reconstruction import fve, normalized_mse, zero_shot_fidelity
from vlmsae.metrics.topimages import TopImages, TopImagesAccumulator, top_images, top_set_jaccard

__all__ = [
    "TopImages",
    "TopImagesAccumulator",
    "fve",
    "monosemanticity_scores",
    "ms_summary",
    "normalized_mse",
    "top_images",
    "top_set_jaccard",
    "zero_shot_fidelity",
]
