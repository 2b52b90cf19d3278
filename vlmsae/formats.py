"""Every on-disk format that one job writes and another reads: a dataclass, one read, one write.

Each format carries a ``format_version``. A reader accepts the versions in its ``*_VERSIONS`` tuple
and refuses any other (a newer vlmsae wrote it) with a message that names the file, the version found,
the versions this vlmsae reads and the fix. Files written before versions existed carry none: they are
read as version 1, so finished runs still load. Writers are atomic (:mod:`vlmsae.utils.io`).

Readers take the file itself or the folder that holds it (the file names are fixed, the constants
below); writers take the folder and return the written path.

===================  ==================================  ===========================================
file                 dataclass                           read / write
===================  ==================================  ===========================================
``latents.csv``      :class:`LatentsTable` of            :func:`read_latents_csv` /
                     :class:`LatentRow`                  :func:`write_latents_csv`
``ms_summary.json``  :class:`MsSummary`                  :func:`read_ms_summary` / :func:`write_ms_summary`
``top_images/``      :class:`TopImagesIndex`             :func:`read_top_images` / :func:`write_top_images`
``hierarchy.json``   :class:`HierarchySummary`           :func:`read_hierarchy` / :func:`write_hierarchy`
``steer.json``       :class:`SteerResult`                :func:`read_steer` / :func:`write_steer`
``steer_eval.json``  :class:`SteerEvalResult`            :func:`read_steer_eval` / :func:`write_steer_eval`
``splice.json``      :class:`SpliceResult`               :func:`read_splice` / :func:`write_splice`
``run_info.json``    :class:`RunInfo`                    :func:`read_run_info` / :func:`write_run_info`
``manifest.json``    :class:`StoreManifest` (activation      :func:`read_manifest` / :func:`write_manifest`
                     store)
``progress.json``    :class:`StoreProgress` (extraction      :func:`read_progress` / :func:`write_progress`
                     resume point)
``config.json``      :class:`SAECheckpointConfig` (SAE       :func:`read_sae_config` / :func:`write_sae_config`
                     checkpoint, next to sae.safetensors)
``stability.json``   :class:`StabilitySummary`           :func:`read_stability` / :func:`write_stability`
``inspect.json``     :class:`InspectResult`              :func:`read_inspect` / :func:`write_inspect`
===================  ==================================  ===========================================

``stability_latents.csv`` (:class:`StabilityLatents`, :func:`read_stability_latents` /
:func:`write_stability_latents`) is the per-latent table beside ``stability.json``.

``latents.csv`` has no header object, so its version rides in a first comment line,
``# vlmsae latents.csv format_version=3``, then the usual header and rows. Version 1 is the same table
without that line; version 2 has the line but never the feature-name columns. Version 3 adds optional
columns, written only when the run computed them: ``name``, ``name_score``, ``names`` (automatic feature
names, :mod:`vlmsae.studies.naming`) and ``autointerp``, ``autointerp_score``. Outside vlmsae, skip the
line: ``pandas.read_csv(fpath, skiprows=1)`` (not ``comment="#"``, which would also cut an image key
containing ``#`` in ``top_keys``); spreadsheets show it as a first row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from vlmsae import __version__
from vlmsae.utils.io import atomic_write, atomic_write_json, atomic_write_text

LATENTS_CSV = "latents.csv"
MS_SUMMARY_JSON = "ms_summary.json"
HIERARCHY_JSON = "hierarchy.json"
STEER_JSON = "steer.json"
STEER_EVAL_JSON = "steer_eval.json"
SPLICE_JSON = "splice.json"
RUN_INFO_JSON = "run_info.json"
TOP_IMAGES_DIR = "top_images"
TOP_TENSORS = "top.safetensors"
TOP_IMAGES_JSON = "images.json"
TOP_META_JSON = "meta.json"
MANIFEST_JSON = "manifest.json"
PROGRESS_JSON = "progress.json"
SAE_CONFIG_JSON = "config.json"
STABILITY_JSON = "stability.json"
STABILITY_LATENTS_CSV = "stability_latents.csv"
INSPECT_JSON = "inspect.json"
SAE_FORMAT = "vlmsae-sae"  # the "format" key of an SAE checkpoint's config.json

# The versions each reader understands; the last one is what the writer writes.
LATENTS_CSV_VERSIONS = (1, 2, 3)  # 1: no version line; 2: the version line; 3: optional name columns
MS_SUMMARY_VERSIONS = (1,)
TOP_IMAGES_VERSIONS = (1,)
HIERARCHY_VERSIONS = (1,)
STEER_VERSIONS = (1,)
STEER_EVAL_VERSIONS = (1,)
SPLICE_VERSIONS = (1,)
RUN_INFO_VERSIONS = (1,)
MANIFEST_VERSIONS = (1,)
PROGRESS_VERSIONS = (1,)
SAE_CONFIG_VERSIONS = (1, 2)  # 2: the training record is "trained_on" (version 1 called it "source")
STABILITY_VERSIONS = (1,)
INSPECT_VERSIONS = (1,)
STABILITY_LATENTS_VERSIONS = (1,)  # "# vlmsae stability_latents.csv format_version=1", then header and rows

__all__ = [
    "FormatVersionError",
    "HierarchySummary",
    "InspectResult",
    "LatentRow",
    "LatentsTable",
    "MsSummary",
    "RunInfo",
    "SAECheckpointConfig",
    "SpliceResult",
    "StabilityLatents",
    "StabilitySummary",
    "SteerEvalResult",
    "SteerResult",
    "StoreManifest",
    "StoreProgress",
    "TopImagesIndex",
    "check_version",
    "read_hierarchy",
    "read_inspect",
    "read_latents_csv",
    "read_manifest",
    "read_ms_summary",
    "read_progress",
    "read_run_info",
    "read_sae_config",
    "read_splice",
    "read_stability",
    "read_stability_latents",
    "read_steer",
    "read_steer_eval",
    "read_top_images",
    "write_hierarchy",
    "write_inspect",
    "write_latents_csv",
    "write_manifest",
    "write_ms_summary",
    "write_progress",
    "write_run_info",
    "write_sae_config",
    "write_splice",
    "write_stability",
    "write_stability_latents",
    "write_steer",
    "write_steer_eval",
    "write_top_images",
]


class FormatVersionError(ValueError):
    """A file's ``format_version`` is one this vlmsae cannot read (usually: a newer vlmsae wrote it)."""


def check_version(fpath: Path, found: Any, known: tuple[int, ...], job: str) -> int:
    """``found`` as an int if this vlmsae reads it; else a :class:`FormatVersionError` that says what to do."""
    if isinstance(found, int) and not isinstance(found, bool) and found in known:
        return found
    raise FormatVersionError(
        f"{fpath} has format_version={found!r}, but this vlmsae ({__version__}) reads format_version "
        f"{', '.join(map(str, known))} of {Path(fpath).name}. A newer vlmsae probably wrote it: upgrade vlmsae "
        f"(`git pull` in its checkout, or `pip install -U vlmsae`), or re-run `{job}` with this vlmsae to rewrite it."
    )


def _file(path: str | Path, name: str) -> Path:
    """The file ``name`` in folder ``path``, or ``path`` itself when it is not a folder."""
    path = Path(path)
    return path / name if path.is_dir() else path


def _load_json(fpath: Path, job: str) -> dict[str, Any]:
    if not fpath.is_file():
        raise FileNotFoundError(f"{fpath} not found: run `{job}` first, or point at its output folder.")
    try:
        obj = json.loads(fpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{fpath} is not valid JSON ({err}); re-run `{job}` to rewrite it.") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{fpath} holds a JSON {type(obj).__name__}, expected an object; re-run `{job}`.")
    return obj


# --------------------------------------------------------------------------------------------
# JSON formats: typed fields + ``extra`` (keys this vlmsae does not name, kept on a round trip)
# --------------------------------------------------------------------------------------------
_SKIP = ("format_version", "extra")


def _to_json_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"format_version": obj.format_version}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in _SKIP or (value is None and f.metadata.get("omit_none")):
            continue
        out[f.name] = value
    out.update({k: v for k, v in obj.extra.items() if k not in out})
    return out


def _from_json_dict(cls: type, obj: dict[str, Any], fpath: Path, known: tuple[int, ...], job: str) -> Any:
    # Files written before format_version existed have none: they are version 1.
    version = check_version(fpath, obj.get("format_version", 1), known, job)
    return _build(cls, obj, fpath, job, version)


def _build(cls: type, obj: dict[str, Any], fpath: Path | str, job: str, version: int) -> Any:
    """``cls`` from a flat dict: its named fields typed, every other key in ``extra``."""
    names = [f.name for f in fields(cls) if f.name not in _SKIP]
    required = [
        f.name for f in fields(cls) if f.name not in _SKIP and f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [n for n in required if n not in obj]
    if missing:
        raise ValueError(f"{fpath} lacks the key(s) {missing} (it has {sorted(obj)}); re-run `{job}` to rewrite it.")
    extra = {k: v for k, v in obj.items() if k not in names and k != "format_version"}
    try:
        return cls(**{n: obj[n] for n in names if n in obj}, extra=extra, format_version=version)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{fpath}: {err}; re-run `{job}` to rewrite it.") from err


def _check_types(obj: Any, spec: dict[str, tuple[type, ...]]) -> None:
    for name, types in spec.items():
        value = getattr(obj, name)
        if value is not None and not isinstance(value, types):
            raise ValueError(
                f"{name} must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__} {value!r:.60}"
            )


_NUM = (int, float)


@dataclass
class MsSummary:
    """``ms_summary.json`` of ``python -m vlmsae.monosemanticity``: MS statistics over the SAE's latents.

    ``baseline`` holds the same statistics for the raw neurons; ``extra`` the rest (``undefined``,
    ``n_scored``, ``uniqueness``, ``reconstruction``, ``zero_shot``, ``embedder``, ``model``, ...).
    """

    mean: float | None = None  # NaN when no latent was scored
    std: float | None = None
    min: float | None = None
    max: float | None = None
    dead: int | None = None
    n_latents: int | None = None
    n_images: int | None = None
    baseline: dict[str, Any] | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = MS_SUMMARY_VERSIONS[-1]

    def __post_init__(self) -> None:
        _check_types(
            self,
            {
                "mean": _NUM,
                "std": _NUM,
                "min": _NUM,
                "max": _NUM,
                "dead": (int,),
                "n_latents": (int,),
                "n_images": (int,),
                "baseline": (dict,),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_json_dict(self)


def read_ms_summary(path: str | Path) -> MsSummary:
    fpath = _file(path, MS_SUMMARY_JSON)
    job = "python -m vlmsae.monosemanticity"
    return _from_json_dict(MsSummary, _load_json(fpath, job), fpath, MS_SUMMARY_VERSIONS, job)


def write_ms_summary(dpath: str | Path, summary: MsSummary) -> Path:
    return atomic_write_json(Path(dpath) / MS_SUMMARY_JSON, summary.to_dict())


@dataclass
class HierarchySummary:
    """``hierarchy.json`` of ``python -m vlmsae.hierarchy``: one object per Matryoshka group in ``groups``
    (group, n_latents, n_scored, depth_mean, depth_std, ms_mean, ms_max, ms_min, ...)."""

    groups: list[dict[str, Any]]
    group_sizes: list[int] | None = None
    n_latents: int | None = None
    n_scored: int | None = None
    n_images: int | None = None
    n_top: int | None = None
    ranks: list[str] | None = None
    taxonomy: str | None = None
    sae_path: str | None = None
    ms_run: str | None = None
    paper_table2: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = HIERARCHY_VERSIONS[-1]

    def __post_init__(self) -> None:
        _check_types(
            self,
            {
                "groups": (list,),
                "group_sizes": (list,),
                "n_latents": (int,),
                "n_scored": (int,),
                "n_images": (int,),
                "n_top": (int,),
                "ranks": (list,),
                "paper_table2": (dict,),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_json_dict(self)


def read_hierarchy(path: str | Path) -> HierarchySummary:
    fpath = _file(path, HIERARCHY_JSON)
    job = "python -m vlmsae.hierarchy"
    return _from_json_dict(HierarchySummary, _load_json(fpath, job), fpath, HIERARCHY_VERSIONS, job)


def write_hierarchy(dpath: str | Path, summary: HierarchySummary) -> Path:
    return atomic_write_json(Path(dpath) / HIERARCHY_JSON, summary.to_dict())


@dataclass
class SteerResult:
    """``steer.json`` of ``python -m vlmsae.steer``: one answer per image with and without steering.

    ``settings``: model, sae_path, layer, ``latents`` {id: alpha}, mode, patches, prompt, ``images``,
    max_new_tokens, ... ``activation_steering`` (the add-the-direction baseline) and ``sweep``
    ({alpha: answers}) are there only when asked for. A job that steers differently can write this
    format too: ``extra`` keeps any further keys.
    """

    steered: list[Any]
    baseline: list[Any]
    activation_steering: list[Any] | None = field(default=None, metadata={"omit_none": True})
    sweep: dict[str, list[Any]] | None = field(default=None, metadata={"omit_none": True})
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = STEER_VERSIONS[-1]

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = {}
        _check_types(
            self,
            {
                "steered": (list,),
                "baseline": (list,),
                "activation_steering": (list,),
                "sweep": (dict,),
                "settings": (dict,),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_json_dict(self)


def read_steer(path: str | Path) -> SteerResult:
    fpath = _file(path, STEER_JSON)
    job = "python -m vlmsae.steer"
    return _from_json_dict(SteerResult, _load_json(fpath, job), fpath, STEER_VERSIONS, job)


def write_steer(dpath: str | Path, result: SteerResult) -> Path:
    return atomic_write_json(Path(dpath) / STEER_JSON, result.to_dict())


@dataclass
class SteerEvalResult:
    """``steer_eval.json`` of ``python -m vlmsae.steer_eval``: the steering score (METHOD §5).

    ``summary``: per condition ("steered", "not steered", bounds) the score statistics; ``per_latent``: one
    object per latent (latent, n_top_images, steered, not_steered, steered_words); ``paper``: the paper's
    figures for the setting; ``settings``: what was run.
    """

    summary: dict[str, Any]
    per_latent: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = STEER_EVAL_VERSIONS[-1]

    def __post_init__(self) -> None:
        _check_types(self, {"summary": (dict,), "per_latent": (list,), "settings": (dict,), "paper": (dict,)})

    def to_dict(self) -> dict[str, Any]:
        return _to_json_dict(self)


def read_steer_eval(path: str | Path) -> SteerEvalResult:
    fpath = _file(path, STEER_EVAL_JSON)
    job = "python -m vlmsae.steer_eval"
    return _from_json_dict(SteerEvalResult, _load_json(fpath, job), fpath, STEER_EVAL_VERSIONS, job)


def write_steer_eval(dpath: str | Path, result: SteerEvalResult) -> Path:
    return atomic_write_json(Path(dpath) / STEER_EVAL_JSON, result.to_dict())


def _finite_or_none(obj: Any) -> Any:
    """NaN / inf -> None, recursively: strict JSON has no NaN (a fraction recovered over a 0 denominator, the
    interval of a single seed)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


@dataclass
class SpliceResult:
    """``splice.json`` of ``python -m vlmsae.splice_eval``: LLaVA's answer loss with the SAE spliced in.

    ``summary``: the headline figures, flat (kl, nll_clean, nll_spliced, nll_zero, nll_mean, frac_recovered_zero,
    frac_recovered_mean, ...; per answer token); ``rows``: the table, one object per condition (condition, nll, kl,
    top1_agreement, frac_recovered_zero/mean); ``per_answer``: per sample (image, prompt, answer, n_tokens, nll and kl
    per condition); ``notes``: why a figure is null (NaN) or a row is missing; ``settings``: what was run.
    Non-finite numbers are written as null.
    """

    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    per_answer: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = SPLICE_VERSIONS[-1]

    def __post_init__(self) -> None:
        _check_types(
            self, {"summary": (dict,), "rows": (list,), "per_answer": (list,), "notes": (list,), "settings": (dict,)}
        )

    def to_dict(self) -> dict[str, Any]:
        return _finite_or_none(_to_json_dict(self))


def read_splice(path: str | Path) -> SpliceResult:
    fpath = _file(path, SPLICE_JSON)
    job = "python -m vlmsae.splice_eval"
    return _from_json_dict(SpliceResult, _load_json(fpath, job), fpath, SPLICE_VERSIONS, job)


def write_splice(dpath: str | Path, result: SpliceResult) -> Path:
    return atomic_write_json(Path(dpath) / SPLICE_JSON, result.to_dict())


@dataclass
class RunInfo:
    """``run_info.json``, in every output folder: what made it. ``config`` is the resolved job config;
    ``extra`` holds what the job added (``status``, ``sae_path``, ``skipped``, ``outputs``, ...)."""

    config: dict[str, Any] = field(default_factory=dict)
    vlmsae_version: str | None = None
    git_commit: str | None = None
    versions: dict[str, str] | None = None
    command: str | None = None
    created: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = RUN_INFO_VERSIONS[-1]

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = {}
        _check_types(self, {"config": (dict,), "versions": (dict,)})

    def to_dict(self) -> dict[str, Any]:
        return _to_json_dict(self)


def read_run_info(path: str | Path) -> RunInfo:
    fpath = _file(path, RUN_INFO_JSON)
    job = "the job that made this folder"
    return _from_json_dict(RunInfo, _load_json(fpath, job), fpath, RUN_INFO_VERSIONS, job)


def write_run_info(dpath: str | Path, info: RunInfo) -> Path:
    """Write ``info`` as ``dpath/run_info.json``; :func:`vlmsae.utils.provenance.write_run_info` fills it in."""
    return atomic_write_json(Path(dpath) / RUN_INFO_JSON, info.to_dict())


# --------------------------------------------------------------------------------------------
# The activation store (vlmsae.data.shards): manifest.json and progress.json
# --------------------------------------------------------------------------------------------
_EXTRACT_JOB = "python -m vlmsae.extract"
_OPT = {"omit_none": True}  # not every store records every key (write_acts_store stores have no model details)


def _opt(default: Any = None) -> Any:
    return field(default=default, metadata=_OPT)


@dataclass
class StoreManifest:
    """``manifest.json`` of an activation store, written last (by :meth:`vlmsae.data.shards.ShardWriter.write_manifest`)
    when the store is complete. Layout of the store: :mod:`vlmsae.data.shards`.

    The shard writer's own keys (shapes, counts, the per-dimension statistics, provenance) are always there;
    the extraction's (model, layer, tokens, images, order, skipped images, ...) when ``python -m vlmsae.extract``
    wrote the store. A key absent from the file reads as None; ``extra`` keeps keys this vlmsae does not name.
    """

    d: int | None = None  # row width
    n_rows: int | None = None
    dtype: str | None = None  # stored dtype: float16 | bfloat16 | float32
    n_shards: int | None = None
    n_chunks: int | None = None
    rows_per_chunk: int | None = None
    shards: list[str] | None = None  # shard file names, in order
    shard_rows: list[int] | None = _opt()  # rows per shard (with rows_per_chunk: the chunk index of a remote store)
    mean: list[float] | None = None  # per dimension, over the stored rows
    var: list[float] | None = None  # population variance per dimension
    mean_sq_norm: float | None = None  # E||x||^2
    versions: dict[str, Any] | None = None
    git_commit: str | None = None
    complete: bool | None = _opt()  # False: an unfinished extraction
    # what was extracted
    model: str | None = _opt()
    backend: str | None = _opt()
    arch: str | None = _opt()
    pretrained: str | None = _opt()
    local_path: str | None = _opt()
    layer: int | str | None = _opt()  # a block index or "last" (the pooled embedding)
    tokens: str | None = _opt()  # cls | mean | patches | all | random_k
    k: int | None = _opt()  # tokens per image for random_k
    seed: int | None = _opt()
    model_dtype: str | None = _opt()
    image_size: int | None = _opt()
    has_cls: bool | None = _opt()
    n_tokens_per_image: int | None = _opt()
    embed_dim: int | None = _opt()
    width: int | None = _opt()
    n_layers: int | None = _opt()
    rows_per_shard: int | None = _opt()
    # which images, in which order
    source: str | None = _opt()
    root: str | None = _opt()
    synthetic: dict[str, Any] | None = _opt()
    max_images: int | None = _opt()
    batch_size: int | None = _opt()
    n_images: int | None = _opt()
    n_listed: int | None = _opt()
    classes: list[str] | None = _opt()  # label names
    image_list_digest: str | None = _opt()  # vlmsae.data.shards.image_list_digest of the stored images' keys
    listing_digest: str | None = _opt()
    order_seed: int | None = _opt()
    order_unit: str | None = _opt()  # image | shard (wds)
    order_digest: str | None = _opt()
    image_idx_meaning: str | None = _opt()
    exif_transpose: bool | None = _opt()
    alpha_background: str | None = _opt()
    decode: str | None = _opt()  # cpu | cpu_draft | cuda_nvjpeg: how images were decoded (vlmsae.models.gpu_decode)
    n_skipped: int | None = _opt()
    skipped: list[dict[str, Any]] | None = _opt()  # {key, path, error, reason} per unreadable image
    skipped_by_reason: dict[str, int] | None = _opt()
    # listed files that were not used, by reason: other files under data.root (``not an image extension: .txt``,
    # ``hidden file``) and images left out by max_images (``not in the max_images subset``); skipped images
    # are in ``skipped_by_reason``. None in a store written before it was recorded.
    ignored_by_reason: dict[str, int] | None = _opt()
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = MANIFEST_VERSIONS[-1]

    def __post_init__(self) -> None:
        _check_types(
            self,
            {
                "d": (int,),
                "n_rows": (int,),
                "dtype": (str,),
                "n_shards": (int,),
                "n_chunks": (int,),
                "rows_per_chunk": (int,),
                "shards": (list,),
                "mean": (list,),
                "var": (list,),
                "mean_sq_norm": _NUM,
                "versions": (dict,),
                "complete": (bool,),
                "layer": (int, str),
                "tokens": (str,),
                "k": (int,),
                "n_images": (int,),
                "n_skipped": (int,),
                "skipped": (list,),
                "skipped_by_reason": (dict,),
                "ignored_by_reason": (dict,),
                "classes": (list,),
                "synthetic": (dict,),
            },
        )

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> StoreManifest:
        """A manifest from the writer's flat dict (its ``meta`` and fields): named keys typed, the rest in extra."""
        return _build(cls, obj, "the activation store manifest", _EXTRACT_JOB, MANIFEST_VERSIONS[-1])

    def to_dict(self) -> dict[str, Any]:
        return _to_json_dict(self)


def read_manifest(path: str | Path) -> StoreManifest:
    """``manifest.json`` of a finished store (the folder or the file); a clear error when the extraction is
    missing or unfinished."""
    fpath = _file(path, MANIFEST_JSON)
    if not fpath.is_file():
        hint = (
            " (an extraction is in progress or was interrupted: rerun the same command to finish it)"
            if (fpath.parent / PROGRESS_JSON).exists()
            else ""
        )
        raise FileNotFoundError(
            f"No {MANIFEST_JSON} in {fpath.parent}{hint}: run `{_EXTRACT_JOB} ... out={fpath.parent}` first."
        )
    return _from_json_dict(StoreManifest, _load_json(fpath, _EXTRACT_JOB), fpath, MANIFEST_VERSIONS, _EXTRACT_JOB)


def manifest_from_json(text: str | bytes, where: str) -> StoreManifest:
    """A ``manifest.json`` read from elsewhere than a local file (a URL): ``where`` names it in errors."""
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON ({err}): the store is damaged or not a vlmsae store.") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{where} holds a JSON {type(obj).__name__}, expected an object; re-run `{_EXTRACT_JOB}`.")
    version = check_version(where, obj.get("format_version", 1), MANIFEST_VERSIONS, _EXTRACT_JOB)
    return _build(StoreManifest, obj, where, _EXTRACT_JOB, version)


def write_manifest(dpath: str | Path, manifest: StoreManifest) -> Path:
    return atomic_write_json(Path(dpath) / MANIFEST_JSON, manifest.to_dict(), indent=1)


@dataclass
class StoreProgress:
    """``progress.json``: the shard writer's state after its last complete shard, the point a killed
    extraction resumes from (rewritten only after that shard is in place).

    ``meta``: the extraction's settings (a resume with other settings is refused); ``stats``: the running
    statistics (:meth:`vlmsae.data.shards.RunningStats.state_dict`); ``state``: the caller's resume state
    (e.g. the next image position), None before the first shard.
    """

    meta: dict[str, Any]
    n_shards: int
    n_rows: int
    n_chunks: int
    stats: dict[str, Any]
    state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = PROGRESS_VERSIONS[-1]

    def __post_init__(self) -> None:
        _check_types(
            self,
            {
                "meta": (dict,),
                "n_shards": (int,),
                "n_rows": (int,),
                "n_chunks": (int,),
                "stats": (dict,),
                "state": (dict,),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_json_dict(self)


def read_progress(path: str | Path) -> StoreProgress:
    fpath = _file(path, PROGRESS_JSON)
    return _from_json_dict(StoreProgress, _load_json(fpath, _EXTRACT_JOB), fpath, PROGRESS_VERSIONS, _EXTRACT_JOB)


def write_progress(dpath: str | Path, progress: StoreProgress) -> Path:
    return atomic_write_json(Path(dpath) / PROGRESS_JSON, progress.to_dict(), indent=None)


# --------------------------------------------------------------------------------------------
# SAE checkpoint: config.json (the weights, sae.safetensors, are vlmsae.sae.checkpoint's)
# --------------------------------------------------------------------------------------------
_TRAIN_JOB = "python -m vlmsae.train"


@dataclass
class SAECheckpointConfig:
    """``config.json`` of an SAE checkpoint folder (:func:`vlmsae.sae.save_sae`): what the SAE is (``config``,
    the full :class:`vlmsae.sae.SAEConfig`, plus arch, sizes, threshold and the folded input scale), its
    precision policy (``precision``, :mod:`vlmsae.sae.precision`), what it was trained on (``trained_on``: model,
    pretrained, layer, tokens, data, ...) and by which code. ``format`` is always ``"vlmsae-sae"``.
    """

    format: str = SAE_FORMAT
    arch: str | None = None
    d_in: int | None = None
    n_latents: int | None = None
    k: int | None = None
    group_sizes: list[int] | None = None
    threshold: float | None = None  # None: no scalar threshold (jumprelu: per-latent [F] in sae.safetensors)
    input_scale: dict[str, Any] | None = None  # {value, folded, convention}
    n_steps: int | None = None
    dtype: str | None = None
    precision: dict[str, Any] | None = field(default=None, metadata=_OPT)  # absent in checkpoints before it
    trained_on: dict[str, Any] = field(default_factory=dict)  # "source" in version 1 files
    config: dict[str, Any] = field(default_factory=dict)  # SAEConfig.to_dict(); the reader requires it
    vlmsae_version: str | None = None
    git_commit: str | None = None
    created: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = SAE_CONFIG_VERSIONS[-1]

    def __post_init__(self) -> None:
        if self.trained_on is None:
            self.trained_on = {}
        _check_types(
            self,
            {
                "config": (dict,),
                "format": (str,),
                "arch": (str,),
                "d_in": (int,),
                "n_latents": (int,),
                "k": (int,),
                "group_sizes": (list,),
                "threshold": _NUM,
                "input_scale": (dict,),
                "n_steps": (int,),
                "precision": (dict,),
                "trained_on": (dict,),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        out = _to_json_dict(self)
        return {"format": out.pop("format"), **out}  # "format" first, as save_sae always wrote it


def read_sae_config(path: str | Path) -> SAECheckpointConfig:
    """The ``config.json`` of an SAE checkpoint folder (or the file itself), no weights; clear errors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"SAE checkpoint folder {str(path)!r} does not exist; expected a folder with sae.safetensors and "
            f"{SAE_CONFIG_JSON} written by vlmsae.sae.save_sae (a training run keeps it in <run>/sae/)."
        )
    fpath = _file(path, SAE_CONFIG_JSON)
    if not fpath.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {SAE_CONFIG_JSON}: not an SAE checkpoint written by save_sae.")
    try:
        obj = json.loads(fpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(fpath)!r} is not valid JSON ({err}); the checkpoint is corrupt.") from err
    if not isinstance(obj, dict) or obj.get("format") != SAE_FORMAT or not isinstance(obj.get("config"), dict):
        raise ValueError(
            f'{str(fpath)!r} is not a vlmsae SAE config (expected "format": {SAE_FORMAT!r} and a "config" object).'
        )
    if obj.get("format_version", 1) == 1 and "source" in obj:  # version 1 named the training record "source":
        obj = {("trained_on" if key == "source" else key): value for key, value in obj.items()}  # read as version 2
        obj["format_version"] = 2
    return _from_json_dict(SAECheckpointConfig, obj, fpath, SAE_CONFIG_VERSIONS, _TRAIN_JOB)


def write_sae_config(dpath: str | Path, info: SAECheckpointConfig) -> Path:
    return atomic_write_json(Path(dpath) / SAE_CONFIG_JSON, info.to_dict())


# --------------------------------------------------------------------------------------------
# latents.csv
# --------------------------------------------------------------------------------------------
LATENTS_COLUMNS = ("latent", "ms", "freq", "max_act", "group", "top_keys")  # always written
LATENTS_NAME_COLUMNS = ("name", "name_score", "names")  # written when the run named its latents
LATENTS_AUTOINTERP_COLUMNS = ("autointerp", "autointerp_score")  # written when the run asked LLaVA
_VERSION_LINE = re.compile(r"^# vlmsae latents\.csv format_version=(\S+)\s*$")
_MS_JOB = "python -m vlmsae.monosemanticity"


@dataclass(frozen=True)
class LatentRow:
    """One latent of ``latents.csv``."""

    latent: int
    ms: float  # NaN: dead or undefined (an empty cell reads as NaN too)
    freq: float = math.nan  # fraction of images where it fires; NaN when the file has no such column
    max_act: float = math.nan
    group: int | None = None  # Matryoshka group
    top_keys: tuple[str, ...] = ()  # its top images' keys, strongest first (written joined by "|")
    # Automatic feature name (version 3): None = not computed (no column); "" = computed, none (no top images)
    name: str | None = None
    name_score: float = math.nan  # cosine of the name's text embedding with the latent's concept embedding
    names: tuple[str, ...] = ()  # the best names, best first (written joined by "|")
    autointerp: str | None = None  # LLaVA's one word for a grid of the top images; None = not asked
    autointerp_score: float = math.nan  # cosine of that word's text embedding with the concept


@dataclass
class LatentsTable:
    """``latents.csv`` of ``python -m vlmsae.monosemanticity``: one :class:`LatentRow` per latent."""

    rows: list[LatentRow]
    format_version: int = LATENTS_CSV_VERSIONS[-1]

    def ms_K(self, n_latents: int):
        """MS per latent as a float64 tensor [n_latents] (NaN for dead, undefined or absent latents)."""
        import torch

        ms_K = torch.full((n_latents,), math.nan, dtype=torch.float64)
        for r in self.rows:
            if 0 <= r.latent < n_latents:
                ms_K[r.latent] = r.ms
        return ms_K


def _cell_float(value: str | None, fpath: Path, line: int, column: str, job: str = _MS_JOB) -> float:
    if value is None or value.strip() == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"{fpath} line {line}: {column}={value!r} is not a number (write nan or leave it "
            f"empty for a dead latent); re-run `{job}` to rewrite the file."
        ) from None


def _cell_int(value: str | None, fpath: Path, line: int, column: str, job: str = _MS_JOB) -> int | None:
    x = _cell_float(value, fpath, line, column, job)
    if math.isnan(x):
        return None
    if x != int(x):
        raise ValueError(f"{fpath} line {line}: {column}={value!r} is not a whole number.")
    return int(x)


def read_latents_csv(path: str | Path) -> LatentsTable:
    """``latents.csv`` (the file or its run folder) -> typed rows; columns ``latent`` and ``ms`` are required."""
    fpath = _file(path, LATENTS_CSV)
    if not fpath.is_file():
        raise FileNotFoundError(f"{fpath} not found: run `{_MS_JOB}` first, or point at its output folder.")
    with open(fpath, newline="", encoding="utf-8") as f:
        first = f.readline()
        if first.startswith("#"):
            match = _VERSION_LINE.match(first.rstrip("\r\n"))
            if match is None:
                raise ValueError(
                    f"{fpath} starts with {first.strip()!r}, expected '# vlmsae latents.csv "
                    f"format_version=<n>' or the header line; re-run `{_MS_JOB}` to rewrite it."
                )
            found: Any = int(match.group(1)) if match.group(1).isdigit() else match.group(1)
            version, offset = check_version(fpath, found, LATENTS_CSV_VERSIONS, _MS_JOB), 1
        else:
            f.seek(0)
            version, offset = 1, 0  # written before format_version existed: version 1
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in ("latent", "ms") if c not in columns]
        if missing:
            raise ValueError(
                f"{fpath} lacks the column(s) {missing}; it has {columns}. Expected the monosemanticity "
                f"format: {', '.join(LATENTS_COLUMNS)}."
            )
        rows = []
        for r in reader:
            line = reader.line_num + offset
            latent = _cell_int(r["latent"], fpath, line, "latent")
            if latent is None:
                raise ValueError(f"{fpath} line {line}: the latent id is empty.")
            keys, names = r.get("top_keys") or "", r.get("names") or ""
            rows.append(
                LatentRow(
                    latent=latent,
                    ms=_cell_float(r["ms"], fpath, line, "ms"),
                    freq=_cell_float(r.get("freq"), fpath, line, "freq"),
                    max_act=_cell_float(r.get("max_act"), fpath, line, "max_act"),
                    group=_cell_int(r.get("group"), fpath, line, "group"),
                    top_keys=tuple(keys.split("|")) if keys else (),
                    name=r.get("name"),  # None when the column is absent; "" for an empty cell
                    name_score=_cell_float(r.get("name_score"), fpath, line, "name_score"),
                    names=tuple(names.split("|")) if names else (),
                    autointerp=r.get("autointerp"),
                    autointerp_score=_cell_float(r.get("autointerp_score"), fpath, line, "autointerp_score"),
                )
            )
    return LatentsTable(rows, format_version=version)


def _score_cell(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6f}"


def write_latents_csv(dpath: str | Path, table: LatentsTable) -> Path:
    """Write ``dpath/latents.csv`` at the current version (the version line, the header, one row per latent).

    The name columns are written when any row has a ``name`` (not None), the autointerp ones when any row
    has an ``autointerp``; a run without them keeps the six columns of version 2.
    """
    with_names = any(r.name is not None for r in table.rows)
    with_autointerp = any(r.autointerp is not None for r in table.rows)
    buf = io.StringIO()
    buf.write(f"# vlmsae latents.csv format_version={LATENTS_CSV_VERSIONS[-1]}\r\n")  # csv.writer ends lines \r\n
    writer = csv.writer(buf)
    writer.writerow(
        LATENTS_COLUMNS
        + (LATENTS_NAME_COLUMNS if with_names else ())
        + (LATENTS_AUTOINTERP_COLUMNS if with_autointerp else ())
    )
    for r in table.rows:
        cells = [
            r.latent,
            "nan" if math.isnan(r.ms) else f"{r.ms:.6f}",
            f"{r.freq:.6g}",
            f"{r.max_act:.6g}",
            "" if r.group is None else r.group,
            "|".join(r.top_keys),
        ]
        if with_names:
            cells += [r.name or "", _score_cell(r.name_score), "|".join(r.names)]
        if with_autointerp:
            cells += [r.autointerp or "", _score_cell(r.autointerp_score)]
        writer.writerow(cells)
    return atomic_write_text(Path(dpath) / LATENTS_CSV, buf.getvalue())


# --------------------------------------------------------------------------------------------
# top_images/: top.safetensors + images.json + meta.json (the version lives in meta.json)
# --------------------------------------------------------------------------------------------
@dataclass
class TopImagesIndex:
    """The files of a ``top_images/`` folder; the in-memory object with its checks and helpers is
    :class:`vlmsae.metrics.topimages.TopImages`, whose ``save`` / ``load`` call the functions below.

    ``top.safetensors``: ``image_idx`` [K, T] int64 (-1 = none), ``acts`` [K, T] float32 and any ``extra``
    tensors (e.g. ``patch_acts`` [K, T, P]); ``images.json``: keys, paths, labels (indexed by image_idx);
    ``meta.json``: ``meta`` + n_latents, top_k, n_images and ``format_version``.
    """

    image_idx: Any  # torch.Tensor [K, T] int64
    acts: Any  # torch.Tensor [K, T] float32
    keys: list[str]
    paths: list[str] | None = None
    labels: list[Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # name -> torch.Tensor
    format_version: int = TOP_IMAGES_VERSIONS[-1]


def read_top_images(dpath: str | Path) -> TopImagesIndex:
    from safetensors.torch import load_file

    dpath = Path(dpath)
    job = "python -m vlmsae.monosemanticity"
    fpath = dpath / TOP_TENSORS
    if not fpath.exists():
        raise FileNotFoundError(f"{fpath} not found: point at a top_images/ folder written by `{job}`.")
    images_fpath = dpath / TOP_IMAGES_JSON
    if not images_fpath.is_file():
        raise FileNotFoundError(
            f"{images_fpath} is missing: the top_images index needs {TOP_TENSORS} and {TOP_IMAGES_JSON}."
        )
    meta_fpath = dpath / TOP_META_JSON
    meta = _load_json(meta_fpath, job) if meta_fpath.exists() else {}
    # An index written before format_version existed (or without meta.json) is version 1.
    version = check_version(meta_fpath, meta.pop("format_version", 1), TOP_IMAGES_VERSIONS, job)
    tensors = load_file(str(fpath))
    if "image_idx" not in tensors or "acts" not in tensors:
        raise ValueError(f"{fpath} must hold tensors 'image_idx' and 'acts' [K, T]; it has {sorted(tensors)}.")
    images = _load_json(images_fpath, job)
    image_idx, acts = tensors.pop("image_idx"), tensors.pop("acts")
    return TopImagesIndex(
        image_idx,
        acts,
        list(images.get("keys") or []),
        images.get("paths"),
        images.get("labels"),
        meta,
        extra=tensors,
        format_version=version,
    )


def write_top_images(dpath: str | Path, index: TopImagesIndex) -> Path:
    """Write the three files into ``dpath`` (the tensors first, so a reader never pairs new meta with old tensors
    for long: each file is atomic, the folder is not)."""
    import torch
    from safetensors.torch import save_file

    dpath = Path(dpath)
    dpath.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in index.extra.items()}
    tensors.update(image_idx=index.image_idx.to(torch.long).contiguous(), acts=index.acts.float().contiguous())
    atomic_write(dpath / TOP_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(
        dpath / TOP_IMAGES_JSON, {"keys": index.keys, "paths": index.paths, "labels": index.labels}, indent=None
    )
    meta = {
        "format_version": TOP_IMAGES_VERSIONS[-1],
        **{k: v for k, v in index.meta.items() if k != "format_version"},
        "n_latents": int(index.image_idx.shape[0]),
        "top_k": int(index.image_idx.shape[1]),
        "n_images": len(index.keys),
    }
    atomic_write_json(dpath / TOP_META_JSON, meta)
    return dpath


# --------------------------------------------------------------------------------------------
# Seed stability (python -m vlmsae.stability): stability.json + stability_latents.csv
# --------------------------------------------------------------------------------------------
_STABILITY_JOB = "python -m vlmsae.stability"


@dataclass
class StabilitySummary:
    """``stability.json`` of ``python -m vlmsae.stability``: how alike SAEs trained with different seeds are.

    ``runs``: the SAE folders (the first is the reference); ``matching``: the latent matching against the
    reference (threshold, mean_matched_cos, frac_found_in_all, found_in_counts {m: latents found in m seeds},
    ``pairs``: one object per compared pair); ``metrics``: per training metric (fve, l0, dead_fraction, ...)
    {mean, ci95, std, n} over seeds (ci95 = half-width of the 95% t-interval) and the per-seed values;
    ``ms`` / ``hierarchy``: the same for every numeric field of the seeds' ms_summary.json / hierarchy.json
    (present when those runs were given).
    """

    runs: list[str]
    n_latents: int
    d_in: int
    matching: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    ms: dict[str, Any] | None = field(default=None, metadata={"omit_none": True})
    hierarchy: dict[str, Any] | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = STABILITY_VERSIONS[-1]

    def __post_init__(self) -> None:
        _check_types(
            self,
            {
                "runs": (list,),
                "n_latents": (int,),
                "d_in": (int,),
                "matching": (dict,),
                "metrics": (dict,),
                "ms": (dict,),
                "hierarchy": (dict,),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_json_dict(self)


def read_stability(path: str | Path) -> StabilitySummary:
    fpath = _file(path, STABILITY_JSON)
    obj = _load_json(fpath, _STABILITY_JOB)
    return _from_json_dict(StabilitySummary, obj, fpath, STABILITY_VERSIONS, _STABILITY_JOB)


def write_stability(dpath: str | Path, summary: StabilitySummary) -> Path:
    return atomic_write_json(Path(dpath) / STABILITY_JSON, _finite_or_none(summary.to_dict()))


STABILITY_LATENTS_COLUMNS = ("latent", "found_in", "mean_cos")  # then match_<seed> per seed after the reference
_STABILITY_VERSION_LINE = re.compile(r"^# vlmsae stability_latents\.csv format_version=(\S+)\s*$")


@dataclass
class StabilityLatents:
    """``stability_latents.csv``: per latent of the reference SAE, in how many seeds it is found (``found_in``,
    the reference included), its mean matched cosine over the other seeds (``mean_cos``, NaN: no partner) and
    its one-to-one partner in each other seed (``matches``, -1: none; the columns are ``match_1`` ...)."""

    latent: list[int]
    found_in: list[int]
    mean_cos: list[float]
    matches: list[list[int]]  # [seed][latent], seeds 1 .. n-1
    format_version: int = STABILITY_LATENTS_VERSIONS[-1]

    def __post_init__(self) -> None:
        n = len(self.latent)
        lengths = [len(self.found_in), len(self.mean_cos), *(len(m) for m in self.matches)]
        if any(length != n for length in lengths):
            raise ValueError(f"stability_latents columns differ in length: {n} latents, columns {lengths}.")


def write_stability_latents(dpath: str | Path, table: StabilityLatents) -> Path:
    """Write ``dpath/stability_latents.csv``: the version line, the header, one row per latent."""
    buf = io.StringIO()
    buf.write(f"# vlmsae stability_latents.csv format_version={STABILITY_LATENTS_VERSIONS[-1]}\r\n")
    writer = csv.writer(buf)
    writer.writerow([*STABILITY_LATENTS_COLUMNS, *(f"match_{s}" for s in range(1, len(table.matches) + 1))])
    for i, latent in enumerate(table.latent):
        cos = table.mean_cos[i]
        row = [latent, table.found_in[i], "nan" if math.isnan(cos) else f"{cos:.6f}"]
        writer.writerow(row + [m[i] for m in table.matches])
    return atomic_write_text(Path(dpath) / STABILITY_LATENTS_CSV, buf.getvalue())


def read_stability_latents(path: str | Path) -> StabilityLatents:
    fpath = _file(path, STABILITY_LATENTS_CSV)
    if not fpath.is_file():
        raise FileNotFoundError(f"{fpath} not found: run `{_STABILITY_JOB}` first, or point at its output folder.")
    with open(fpath, newline="", encoding="utf-8") as f:
        first = f.readline().rstrip("\r\n")
        match = _STABILITY_VERSION_LINE.match(first)
        if match is None:
            raise ValueError(
                f"{fpath} starts with {first!r}, expected '# vlmsae stability_latents.csv format_version=<n>'; "
                f"re-run `{_STABILITY_JOB}` to rewrite it."
            )
        found: Any = int(match.group(1)) if match.group(1).isdigit() else match.group(1)
        version = check_version(fpath, found, STABILITY_LATENTS_VERSIONS, _STABILITY_JOB)
        reader = csv.reader(f)
        header = next(reader, [])
        seeds = [c for c in header[3:] if c.startswith("match_")]
        if tuple(header[:3]) != STABILITY_LATENTS_COLUMNS or len(seeds) != len(header) - 3:
            raise ValueError(
                f"{fpath} has the columns {header}; expected {', '.join(STABILITY_LATENTS_COLUMNS)}, match_1, ... "
                f"Re-run `{_STABILITY_JOB}` to rewrite it."
            )
        table = StabilityLatents([], [], [], [[] for _ in seeds], format_version=version)
        for r in reader:
            line = reader.line_num + 1
            ints = [_cell_int(v, fpath, line, c, _STABILITY_JOB) for v, c in zip(r, header) if c != "mean_cos"]
            if len(r) != len(header) or any(v is None for v in ints):
                raise ValueError(f"{fpath} line {line}: expected {len(header)} filled cells, got {r}.")
            table.latent.append(ints[0])
            table.found_in.append(ints[1])
            table.mean_cos.append(_cell_float(r[2], fpath, line, "mean_cos", _STABILITY_JOB))
            for s, m in enumerate(ints[2:]):
                table.matches[s].append(m)
    return table


# --------------------------------------------------------------------------------------------
# Inspecting one's own images (python -m vlmsae.inspect): inspect.json
# --------------------------------------------------------------------------------------------
_INSPECT_JOB = "python -m vlmsae.inspect"


@dataclass
class InspectResult:
    """``inspect.json`` of ``python -m vlmsae.inspect``: what an SAE sees in the given images, and where.

    ``images``: one object per image (key, path, fve and nmse of its tokens, n_rows, grid = patch-grid side or
    null, thumb = its thumbnail next to the page, and ``top_pooled`` / ``top_peak``: latent hits, best first, each
    {latent, pooled, peak, peak_patch, heat = per-patch activations row-major (empty without patch tokens),
    heat_png = the heatmap drawn over the image, relative to the file}); ``latents``: what the MS run says of every
    latent shown, keyed by the latent id as a string (name, names, ms, freq, group, top = thumbnails of its top
    images); ``query``: {text, hits: [{latent, score, per_image: [hit per image]}]} or null; ``compare``: {a, b,
    a_over_b, b_over_a: [{latent, a, b, diff}]} or null; ``settings``: what was run (sae_path, model, layer, pool,
    ms_run, top_n). Non-finite numbers are written as null.
    """

    images: list[dict[str, Any]]
    latents: dict[str, Any] = field(default_factory=dict)
    query: dict[str, Any] | None = None
    compare: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = INSPECT_VERSIONS[-1]

    def __post_init__(self) -> None:
        _check_types(
            self,
            {"images": (list,), "latents": (dict,), "query": (dict,), "compare": (dict,), "settings": (dict,)},
        )

    def to_dict(self) -> dict[str, Any]:
        return _finite_or_none(_to_json_dict(self))


def read_inspect(path: str | Path) -> InspectResult:
    fpath = _file(path, INSPECT_JSON)
    return _from_json_dict(InspectResult, _load_json(fpath, _INSPECT_JOB), fpath, INSPECT_VERSIONS, _INSPECT_JOB)


def write_inspect(dpath: str | Path, result: InspectResult) -> Path:
    return atomic_write_json(Path(dpath) / INSPECT_JSON, result.to_dict())
