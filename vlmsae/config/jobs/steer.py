"""Schema of ``python -m vlmsae.steer`` (``conf/steer.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class SteerJob:
    """Steer LLaVA through SAE latents in its vision tower (METHOD §5) and compare with the unsteered answer."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    model: Any = MISSING  # the LLaVA to steer: a conf/model/ choice with backend hf_llava (its own model_schema)
    # SAE folder (save_sae output, a published SAE's folder or hf://org/repo); its trained_on.layer picks the block
    sae_path: str = MISSING
    sae_format: Optional[str] = None  # null = detect; vlmsae | dictionary_learning | saelens | sparsify | saev | ...
    # stop when the SAE does not fit the first batch it is fed (FVE < 0, or nearly all rows without an active latent)
    check_fit: bool = True  # false = score it anyway
    layer: Optional[int] = None  # override the vision block to hook (default: the SAE's trained_on.layer)
    latent: Any = 0  # latent index, or a list [j1, j2] to clamp several at once
    alpha: Any = 100.0  # new value of the latent(s); a list matches `latent` one to one (paper: 100)
    mode: str = "replace"  # replace (paper: f_j = alpha, decode) | error_preserving (h + dec(f') - dec(f)) | add
    patches: Any = None  # null/all | cls | patches | [patch indices, row-major over the grid]
    prompt: str = "What is shown in this image? Use exactly one word!"
    image: Any = "white"  # an image path, a list of paths, `white`, or `skimage:<name>` (e.g. skimage:astronaut)
    max_new_tokens: int = 30
    batch_size: int = 8  # images per generate call
    compare_add: bool = True  # also run plain activation steering (h + alpha * unit W_dec[j]) as a baseline
    sweep: Optional[list[float]] = None  # optional alphas, e.g. [0, 30, 40, 50] (the paper's love-poem sweep)
    device_map: Optional[str] = None  # LLaVA-7B: auto (accelerate spreads it over GPUs/CPU), cuda:0, or null
    seed: int = 0  # torch seed set before anything runs (generation itself is greedy)
