"""One dataclass per config node: the Hydra schema of ``conf/<group>/*.yaml`` and the library's typed argument.

Each is stored in Hydra's ConfigStore (:data:`SCHEMAS`, at the bottom), so a misspelt key (``model.widht=3``) or a
wrong type (``sae.k=abc``) fails at compose time naming the key. The library takes the same classes
(``vlmsae.models.ModelSpec``, ``vlmsae.sae.SAEConfig``, ...), built by ``vlmsae.config.to_typed``: a config key is
added in one dataclass here and one YAML file. Every field says what it is for.

Import-light on purpose (dataclasses and omegaconf only, no torch): this is the bottom layer, and ``--help``
must stay instant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

# ---------------------------------------------------------------------------------------------- helpers


def check_known(cls: type, values: Mapping[str, Any]) -> None:
    """Unknown keys are an error that lists the valid ones (and says where the old ``extra:`` keys went)."""
    what = _NODE_KEYS.get(cls.__name__, cls.__name__)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        hint = ""
        if "extra" in unknown:
            hint = (
                f" The untyped `extra:` dict is gone: its keys are {what} fields now (write {what}.seed=1, "
                f"not {what}.extra.seed=1)."
            )
        raise ValueError(f"Unknown {what} field(s) {unknown}: valid fields are {sorted(names)}.{hint}")


_NODE_KEYS = {"ModelSpec": "model", "EmbedderSpec": "embedder", "SAEConfig": "sae", "DataSchema": "data"}
"""The config key of each node class, for error messages (``sae.kk``, not ``SAEConfig.kk``)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


OPEN_CLIP_OVERRIDES = ("quick_gelu", "image_mean", "image_std", "image_interpolation", "image_resize_mode")
"""Fields of ModelSpec and EmbedderSpec that override what an open_clip tag or folder config says
(vlmsae.models.open_clip_backend.resolve_open_clip_weights validates them)."""


def open_clip_overrides(spec: Any) -> dict[str, Any]:
    """``{field: value}`` of the :data:`OPEN_CLIP_OVERRIDES` a model or embedder spec sets (None = not set)."""
    return {name: getattr(spec, name) for name in OPEN_CLIP_OVERRIDES}


# ---------------------------------------------------------------------------------------------- model

BACKENDS = ("open_clip", "hf_clip", "hf_llava")
"""Model backends :func:`vlmsae.models.load_tap` knows."""


@dataclass
class ModelSpec:
    """A vision encoder to tap (METHOD §1): the ``model`` node (``conf/model/*.yaml``, ``model_schema``)."""

    name: str = MISSING  # short name used in outputs, e.g. clip_l14_336
    backend: str = MISSING  # open_clip | hf_clip | hf_llava
    arch: str = MISSING  # open_clip model name (ViT-L-14-336, hf-hub:org/repo) or a transformers class hint
    pretrained: Optional[str] = None  # open_clip tag (openai, webli), HF id, or a local file/folder
    local_path: Optional[str] = None  # local weights (file or folder) that take precedence over `pretrained`
    # open_clip: the registered pretrained config (openai, webli) whose preprocessing and activation weights
    # from a file need when `pretrained` is itself a file; otherwise the `pretrained` tag is used
    pretrained_tag: Optional[str] = None
    cache_dir: Optional[str] = None  # where downloaded weights are cached
    image_size: int = 224  # input side in pixels
    n_layers: int = 24  # transformer blocks in the vision tower
    width: int = 1024  # residual stream width d
    embed_dim: Optional[int] = None  # width of the projected embedding (layer=last); null = none (LLaVA tower)
    has_cls: bool = True  # SigLIP has no CLS token
    dtype: str = "float32"  # float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tiny: bool = False  # a random tiny model materialised locally (tests, demo)
    seed: int = 0  # tiny: seed of the random weights, used when the tiny model's folder is first built
    patch_size: int = 8  # tiny, hf_clip: patch side of the random CLIP (open_clip / LLaVA tiny models fix theirs)
    # open_clip, for weights no registered tag describes: each overrides the tag's / folder config's value
    quick_gelu: Optional[bool] = None  # QuickGELU (true, OpenAI weights) or GELU (false); null = the tag decides
    image_mean: Optional[list[float]] = None  # per-channel (R, G, B) normalisation mean; null = the tag's
    image_std: Optional[list[float]] = None  # per-channel (R, G, B) normalisation std, all > 0; null = the tag's
    image_interpolation: Optional[str] = None  # bicubic | bilinear; null = the tag's
    image_resize_mode: Optional[str] = None  # shortest | longest | squash; null = the tag's
    # hf_llava: accelerate device map (auto spreads LLaVA-7B over GPUs/CPU, or cuda:0); null = all on `device`.
    # The steer jobs' top-level device_map sets it.
    device_map: Optional[str] = None
    # hf_llava: never download; null = only when HF_HUB_OFFLINE is set or the weights are a local folder
    local_files_only: Optional[bool] = None

    def __post_init__(self) -> None:
        # MISSING fields (required in Hydra) must be given when the library builds the node
        unset = [name for name in ("name", "backend", "arch") if getattr(self, name) == MISSING]
        if unset:
            raise ValueError(f"model needs {unset} (no default): set {', '.join(f'model.{n}' for n in unset)}.")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"Unknown model backend {self.backend!r} (model {self.name!r}): use one of {list(BACKENDS)}."
            )


# ---------------------------------------------------------------------------------------------- embedder

EMBEDDER_BACKENDS = ("open_clip", "hf", "pixels", "cnn")
"""Embedder backends :func:`vlmsae.models.embedders.load_embedder` knows."""


@dataclass
class EmbedderSpec:
    """The image embedder E of the monosemanticity and steering scores (METHOD §3, 5): the ``embedder`` node
    (``conf/embedder/*.yaml``, ``embedder_schema``; loaded by ``vlmsae.models.embedders.load_embedder``)."""

    name: str = "clip_b32"  # short name used in cache keys and outputs
    backend: str = "open_clip"  # open_clip | hf | pixels | cnn (the digits CNN, vlmsae.models.digits)
    arch: str = "ViT-B-32"  # open_clip model name, or the transformers model id (facebook/dinov2-base)
    pretrained: Optional[str] = None  # open_clip tag (openai) or checkpoint file; hf: unused
    local_path: Optional[str] = None  # local weights (open_clip checkpoint/folder, or a save_pretrained folder)
    pretrained_tag: Optional[str] = None  # open_clip: registered config of file weights (as ModelSpec's)
    cache_dir: Optional[str] = None  # where downloaded weights are cached
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float16 | bfloat16
    batch_size: int = 64  # images per forward
    tiny: bool = False  # open_clip: the random tiny CLIP built locally (tests); cnn: trained locally on first use
    embed_dim: int = 64  # pixels backend: output width
    image_size: int = 16  # pixels backend: images are resized to image_size^2 before the projection
    seed: int = 0  # tiny / pixels / cnn: fixes the random weights (cnn: and its training order)
    # open_clip, for weights no registered tag describes (as ModelSpec's): each overrides the tag's value
    quick_gelu: Optional[bool] = None  # QuickGELU (true) or GELU (false); null = the tag decides
    image_mean: Optional[list[float]] = None  # per-channel (R, G, B) normalisation mean; null = the tag's
    image_std: Optional[list[float]] = None  # per-channel (R, G, B) normalisation std, all > 0; null = the tag's
    image_interpolation: Optional[str] = None  # bicubic | bilinear; null = the tag's
    image_resize_mode: Optional[str] = None  # shortest | longest | squash; null = the tag's

    def __post_init__(self) -> None:
        if self.backend not in EMBEDDER_BACKENDS:
            raise ValueError(f"Unknown embedder backend {self.backend!r}: use one of {list(EMBEDDER_BACKENDS)}.")

    def cache_id(self) -> str:
        """What must match for cached embeddings to be reused."""
        weights = self.local_path or self.pretrained or ("tiny" if self.tiny else "random")
        if self.backend == "open_clip" and (self.local_path or self.pretrained_tag):
            # File weights are prepared as their tag says (before, as open_clip's defaults): new cache entries.
            weights += f"|tag={self.pretrained_tag or self.pretrained}"
        overrides = {k: v for k, v in open_clip_overrides(self).items() if v is not None}
        if self.backend == "open_clip" and overrides:  # other preprocessing or activation: other embeddings
            weights += "|" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        seed = self.seed if self.backend == "pixels" or self.tiny else ""
        return f"{self.name}|{self.backend}|{self.arch}|{weights}|{seed}"


# ---------------------------------------------------------------------------------------------- sae

ARCHS = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")
"""Architectures :func:`vlmsae.sae.build_sae` knows."""

K_ARCHS = ("topk", "batchtopk", "matryoshka")
"""Architectures whose sparsity is set by ``k`` (ReLU-L1 and JumpReLU use ``l1_coeff`` instead)."""

SPARSE_KERNELS = ("auto", "sparse", "dense")

SAE_PRECISIONS = ("auto", "fp32", "fast_exact", "bf16")
"""``SAEConfig.precision`` choices (vlmsae.sae.precision); auto = fast_exact on CUDA, fp32 elsewhere."""

DEFAULT_GROUP_FRACTIONS = (0.0625, 0.125, 0.25, 0.5625)
"""The paper's Matryoshka groups (METHOD §2); used when ``arch="matryoshka"`` and none are given."""

_FRACTION_SUM_TOL = 1e-3  # user-typed fractions like 0.333/0.333/0.334 should pass


@dataclass(frozen=True)
class SAEConfig:
    """One sparse autoencoder (METHOD §2): architecture, size, sparsity and the training mechanics it owns.

    The ``sae`` node (``conf/sae/*.yaml``, ``sae_schema``) and the argument of ``vlmsae.sae.build_sae``.
    Frozen, so a built SAE's settings cannot drift during training, and so that the checkpoint's
    ``config.json`` rebuilds exactly the same module. A node from a YAML leaves ``d_in`` (and usually
    ``n_latents``) unset: they depend on the activations, and :meth:`resolved` fills them
    in. Invalid values raise ``ValueError`` at construction, naming the value and what is expected.
    """

    arch: str = MISSING
    """relu | topk | batchtopk | matryoshka (Matryoshka BatchTopK) | jumprelu (per-latent thresholds, L0 penalty)."""
    d_in: Optional[int] = None
    """Width of the activations the SAE reads (1024 for ViT-L residual streams); None until resolved."""
    n_latents: Optional[int] = None
    """Dictionary size F; None = ``expansion * d_in``, filled when resolved."""
    expansion: Optional[int] = 16
    """n_latents = expansion * d_in unless n_latents is set. Resolved: n_latents / d_in (None when not whole)."""
    k: int = 20
    """Active latents per sample (TopK) or on average per sample (BatchTopK, Matryoshka). Unused by relu."""
    l1_coeff: float = 5.0e-3
    """ReLU-L1: weight of sum_j f_j ||W_dec[j]||; JumpReLU: weight of the L0 penalty (latents firing per sample).
    Both in the scaled input space (E||x||^2 = d_in)."""
    group_fractions: Optional[tuple[float, ...]] = None
    """Matryoshka only: nested group sizes as fractions of n_latents, summing to 1 (None = the paper's four)."""
    aux_k_coeff: float = 1.0 / 32.0
    """Weight of the AuxK dead-latent loss (paper: 1/32). 0 turns AuxK off."""
    aux_k: Optional[int] = None
    """At most this many dead latents reconstruct the residual in AuxK; None = d_in // 2."""
    dead_after_samples: int = 10_000_000
    """A latent that has not fired for this many training samples counts as dead (paper: 10M)."""
    threshold_beta: float = 0.999
    """BatchTopK/Matryoshka: EMA decay of the inference threshold."""
    threshold_start_step: int = 1000
    """BatchTopK/Matryoshka: the threshold EMA is updated from this training step on (paper: 1000)."""
    sparse_kernel: str = "auto"
    """TopK-family training compute: dense autograd, the sparse kernels of vlmsae.sae.sparse, or auto."""
    precision: str = "auto"
    """TopK-family encoder matmul and selection (vlmsae.sae.precision): fp32 (float32 matmul), fast_exact (bf16 /
    TF32 matmul, the float32 selection recomputed at its boundary: same latents, same values), bf16 (bf16 matmul,
    selections may change), auto = fast_exact on CUDA, fp32 elsewhere. Other archs: auto or fp32."""

    def __post_init__(self) -> None:
        for name, choices in (("arch", ARCHS), ("sparse_kernel", SPARSE_KERNELS), ("precision", SAE_PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"SAEConfig.{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}.")
        for name in ("k", "dead_after_samples", "d_in", "n_latents", "expansion"):
            value, optional = getattr(self, name), name in ("d_in", "n_latents", "expansion")
            if not (optional and value is None) and (not _is_int(value) or value < 1):
                later = " (None = set later)" if optional else ""
                raise ValueError(f"SAEConfig.{name} must be a positive integer; got {value!r}{later}.")
        if not _is_int(self.threshold_start_step) or self.threshold_start_step < 0:
            raise ValueError(
                f"SAEConfig.threshold_start_step must be an integer >= 0; got {self.threshold_start_step!r}."
            )
        if self.arch in K_ARCHS and self.n_latents is not None and self.k > self.n_latents:
            raise ValueError(
                f"SAEConfig.k={self.k} is larger than n_latents={self.n_latents}: k must be <= n_latents "
                "(lower k or raise the expansion factor)."
            )
        if self.aux_k is not None and (not _is_int(self.aux_k) or self.aux_k < 1):
            raise ValueError(f"SAEConfig.aux_k must be a positive integer or None (= d_in // 2); got {self.aux_k!r}.")
        for name in ("l1_coeff", "aux_k_coeff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
                raise ValueError(f"SAEConfig.{name} must be a finite number >= 0; got {value!r}.")
        if not isinstance(self.threshold_beta, (int, float)) or not 0.0 <= self.threshold_beta < 1.0:
            raise ValueError(f"SAEConfig.threshold_beta must be in [0, 1) (paper: 0.999); got {self.threshold_beta!r}.")
        if self.arch not in K_ARCHS and self.precision not in ("auto", "fp32"):
            raise ValueError(
                f"SAEConfig.precision={self.precision!r} only applies to the top-k archs ({', '.join(K_ARCHS)}), "
                f"whose selection it makes fast; arch={self.arch!r} computes in float32: use precision=auto or fp32."
            )
        self._validate_groups()
        if self.is_resolved:
            # n_latents decides the size; expansion only records the ratio, so a config.json cannot contradict it
            # (an SAE built with an explicit n_latents, or an old config.json without the field, gets it too).
            ratio = self.n_latents // self.d_in if self.n_latents % self.d_in == 0 else None
            object.__setattr__(self, "expansion", ratio)

    def _validate_groups(self) -> None:
        fractions = self.group_fractions
        if fractions is None:
            if self.arch == "matryoshka":
                object.__setattr__(self, "group_fractions", DEFAULT_GROUP_FRACTIONS)
            return
        if self.arch != "matryoshka":
            raise ValueError(
                f"SAEConfig.group_fractions is only used by arch=matryoshka; got {list(fractions)} with "
                f"arch={self.arch!r} (leave it None)."
            )
        if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__iter__"):
            raise ValueError(f"SAEConfig.group_fractions must be a list of numbers; got {fractions!r}.")
        fractions = tuple(float(f) for f in fractions)
        object.__setattr__(self, "group_fractions", fractions)
        if not fractions or any(not f > 0 for f in fractions):
            raise ValueError(
                f"SAEConfig.group_fractions must be a non-empty list of fractions > 0; got {list(fractions)}."
            )
        total = sum(fractions)
        if abs(total - 1.0) > _FRACTION_SUM_TOL:
            raise ValueError(
                f"SAEConfig.group_fractions must sum to 1 (within {_FRACTION_SUM_TOL}); got {list(fractions)} "
                f"which sums to {total:.6g}."
            )
        if self.n_latents is None:
            return  # group sizes are checked once the size is known (resolved)
        sizes = _fractions_to_sizes(fractions, self.n_latents)
        if min(sizes) < 1:
            raise ValueError(
                f"SAEConfig.group_fractions={list(fractions)} give an empty group with n_latents={self.n_latents} "
                f"(sizes {sizes}); use larger fractions or more latents."
            )

    @property
    def is_resolved(self) -> bool:
        """True once ``d_in`` and ``n_latents`` are known (what ``build_sae`` needs)."""
        return self.d_in is not None and self.n_latents is not None

    def resolved(self, d_in: int) -> SAEConfig:
        """A copy for activations ``d_in`` wide: ``d_in`` set and ``n_latents = expansion * d_in`` unless set."""
        if not _is_int(d_in) or d_in < 1:
            raise ValueError(f"The activation width d_in must be a positive integer; got {d_in!r}.")
        if self.d_in is not None and self.d_in != d_in:
            raise ValueError(
                f"sae.d_in={self.d_in} but the activations are {d_in} wide: leave sae.d_in unset (it is filled "
                "from the activations)."
            )
        n_latents = self.n_latents
        if n_latents is None:
            if self.expansion is None:
                raise ValueError(
                    f"sae.expansion must be a positive integer when sae.n_latents is unset; got {self.expansion!r}."
                )
            n_latents = self.expansion * d_in
        return dataclasses.replace(self, d_in=d_in, n_latents=n_latents)

    @property
    def group_sizes(self) -> list[int]:
        """Latents per Matryoshka group, in order (one group of n_latents for other archs).

        Each group gets floor(fraction * F); the last takes the remainder. This reproduces the
        paper's iNat sizes 3/13/53/290/1177 from 0.002/0.009/0.035/0.189/0.765 of 1536.
        """
        if self.n_latents is None:
            raise ValueError("SAEConfig.group_sizes needs n_latents: resolve the config first (cfg.resolved(d_in)).")
        if self.group_fractions is None:
            return [self.n_latents]
        return _fractions_to_sizes(self.group_fractions, self.n_latents)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); ``SAEConfig(**d)`` rebuilds it."""
        out = dataclasses.asdict(self)
        if out["group_fractions"] is not None:
            out["group_fractions"] = list(out["group_fractions"])
        return out


def _fractions_to_sizes(fractions: tuple[float, ...], n_latents: int) -> list[int]:
    # The 1e-6 guards float products like 0.29 * 100 = 28.999999999999996.
    sizes = [math.floor(f * n_latents + 1e-6) for f in fractions[:-1]]
    sizes.append(n_latents - sum(sizes))
    return sizes


# ---------------------------------------------------------------------------------------------- data


@dataclass
class DataSchema:
    """Where images or activations come from: the ``data`` node (``conf/data/*.yaml``, ``data_schema``)."""

    source: str = MISSING  # folder | wds | list | acts | images | synthetic
    root: Optional[str] = None  # image folder, WebDataset url/pattern, or list file
    acts: Optional[str] = None  # activation store folder (data=acts: train on a cache written by extract)
    image_source: str = "folder"  # data=images: which image source feeds the on-the-fly activations
    batch_size: int = 64  # train: rows per optimizer step (METHOD §2: 4096); images per forward: images_per_forward
    num_workers: int = 2  # data-loading worker processes
    shuffle_buffer: int = 16384  # rows held for shuffling when streaming shards
    val_fraction: float = 0.01  # held-out shards/rows for validation
    max_images: Optional[int] = None  # cap, for quick looks (extract: a random subset, see order_seed)
    exif_transpose: bool = True  # decode images in their EXIF orientation (vlmsae.data.images)
    fast_decode: bool = False  # extract: JPEG draft decoding + reduce, approximate (vlmsae.data.images.load_image)
    shuffle_seed: int = 0  # train: added to the job's seed for the data order
    synthetic_seed: int = 0  # synthetic: seed of the generated images
    n_per_class: int = 8  # synthetic: generated images per shape x colour class (16 classes, vlmsae.data.concepts)
    size: int = 64  # synthetic: side of the generated images in pixels
    # images per encoder forward: extract, the images of monosemanticity / hierarchy / val_ms, and training on
    # the fly (data=images, data=tiny)
    images_per_forward: int = 64
    seed: Optional[int] = None  # split: refused with a message naming shuffle_seed and synthetic_seed

    def __post_init__(self) -> None:
        if self.seed is not None:
            raise ValueError(
                f"data.seed={self.seed} had two meanings and is split: data.shuffle_seed (train: added to the job's "
                "seed for the data order) and data.synthetic_seed (data=synthetic/tiny: seed of the generated images)."
            )


# ---------------------------------------------------------------------------------------------- trainer


@dataclass
class TrainerSchema:
    """Lightning trainer settings (a subset, mapped onto ``lightning.Trainer`` by vlmsae.train): the
    ``trainer`` node (``conf/trainer/*.yaml``, ``trainer_schema``)."""

    accelerator: str = "cpu"  # cpu | gpu | auto (lightning.Trainer accelerator)
    devices: Any = 1  # devices per node: a count, -1 = all visible, or a list of ids
    strategy: str = "auto"  # auto | ddp (each rank streams its own shards)
    num_nodes: int = 1  # machines; launch one process per node (torchrun / SLURM)
    precision: str = "32-true"  # the only one accepted: the SAE computes in float32 (vlmsae.sae.precision)
    max_steps: int = 110_000  # optimizer steps (METHOD §2: 110k)
    val_check_interval: int = 1000  # validate every this many steps
    limit_val_batches: int = 20  # validation batches per check
    log_every_n_steps: int = 50  # scalars logged every this many steps
    checkpoint_every_n_steps: int = 1000  # step*.ckpt (and last.ckpt) every this many steps, for resume
    gradient_clip_val: float = 1.0  # gradient norm clip; 0 = off
    lr: Optional[float] = None  # None = 2e-4 / sqrt(n_latents / 2^14) (METHOD §2)
    warmup_steps: int = 1000  # linear learning-rate warmup
    scale_batches: int = 100  # batches used to estimate the input scale (and the b_dec init)
    enable_progress_bar: bool = True  # tqdm bars (not part of what resume=true matches)


# ---------------------------------------------------------------------------------------------- logger


@dataclass
class LoggerSchema:
    """Where metrics go: the ``logger`` node (``conf/logger/*.yaml``, ``logger_schema``)."""

    kind: str = "none"  # none | csv | wandb (W&B plus a CSV mirror)
    project: str = "vlmsae"  # wandb: project
    entity: Optional[str] = None  # wandb: team or user; null = the logged-in default
    mode: str = "online"  # wandb: online | offline | disabled (WANDB_MODE wins when set)
    tags: list[str] = field(default_factory=list)  # wandb: run tags
    group: Optional[str] = None  # wandb: run group (e.g. a sweep's name)
    # wandb, jobs other than train (vlmsae.report.job_log): rows per logged table (monosemanticity's latents
    # table keeps the latents of highest MS, each with thumbnails of its first top images)
    table_rows: int = 2000


# ---------------------------------------------------------------------------------------------- taxonomy


@dataclass
class TaxonomySchema:
    """Where the taxon path of each image comes from (METHOD §4; vlmsae.data.taxonomy): the ``taxonomy`` node
    (``conf/taxonomy/*.yaml``, ``taxonomy_schema``)."""

    kind: str = MISSING  # inat_dirnames | inat_json | wordnet | csv | concepts
    path: Optional[str] = None  # file or folder of the taxonomy; inat_dirnames/wordnet/concepts: null = data root
    key_column: Optional[str] = None  # csv: column holding the image key / class name (null = the first)
    ranks: Optional[list[str]] = None  # csv: rank columns, root first (null = every other column)
    wordnet_dpath: Optional[str] = None  # wordnet: folder with data.noun (null = Debian's or nltk's WordNet)


@dataclass
class NamingOptions:
    """The keys of automatic feature names (vlmsae.studies.naming) shared by ``monosemanticity`` and ``names``
    (each job declares its own ``names`` key: off by default in monosemanticity, imagenet in names)."""

    names_templates: list[str] = field(  # prompts, {} = the name; embeddings averaged over them (CLIP zero-shot)
        default_factory=lambda: [
            "a photo of a {}.",
            "a blurry photo of a {}.",
            "a close-up photo of a {}.",
            "a photo of many {}.",
        ]
    )
    names_top: int = 3  # names kept per latent in the `names` column, best first
    # the optional LLaVA naming pass (vlmsae.studies.autointerp): LLaVA's one word for a 3x3 grid of each latent's top
    # images, scored by the cosine of its text embedding with the latent's concept; latents.csv gains autointerp,
    # autointerp_score. null = off | llava (needs names=...: it scores in the names pass's space)
    autointerp: Optional[str] = None
    autointerp_model: str = "llava15_7b"  # a conf/model/ LLaVA (backend hf_llava); tiny_llava: random, offline
    autointerp_max_latents: int = 200  # latents asked, highest MS first; the others keep empty cells


# (the group a schema types, its ConfigStore name, the dataclass). Stored at the root of the ConfigStore, not inside
# their group, where ``--help`` and Hydra's "Available options" would list them as choices; group YAMLs start with
# ``defaults: [/<name>@_here_, _self_]``, e.g. ``conf/sae/topk.yaml`` lists ``/sae_schema@_here_``.
SCHEMAS: list[tuple[str | None, str, type]] = [
    ("sae", "sae_schema", SAEConfig),
    ("model", "model_schema", ModelSpec),
    ("data", "data_schema", DataSchema),
    ("trainer", "trainer_schema", TrainerSchema),
    ("logger", "logger_schema", LoggerSchema),
    ("embedder", "embedder_schema", EmbedderSpec),
    ("taxonomy", "taxonomy_schema", TaxonomySchema),
]
