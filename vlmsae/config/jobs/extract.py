"""Schema of ``python -m vlmsae.extract`` (``conf/extract.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class ExtractJob:
    """Run images through a vision encoder up to ``layer`` and write the selected tokens as an activation store."""

    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb (vlmsae.report.job_log)
    model: Any = MISSING  # the model group (conf/model/*.yaml, model_schema)
    data: Any = MISSING  # the image source group (conf/data/*.yaml, data_schema): folder | list | wds | synthetic
    layer: Any = -2  # block index (0-based; negative from the end) or "last" (the projected embedding)
    tokens: str = "cls"  # cls | patches | all | random_k | mean
    k: int = 2  # tokens per image for tokens=random_k
    dtype: str = "float16"  # stored activations: float16 | bfloat16 | float32
    out: Optional[str] = None  # output folder or fsspec URL (s3://bucket/store, ...); null = Hydra's run dir
    staging_dir: Optional[str] = None  # out=<url>: local folder a shard is written in before upload; null = a temp dir
    rows_per_shard: int = 65536  # rows per acts-%06d.tar (a shard ends on a batch boundary)
    rows_per_chunk: int = 4096  # rows per safetensors sample inside a tar
    seed: int = 0  # random_k token draws
    # seed of the image visiting permutation; null = listing order. Any, not Optional[int]: the extraction checks
    # it and its message says what the seed is for (vlmsae.models.extraction.ExtractionPlan)
    order_seed: Any = 0
    progress: bool = True  # tqdm bar with images/s
