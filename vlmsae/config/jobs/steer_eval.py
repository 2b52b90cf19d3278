"""Schema of ``python -m vlmsae.steer_eval`` (``conf/steer_eval.yaml``): every top-level key, default, meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class SteerEvalJob:
    """The steering score of METHOD §5: clamp latent j to alpha, ask LLaVA for one word, compare (CLIP text
    embedding cosine) with j's concept = the mean image embedding of its top images."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    model: Any = MISSING  # the LLaVA to steer: a conf/model/ choice with backend hf_llava (its own model_schema)
    embedder: Any = MISSING  # a conf/embedder/ choice with a text tower (CLIP: clip_b32 in the paper, tiny in tests)
    # SAE folder or hf://org/repo (the paper: Matryoshka x64 at block 22, 2 random tokens/image)
    sae_path: str = MISSING
    sae_format: Optional[str] = None  # null = detect; vlmsae | dictionary_learning | saelens | sparsify | saev | ...
    # stop when the SAE does not fit the first batch it is fed (FVE < 0, or nearly all rows without an active latent)
    check_fit: bool = True  # false = score it anyway
    top_images: str = MISSING  # top_images/ folder of a monosemanticity run with that SAE (image paths and labels)
    layer: Optional[int] = None  # vision block to hook (default: the SAE's trained_on.layer)
    # a count (10 = latents 0..9; the paper: 10 with ImageNet images, 1000 with the white image) or a list
    latents: Any = 10
    alpha: float = 100.0  # the clamped value (paper: 100)
    mode: str = "replace"  # replace (paper) | error_preserving | add (plain activation steering baseline)
    images: str = "white"  # white | a folder of images | a text file of image paths (paper: 1000 ImageNet val images)
    n_images: Optional[int] = 1000  # at most this many evaluation images (a seeded random subset); null = all
    top_n: int = 16  # top images per latent that define its concept
    compare_add: bool = False  # also score plain activation steering (h + alpha * unit W_dec[j]) at the same alpha
    class_names: Optional[str] = None  # label id -> name (.txt one per line, or .json) for the bounds; null = skip
    prompt: str = "What is shown in this image? Use exactly one word!"
    max_new_tokens: int = 5
    batch_size: int = 16  # samples per generate call (each may steer a different latent)
    device_map: Optional[str] = None  # LLaVA-7B: auto (accelerate spreads it over GPUs/CPU), cuda:0, or null
    seed: int = 0  # torch seed, the evaluation-image subset and the shuffled lower bound
