"""Schemas for the core config nodes. Every field says what it is for.

Group YAMLs start with ``defaults: [<schema name>, _self_]``; e.g. ``conf/sae/topk.yaml`` lists
``sae_schema``. Add a field here before using it in a YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class SAESchema:
    """One sparse autoencoder (SPEC section 2)."""

    arch: str = MISSING  # relu | topk | batchtopk | matryoshka
    expansion: int = 16  # n_latents = expansion * d_in unless n_latents is set
    n_latents: Optional[int] = None  # explicit dictionary size; overrides expansion
    k: int = 20  # active latents per sample (TopK) or on average per sample (BatchTopK)
    l1_coeff: float = 5.0e-3  # ReLU-L1 only: weight of sum_j f_j ||W_dec[j]||
    group_fractions: Optional[list[float]] = None  # Matryoshka only: nested group sizes, sum to 1
    aux_k_coeff: float = 0.03125  # AuxK weight 1/32 (SPEC 2)
    aux_k: Optional[int] = None  # dead latents used by AuxK; None = d_in // 2
    dead_after_samples: int = 10_000_000  # a latent that has not fired for this many samples is dead
    threshold_beta: float = 0.999  # BatchTopK inference threshold EMA
    threshold_start_step: int = 1000  # EMA updates start after this many steps
    sparse_kernel: str = "auto"  # auto | sparse | dense: TopK/BatchTopK training compute path


@dataclass
class ModelSchema:
    """A vision encoder to tap (SPEC section 1)."""

    name: str = MISSING  # short name used in outputs, e.g. clip_l14_336
    backend: str = MISSING  # open_clip | hf_clip | hf_llava
    arch: str = MISSING  # open_clip model name (ViT-L-14-336) or transformers class hint
    pretrained: Optional[str] = None  # open_clip tag (openai, webli), HF id, or a local file/folder
    local_path: Optional[str] = None  # local weights that take precedence over `pretrained`
    # open_clip: the registered pretrained config (openai, webli) whose preprocessing and activation weights
    # from a file need when `pretrained` is itself a file; otherwise the `pretrained` tag is used
    pretrained_tag: Optional[str] = None
    cache_dir: Optional[str] = None  # where downloaded weights are cached
    image_size: int = 224
    n_layers: int = 24  # transformer blocks in the vision tower
    width: int = 1024  # residual stream width d
    embed_dim: Optional[int] = None  # width of the projected embedding (layer=last)
    has_cls: bool = True  # SigLIP has no CLS token
    dtype: str = "float32"  # float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tiny: bool = False  # a random tiny model materialised locally (tests, demo)
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific options


@dataclass
class DataSchema:
    """Where images or activations come from."""

    source: str = MISSING  # folder | wds | list | acts | images | synthetic
    root: Optional[str] = None  # image folder, WebDataset url/pattern, or list file
    acts: Optional[str] = None  # activation shard folder (train on a cache)
    image_source: str = "folder"  # data=images: which image source feeds on-the-fly activations
    batch_size: int = 64  # images per forward (extract) or rows per step (train)
    num_workers: int = 2
    shuffle_buffer: int = 16384  # rows held for shuffling when streaming shards
    val_fraction: float = 0.01  # held-out shards/rows for validation
    max_images: Optional[int] = None  # cap, for quick looks (extract: a random subset, see order_seed)
    exif_transpose: bool = True  # decode images in their EXIF orientation (vlmsae.data.images)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerSchema:
    """Lightning trainer settings (a subset, mapped onto ``lightning.Trainer``)."""

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = 110_000
    val_check_interval: int = 1000
    limit_val_batches: int = 20
    log_every_n_steps: int = 50
    checkpoint_every_n_steps: int = 1000
    gradient_clip_val: float = 1.0
    lr: Optional[float] = None  # None = 2e-4 / sqrt(n_latents / 2^14)
    warmup_steps: int = 1000
    scale_batches: int = 100  # batches used to estimate the input scale
    seed: int = 0
    enable_progress_bar: bool = True


@dataclass
class LoggerSchema:
    """Where metrics go."""

    kind: str = "none"  # none | csv | wandb
    project: str = "vlmsae"
    entity: Optional[str] = None
    mode: str = "online"  # wandb: online | offline | disabled
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None


@dataclass
class TaxonomySchema:
    """Where the taxon path of each image comes from (SPEC 4; vlmsae.data.taxonomy)."""

    kind: str = MISSING  # inat_dirnames | inat_json | wordnet | csv | concepts
    path: Optional[str] = None  # file or folder of the taxonomy; inat_dirnames/wordnet: null = the data root
    key_column: Optional[str] = None  # csv: column holding the image key / class name (null = the first)
    ranks: Optional[list[str]] = None  # csv: rank columns, root first (null = every other column)
    wordnet_dpath: Optional[str] = None  # wordnet: folder with data.noun (null = Debian's or nltk's WordNet)


@dataclass
class EmbedderSchema:
    """The image embedder E of the monosemanticity and steering scores (SPEC 3, 5; vlmsae.models.embedders)."""

    name: str = MISSING  # short name used in cache keys and outputs, e.g. clip_b32
    backend: str = MISSING  # open_clip | hf | pixels
    arch: str = "ViT-B-32"  # open_clip model name, or the transformers model id (facebook/dinov2-base)
    pretrained: Optional[str] = None  # open_clip tag (openai) or checkpoint file
    local_path: Optional[str] = None  # local weights (checkpoint file/folder, save_pretrained folder)
    pretrained_tag: Optional[str] = None  # open_clip: registered config of file weights (as ModelSchema's)
    cache_dir: Optional[str] = None  # where downloaded weights are cached
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 64  # images per forward
    tiny: bool = False  # open_clip: the random tiny CLIP built locally (tests)
    embed_dim: int = 64  # pixels backend: output width
    image_size: int = 16  # pixels backend: resize side before the projection
    seed: int = 0  # tiny / pixels: fixes the random weights
    extra: dict[str, Any] = field(default_factory=dict)


SCHEMAS: list[tuple[str | None, str, type]] = [
    ("sae", "sae_schema", SAESchema),
    ("model", "model_schema", ModelSchema),
    ("data", "data_schema", DataSchema),
    ("trainer", "trainer_schema", TrainerSchema),
    ("logger", "logger_schema", LoggerSchema),
    ("embedder", "embedder_schema", EmbedderSchema),
    ("taxonomy", "taxonomy_schema", TaxonomySchema),
]
