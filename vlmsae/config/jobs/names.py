"""Schema of ``python -m vlmsae.names`` (``conf/names.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from vlmsae.config.nodes import NamingOptions


@dataclass
class NamesJob(NamingOptions):
    """Name the latents of a finished monosemanticity run (vlmsae.studies.naming); rewrites its latents.csv."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    embedder: Any = None  # null = the MS run's own embedder (its run_info.json); it must be a CLIP (text side)
    ms_run: str = MISSING  # the monosemanticity run folder (latents.csv, top_images/ with image paths)
    names: str = "imagenet"  # imagenet | wordnet | <text file, one name per line>
