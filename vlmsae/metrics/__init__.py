"""Metrics on SAEs, pure maths on tensors: monosemanticity (MS), reconstruction, top images, hierarchy, seed matching.

The package re-exports the MS functions that jobs, docs and tests name as ``vlmsae.metrics.*``.
"""

from vlmsae.metrics.monosemanticity import monosemanticity_scores, ms_summary

__all__ = ["monosemanticity_scores", "ms_summary"]
