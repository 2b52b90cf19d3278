"""Schema of ``python -m vlmsae.monosemanticity`` (``conf/monosemanticity.yaml``): every top-level key and default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from vlmsae.config.nodes import NamingOptions


@dataclass
class MonosemanticityJob(NamingOptions):
    """MS of every SAE latent and every raw neuron of the layer it reads (METHOD §3), top images, plots."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    model: Any = None  # null = the model the SAE was trained on (its trained_on.model)
    data: Any = MISSING  # the images: folder | list | wds | synthetic
    embedder: Any = MISSING  # the image embedder E of the score

    sae_path: str = MISSING  # SAE folder (save_sae output, <run>/sae/; or a published SAE's folder / hf://org/repo)
    sae_format: Optional[str] = None  # null = detect; vlmsae | dictionary_learning | saelens | sparsify | saev | ...
    # stop when the SAE does not fit the first batch it is fed (FVE < 0, or nearly all rows without an active latent)
    check_fit: bool = True  # false = score it anyway
    layer: Any = None  # null = the SAE's trained_on.layer; or a block index / "last"
    pool: Optional[str] = None  # cls | mean | max over patch tokens; null = cls if the SAE read CLS tokens, else mean
    top_k: int = 16  # top-activating images kept per latent (images where it is 0 never count)
    baseline: bool = True  # also score the raw neurons of the same layer
    chunk_size: int = 4096  # images per block in the dense MS path
    dense_threshold: float = 0.1  # reconstruction: a latent firing on more than this fraction of rows is "dense"
    device: Optional[str] = None  # null = the model config's device (auto: first GPU, else CPU); e.g. cpu, cuda:1
    embed_cache: Optional[str] = None  # folder for cached embeddings; null = $VLMSAE_HOME/embeddings
    # also splice the SAE into the source CLIP and compare zero-shot predictions over the class folders
    # (KL at the model's logit scale, top-1 agreement); open_clip models only
    zero_shot: bool = False
    zero_shot_template: str = "a photo of a {}."  # prompt per class name ("_" read as " ")
    zero_shot_max_images: int = 1000  # labelled images the zero-shot check reads (also capped by data.max_images)
    progress: bool = True  # progress bars
    # automatic feature names (vlmsae.studies.naming): each latent's concept (unit mean of its top images' unit
    # embeddings) vs the CLIP text embeddings of a vocabulary; latents.csv gains name, name_score, names.
    # null = off | imagenet (open_clip's 1000 class names) | wordnet (concrete nouns) | <file, one name per line>
    # | labels (the scored images' class names, each embedded as its images' mean: no text side needed)
    names: Optional[str] = None
