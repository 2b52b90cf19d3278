"""Schema of ``python -m vlmsae.train`` (``conf/train.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class ValMsConfig:
    """MS while training (vlmsae.lit.val_ms): off unless ``images`` is set."""

    images: Any = None  # null = off; an image folder, or a data node e.g. {source: synthetic, n_per_class: 2}
    embedder: Any = "clip_b32"  # the image embedder E: a conf/embedder/ name (clip_b32, pixels, ...) or a node
    every_n_steps: Optional[int] = None  # null = at every validation (trainer.val_check_interval)
    max_images: int = 256  # the first N images of ``images``


@dataclass
class TrainJob:
    """Train one SAE on a store's activations (``data=acts``) or on activations computed from images."""

    model: Any = MISSING  # the model group (conf/model/*.yaml): whose activations
    sae: Any = MISSING  # the SAE group (conf/sae/*.yaml)
    data: Any = MISSING  # the data group (conf/data/*.yaml): acts (a store) or an image source
    trainer: Any = MISSING  # the trainer group (conf/trainer/*.yaml)
    logger: Any = MISSING  # the logger group (conf/logger/*.yaml): none | csv | wandb
    # block index (0-based), negative from the end, or "last". data=acts: null = the store's layer, and a set
    # layer must match the store; image sources: null = n_layers - 2
    layer: Any = None
    tokens: Optional[str] = None  # cls | patches | all | mean | random_k (data=acts: the store's; images: null = cls)
    tokens_k: int = 2  # tokens per image for tokens=random_k (image sources; a store records its own k)
    # auto: in Hydra's default run dir, rerunning the same command continues the unfinished run with this config
    # IN its folder (a finished one is not trained again); in a run dir you chose (hydra.run.dir=, a multirun job),
    # that dir's own checkpoint if any (a requeued SLURM job). true: as auto, and in a chosen dir also the newest
    # sibling run with this config; false: always a fresh run (train again); or a run dir / .ckpt path to continue
    # (in that run's folder unless you chose one) (vlmsae.lit.resume)
    resume: Any = "auto"
    # many SAEs per pass (vlmsae.lit.fit): a list of overrides of the sae node, each with an optional lr, e.g.
    # '[{expansion:4,k:8},{expansion:8,k:8,arch:topk,lr:1e-4}]'; null = one SAE from the sae node
    sae_grid: Any = None
    # sae_grid only: where each SAE trains. auto = round-robin over the visible CUDA devices when the trainer runs
    # on a GPU (else CPU); or one device per grid entry, e.g. '[0,1,cuda:1,cpu]'. Each batch is copied once per device
    sae_devices: Any = "auto"
    seed: int = 0  # SAE init, data order (with data.shuffle_seed) and on-the-fly token sampling
    val_ms: ValMsConfig = field(default_factory=ValMsConfig)  # log val/ms_mean while training (default off)
