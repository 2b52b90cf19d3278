"""Schema of ``python -m vlmsae.splice_eval`` (``conf/splice_eval.yaml``): every top-level key, default, meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class SpliceEvalJob:
    """Splice fidelity inside LLaVA: the SAE's reconstruction in place of its vision block's output, LLaVA
    teacher-forced on reference answers; KL(clean || spliced), NLL and the fraction of loss recovered against
    zero- and mean-ablating the block."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    model: Any = MISSING  # the LLaVA: a conf/model/ choice with backend hf_llava (tiny_llava by default)
    sae_path: str = MISSING  # SAE folder or hf://org/repo, trained on that LLaVA's vision tower
    sae_format: Optional[str] = None  # null = detect; vlmsae | dictionary_learning | saelens | sparsify | saev | ...
    # stop when the SAE does not fit the first batch it is fed (FVE < 0, or nearly all rows without an active latent)
    check_fit: bool = True  # false = score it anyway
    layer: Optional[int] = None  # vision block to splice (default: the SAE's trained_on.layer)
    # null = the built-in images (white + scikit-image's astronaut, coffee, chelsea); a folder of images; or a list
    # of `white` / `skimage:<name>` / image paths. With prompts=<file>, relative image paths are read under it.
    images: Any = None
    # a .json list of {image, prompt, answer} or a .csv with columns image,prompt,answer (the reference answers);
    # null = the built-in set: every image asked "Describe the image.", answered by the clean model (greedy)
    prompts: Optional[str] = None
    n_images: Optional[int] = None  # at most this many samples (the first ones); null = all
    max_new_tokens: int = 20  # length of the clean model's answers in the built-in set
    batch_size: int = 4  # samples per forward
    # the CLIP zero-shot splice of `monosemanticity zero_shot=true` as one more row, for an SAE whose source is an
    # open_clip CLIP; needs zero_shot_images (class folders); otherwise skipped with a note
    zero_shot: bool = False
    zero_shot_images: Optional[str] = None  # an ImageFolder tree (one folder per class) for the zero-shot row
    zero_shot_template: str = "a photo of a {}."  # prompt per class name ("_" read as " ")
    zero_shot_max_images: int = 1000  # labelled images the zero-shot row reads
    device_map: Optional[str] = None  # LLaVA-7B: auto (accelerate spreads it over GPUs/CPU), cuda:0, or null
    seed: int = 0  # torch seed set before anything runs (generation is greedy)
