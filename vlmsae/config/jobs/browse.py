"""Schema of ``python -m vlmsae.browse`` (``conf/browse.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class BrowseJob:
    """The static HTML feature browser of a monosemanticity run (and the hierarchy and steering runs beside it)."""

    logger: Any = MISSING  # logger=wandb also logs the cards as a W&B Table (logger.mode=offline works offline)
    run: str = MISSING  # folder to scan: a monosemanticity run, or a parent of several job folders (outputs/demo/)
    ms_run: Optional[str] = None  # explicit monosemanticity run folder (when run= holds several)
    hierarchy_run: Optional[str] = None  # explicit hierarchy run folder (latent_taxa.csv)
    steer_runs: Optional[list[str]] = None  # explicit steering run folders or steer.json files
    out: Optional[str] = "${run}/browser"  # where index.html, img/, chunks/ and plots/ go (also Hydra's run dir)
    max_cards: Optional[int] = None  # null: a card for every latent; n: the top n by MS (+ the steered latents)
    max_inline: int = 1000  # up to this many cards all data is inline in index.html (one file); above, chunks/
    chunk_size: int = 1024  # cards per chunks/cNNNNN.js file, loaded as the cards scroll into view
    images_per_card: int = 16  # top images shown per latent
    thumb_px: int = 96  # thumbnail side in pixels (square centre crops, as the model saw them)
    heatmaps: str = "auto"  # auto: recorded per-patch activations, else recompute with model + SAE | recorded | off
    title: Optional[str] = None  # page title; default names the MS run
    sae_format: Optional[str] = None  # the MS run's SAE format for recomputed heatmaps; null = the run's, else detect
