"""Schema of ``python -m vlmsae.stability`` (``conf/stability.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class StabilityJob:
    """Seed stability (issue 16): match the latents of SAEs trained with different seeds; mean ± 95% CI of metrics."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    # SAE folders (<run>/sae, as `python -m vlmsae.train` writes them) or training run folders holding sae/;
    # the first is the reference; at least two, all of one size
    runs: list[str] = MISSING
    # monosemanticity run folders (ms_summary.json), one per seed in the order of runs: adds the `ms` section
    ms_runs: Optional[list[str]] = None
    hierarchy_runs: Optional[list[str]] = None  # hierarchy run folders (hierarchy.json), one per seed: `hierarchy`
    threshold: float = 0.7  # a latent is found in a seed when its matched decoder cosine is at least this
    pairs: str = "reference"  # reference: every seed against the first | all: every pair (pairs table only)
    # above this many latents the one-to-one matching is greedy (best candidates first) instead of Hungarian
    exact_max: int = 8192
