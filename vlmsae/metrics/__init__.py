"""Metrics on SAEs: monosemanticity (MS), reconstruction, top-activating images, hierarchy.

Submodules import torch only; this package re-exports the functions other modules use.
"""

from vlmsae.metrics.monosemanticity import monosemanticity_scores, ms_summary

__all__ = ["monosemanticity_scores", "ms_summary"]
