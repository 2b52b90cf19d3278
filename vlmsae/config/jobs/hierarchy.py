"""Schema of ``python -m vlmsae.hierarchy`` (``conf/hierarchy.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class HierarchyJob:
    """Taxonomy alignment of Matryoshka levels (METHOD §4): LCA depth of each latent's top images, per group."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    data: Any = MISSING  # the images (unused with ms_run, except to find the taxonomy's data root)
    taxonomy: Any = MISSING  # where each image's taxon path comes from
    model: Any = None  # null = the model the SAE was trained on (its trained_on.model)
    embedder: Any = None  # an image embedder for MS per group (e.g. embedder=clip_b32); null = no MS unless ms_run

    sae_path: str = MISSING  # SAE folder, e.g. outputs/train/<run>/sae, a published SAE's folder or hf://org/repo
    sae_format: Optional[str] = None  # null = detect; vlmsae | dictionary_learning | saelens | sparsify | saev | ...
    # stop when the SAE does not fit the first batch it is fed (FVE < 0, or nearly all rows without an active latent)
    check_fit: bool = True  # false = score it anyway
    ms_run: Optional[str] = None  # a finished `python -m vlmsae.monosemanticity` run: reuse top_images/, latents.csv
    layer: Any = None  # null = the SAE's layer (trained_on.layer); or a block index / "last"
    # cls | mean | max over patch tokens; null = cls if the SAE read CLS tokens, else mean
    # (as vlmsae.monosemanticity, so both jobs rank the same top images)
    pool: Optional[str] = None
    top_k: int = 16  # images kept per latent in top_images/ (>= n_top)
    n_top: int = 16  # METHOD §4: top-16 images, 120 pairs; a latent with fewer firing images is excluded
    min_majority: float = 0.5  # latent_taxa.csv label: deepest rank whose majority taxon holds more than this share
    batch_size: Optional[int] = None  # images per forward; null = data.images_per_forward
    device: str = "auto"  # auto | cpu | cuda | cuda:N
