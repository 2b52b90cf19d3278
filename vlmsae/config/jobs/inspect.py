"""Schema of ``python -m vlmsae.inspect`` (``conf/inspect.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class InspectJob:
    """Ask an SAE about one's own images: its top latents on each, where they fire, names from an MS run."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    model: Any = None  # null = the model the SAE was trained on (its trained_on.model)
    embedder: Any = None  # query= only: null = the MS run's own embedder (its run_info.json); it must be a CLIP
    sae_path: str = MISSING  # SAE folder (save_sae output, <run>/sae/; or a published SAE's folder / hf://org/repo)
    sae_format: Optional[str] = None  # null = detect; vlmsae | dictionary_learning | saelens | sparsify | saev | ...
    layer: Any = None  # null = the SAE's trained_on.layer; or a block index / "last"
    pool: Optional[str] = None  # cls | mean | max over patch tokens; null = cls if the SAE read CLS tokens, else mean
    images: Any = MISSING  # an image file, a folder of images, a .txt list of paths, or a list of any of these
    ms_run: Optional[str] = None  # a monosemanticity run of this SAE: names, MS, frequency, group, top images
    top_n: int = 8  # latents shown per image in each ranking (pooled, peak), per query and per compare side
    strip: int = 8  # top images of the MS run shown per latent
    query: Optional[str] = None  # a text, e.g. "a zebra": the latents whose concept matches it best (needs ms_run)
    compare: bool = False  # exactly two images: the latents that separate them most
    thumb_px: int = 160  # side of the page's image thumbnails and heatmaps
    device: Optional[str] = None  # null = the model config's device (auto: first GPU, else CPU); e.g. cpu, cuda:1
