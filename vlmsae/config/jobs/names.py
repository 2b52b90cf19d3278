"""Schema of ``python -m vlmsae.names`` (``conf/names.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class NamesJob:
    """Name the latents of a finished monosemanticity run (vlmsae.metrics.names); rewrites its latents.csv."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    embedder: Any = None  # null = the MS run's own embedder (its run_info.json); it must be a CLIP (text side)
    ms_run: str = MISSING  # the monosemanticity run folder (latents.csv, top_images/ with image paths)
    names: str = "imagenet"  # imagenet | wordnet | <text file, one name per line>
    names_templates: list[str] = field(  # prompts, {} = the name; embeddings averaged over them (CLIP zero-shot)
        default_factory=lambda: [
            "a photo of a {}.",
            "a blurry photo of a {}.",
            "a close-up photo of a {}.",
            "a photo of many {}.",
        ]
    )
    names_top: int = 3  # names kept per latent in the `names` column, best first
    # the optional LLaVA naming pass (vlmsae.metrics.autointerp): LLaVA's one word for a 3x3 grid of each latent's top
    # images, scored by the cosine of its text embedding with the latent's concept; latents.csv gains autointerp,
    # autointerp_score. null = off | llava
    autointerp: Optional[str] = None
    autointerp_model: str = "llava15_7b"  # a conf/model/ LLaVA (backend hf_llava); tiny_llava: random, offline
    autointerp_max_latents: int = 200  # latents asked, highest MS first; the others keep empty cells


def register() -> None:
    """Store :class:`NamesJob` as ``names_schema``, the first entry of ``conf/names.yaml``'s defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="names_schema", node=NamesJob)
