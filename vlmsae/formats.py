"""Every on-disk format that one job writes and another reads: a dataclass, one read, one write.

Each format carries a ``format_version``. A reader accepts the versions in its ``VERSIONS`` tuple
and refuses any other (a newer vlmsae wrote it) with a message that names the file, the version found,
the versions this vlmsae reads and the fix. Files written before versions existed carry none: they are
read as version 1, so finished runs still load. Writers are atomic (:mod:`vlmsae.utils.io`).

Readers take the file itself or the folder that holds it (the file names are fixed, the constants
below); writers take the folder and return the written path.

Each format is a dataclass with a ``read_<x>`` / ``write_<x>`` pair: ``latents.csv`` (:class:`LatentsTable` of
:class:`LatentRow`; ``<x>`` = ``latents_csv``), ``ms_summary.json`` (:class:`MsSummary`), ``top_images/``
(:class:`TopImagesIndex`), ``hierarchy.json`` (:class:`HierarchySummary`), ``steer.json`` (:class:`SteerResult`),
``steer_eval.json`` (:class:`SteerEvalResult`), ``splice.json`` (:class:`SpliceResult`), ``run_info.json``
(:class:`RunInfo`), an activation store's ``manifest.json`` (:class:`StoreManifest`) and ``progress.json``
(:class:`StoreProgress`, the extraction's resume point), an SAE checkpoint's ``config.json``
(:class:`SAECheckpointConfig`; ``sae_config``, next to sae.safetensors), ``stability.json``
(:class:`StabilitySummary`) with its per-latent ``stability_latents.csv`` (:class:`StabilityLatents`), and
``inspect.json`` (:class:`InspectResult`).

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
from typing import Any, ClassVar

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

# The versions each reader understands (a JSON format's VERSIONS, (1,) unless its class says); the last is written.
LATENTS_CSV_VERSIONS = (1, 2, 3)  # 1: no version line; 2: the version line; 3: optional name columns
TOP_IMAGES_VERSIONS = (1,)
STABILITY_LATENTS_VERSIONS = (1,)  # "# vlmsae stability_latents.csv format_version=1", then header and rows


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


def _found(path: str | Path, name: str, job: str) -> Path:
    """:func:`_file`, which must exist."""
    fpath = _file(path, name)
    if not fpath.is_file():
        raise FileNotFoundError(f"{fpath} not found: run `{job}` first, or point at its output folder.")
    return fpath


def read_json_object(fpath: Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``fpath``; unreadable JSON or another JSON type is refused, naming the file and ``fix``."""
    try:
        obj = json.loads(fpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{fpath} is not valid JSON ({err}); {fix}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{fpath} holds a JSON {type(obj).__name__}, expected an object; {fix}")
    return obj


# --------------------------------------------------------------------------------------------
# JSON formats: typed fields + ``extra`` (keys this vlmsae does not name, kept on a round trip)
# --------------------------------------------------------------------------------------------
_SKIP = ("format_version", "extra")
_NUM = (int, float)


def _f(*types: type, default: Any = None, omit_none: bool = False, none_empty: bool = False) -> Any:
    """A format field checked to be one of ``types`` (None passes); ``default=dict`` / ``list``: a fresh empty one;
    ``omit_none``: not written while None; ``none_empty``: None becomes ``{}``."""
    meta = {"types": types, "omit_none": omit_none, "none_empty": none_empty}
    if default in (dict, list):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _build(cls: type, obj: dict[str, Any], fpath: Path | str, job: str, version: int) -> Any:
    """``cls`` from a flat dict: its named fields typed, every other key in ``extra``."""
    named = [f for f in fields(cls) if f.name not in _SKIP]
    names = [f.name for f in named]
    missing = [f.name for f in named if f.name not in obj and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{fpath} lacks the key(s) {missing} (it has {sorted(obj)}); re-run `{job}` to rewrite it.")
    extra = {k: v for k, v in obj.items() if k not in names and k != "format_version"}
    try:
        return cls(**{n: obj[n] for n in names if n in obj}, extra=extra, format_version=version)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{fpath}: {err}; re-run `{job}` to rewrite it.") from err


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
class _JsonFormat:
    """What every JSON format shares: its file, versions and the job that writes it; the type checks of its
    :func:`_f` fields; ``to_dict`` (typed fields, then ``extra``) and ``read``. Each ``read_<x>`` is its class's
    ``read`` and each ``write_<x>`` is :func:`_write` (the list at the end of this module)."""

    FILE: ClassVar[str]
    VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    JOB: ClassVar[str]
    FINITE: ClassVar[bool] = False  # NaN / inf written as null
    INDENT: ClassVar[int | None] = 2
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    format_version: int = field(default=None, kw_only=True)  # None: the version this vlmsae writes, VERSIONS[-1]

    def __post_init__(self) -> None:
        if self.format_version is None:
            self.format_version = self.VERSIONS[-1]
        for f in fields(self):
            value, types = getattr(self, f.name), f.metadata.get("types")
            if value is None and f.metadata.get("none_empty"):
                setattr(self, f.name, {})
            elif types and value is not None and not isinstance(value, types):
                raise ValueError(
                    f"{f.name} must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__} "
                    f"{value!r:.60}"
                )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format_version": self.format_version}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SKIP or (value is None and f.metadata.get("omit_none")):
                continue
            out[f.name] = value
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return _finite_or_none(out) if self.FINITE else out

    @classmethod
    def from_json(cls, obj: dict[str, Any], fpath: Path | str) -> Any:
        # Files written before format_version existed have none: they are version 1.
        version = check_version(fpath, obj.get("format_version", 1), cls.VERSIONS, cls.JOB)
        return _build(cls, obj, fpath, cls.JOB, version)

    @classmethod
    def read(cls, path: str | Path) -> Any:
        """The format from its file, or from the folder that holds it."""
        fpath = _found(path, cls.FILE, cls.JOB)
        return cls.from_json(read_json_object(fpath, f"re-run `{cls.JOB}` to rewrite it."), fpath)


def _write(dpath: str | Path, obj: _JsonFormat) -> Path:
    """Write ``obj`` as its file in folder ``dpath`` (atomically); returns the file's path."""
    return atomic_write_json(Path(dpath) / obj.FILE, obj.to_dict(), indent=obj.INDENT)


@dataclass
class MsSummary(_JsonFormat):
    """``ms_summary.json`` of ``python -m vlmsae.monosemanticity``: MS statistics over the SAE's latents.

    ``baseline`` holds the same statistics for the raw neurons; ``extra`` the rest (``undefined``,
    ``n_scored``, ``uniqueness``, ``reconstruction``, ``zero_shot``, ``embedder``, ``model``, ...).
    """

    FILE, JOB = MS_SUMMARY_JSON, "python -m vlmsae.monosemanticity"
    mean: float | None = _f(*_NUM)  # NaN when no latent was scored
    std: float | None = _f(*_NUM)
    min: float | None = _f(*_NUM)
    max: float | None = _f(*_NUM)
    dead: int | None = _f(int)
    n_latents: int | None = _f(int)
    n_images: int | None = _f(int)
    baseline: dict[str, Any] | None = _f(dict, omit_none=True)


@dataclass
class HierarchySummary(_JsonFormat):
    """``hierarchy.json`` of ``python -m vlmsae.hierarchy``: one object per Matryoshka group in ``groups``
    (group, n_latents, n_scored, depth_mean, depth_std, ms_mean, ms_max, ms_min, ...)."""

    FILE, JOB = HIERARCHY_JSON, "python -m vlmsae.hierarchy"
    groups: list[dict[str, Any]] = _f(list, default=MISSING)
    group_sizes: list[int] | None = _f(list)
    n_latents: int | None = _f(int)
    n_scored: int | None = _f(int)
    n_images: int | None = _f(int)
    n_top: int | None = _f(int)
    ranks: list[str] | None = _f(list)
    taxonomy: str | None = None
    sae_path: str | None = None
    ms_run: str | None = None
    paper_table2: dict[str, Any] | None = _f(dict)


@dataclass
class SteerResult(_JsonFormat):
    """``steer.json`` of ``python -m vlmsae.steer``: one answer per image with and without steering.

    ``settings``: model, sae_path, layer, ``latents`` {id: alpha}, mode, patches, prompt, ``images``,
    max_new_tokens, ... ``activation_steering`` (the add-the-direction baseline) and ``sweep``
    ({alpha: answers}) are there only when asked for. A job that steers differently can write this
    format too: ``extra`` keeps any further keys.
    """

    FILE, JOB = STEER_JSON, "python -m vlmsae.steer"
    steered: list[Any] = _f(list, default=MISSING)
    baseline: list[Any] = _f(list, default=MISSING)
    activation_steering: list[Any] | None = _f(list, omit_none=True)
    sweep: dict[str, list[Any]] | None = _f(dict, omit_none=True)
    settings: dict[str, Any] = _f(dict, default=dict, none_empty=True)


@dataclass
class SteerEvalResult(_JsonFormat):
    """``steer_eval.json`` of ``python -m vlmsae.steer_eval``: the steering score (METHOD §5).

    ``summary``: per condition ("steered", "not steered", bounds) the score statistics; ``per_latent``: one
    object per latent (latent, n_top_images, steered, not_steered, steered_words); ``paper``: the paper's
    figures for the setting; ``settings``: what was run.
    """

    FILE, JOB = STEER_EVAL_JSON, "python -m vlmsae.steer_eval"
    summary: dict[str, Any] = _f(dict, default=MISSING)
    per_latent: list[dict[str, Any]] = _f(list, default=MISSING)
    settings: dict[str, Any] = _f(dict, default=dict)
    paper: dict[str, Any] | None = _f(dict, omit_none=True)


@dataclass
class SpliceResult(_JsonFormat):
    """``splice.json`` of ``python -m vlmsae.splice_eval``: LLaVA's answer loss with the SAE spliced in.

    ``summary``: the headline figures, flat (kl, nll_clean, nll_spliced, frac_recovered_zero, ...; per answer
    token); ``rows``: the table, one object per condition; ``per_answer``: per sample; ``notes``: why a figure is null
    (NaN) or a row is missing; ``settings``: what was run. Every key: docs/outputs.md. Non-finite numbers are
    written as null.
    """

    FILE, JOB, FINITE = SPLICE_JSON, "python -m vlmsae.splice_eval", True
    summary: dict[str, Any] = _f(dict, default=MISSING)
    rows: list[dict[str, Any]] = _f(list, default=MISSING)
    per_answer: list[dict[str, Any]] = _f(list, default=list)
    notes: list[str] = _f(list, default=list)
    settings: dict[str, Any] = _f(dict, default=dict)


@dataclass
class RunInfo(_JsonFormat):
    """``run_info.json``, in every output folder: what made it. ``config`` is the resolved job config;
    ``extra`` holds what the job added (``status``, ``sae_path``, ``skipped``, ``outputs``, ...).
    :func:`vlmsae.utils.provenance.write_run_info` fills it in."""

    FILE, JOB = RUN_INFO_JSON, "the job that made this folder"
    config: dict[str, Any] = _f(dict, default=dict, none_empty=True)
    vlmsae_version: str | None = None
    git_commit: str | None = None
    versions: dict[str, str] | None = _f(dict)
    command: str | None = None
    created: str | None = None


# --------------------------------------------------------------------------------------------
# The activation store (vlmsae.data.shards): manifest.json and progress.json
# --------------------------------------------------------------------------------------------
_EXTRACT_JOB = "python -m vlmsae.extract"


@dataclass
class StoreManifest(_JsonFormat):
    """``manifest.json`` of an activation store, written last (by :meth:`vlmsae.data.shards.ShardWriter.write_manifest`)
    when the store is complete. Layout of the store: :mod:`vlmsae.data.shards`.

    The shard writer's own keys (shapes, counts, the per-dimension statistics, provenance) are always there;
    the extraction's (model, layer, tokens, images, order, skipped images, ...) when ``python -m vlmsae.extract``
    wrote the store. A key absent from the file reads as None; ``extra`` keeps keys this vlmsae does not name.
    Keys marked ``omit_none`` are not written while None: not every store records every key
    (write_acts_store stores have no model details).
    """

    FILE, JOB, INDENT = MANIFEST_JSON, _EXTRACT_JOB, 1
    d: int | None = _f(int)  # row width
    n_rows: int | None = _f(int)
    dtype: str | None = _f(str)  # stored dtype: float16 | bfloat16 | float32
    n_shards: int | None = _f(int)
    n_chunks: int | None = _f(int)
    rows_per_chunk: int | None = _f(int)
    shards: list[str] | None = _f(list)  # shard file names, in order
    shard_rows: list[int] | None = _f(omit_none=True)  # rows per shard (+ rows_per_chunk: a remote store's chunk index)
    mean: list[float] | None = _f(list)  # per dimension, over the stored rows
    var: list[float] | None = _f(list)  # population variance per dimension
    mean_sq_norm: float | None = _f(*_NUM)  # E||x||^2
    versions: dict[str, Any] | None = _f(dict)
    git_commit: str | None = None
    complete: bool | None = _f(bool, omit_none=True)  # False: an unfinished extraction
    # what was extracted
    model: str | None = _f(omit_none=True)
    backend: str | None = _f(omit_none=True)
    arch: str | None = _f(omit_none=True)
    pretrained: str | None = _f(omit_none=True)
    local_path: str | None = _f(omit_none=True)
    layer: int | str | None = _f(int, str, omit_none=True)  # a block index or "last" (the pooled embedding)
    tokens: str | None = _f(str, omit_none=True)  # cls | mean | patches | all | random_k
    k: int | None = _f(int, omit_none=True)  # tokens per image for random_k
    seed: int | None = _f(omit_none=True)
    model_dtype: str | None = _f(omit_none=True)
    image_size: int | None = _f(omit_none=True)
    has_cls: bool | None = _f(omit_none=True)
    n_tokens_per_image: int | None = _f(omit_none=True)
    embed_dim: int | None = _f(omit_none=True)
    width: int | None = _f(omit_none=True)
    n_layers: int | None = _f(omit_none=True)
    rows_per_shard: int | None = _f(omit_none=True)
    # which images, in which order
    source: str | None = _f(omit_none=True)
    root: str | None = _f(omit_none=True)
    synthetic: dict[str, Any] | None = _f(dict, omit_none=True)
    max_images: int | None = _f(omit_none=True)
    batch_size: int | None = _f(omit_none=True)
    n_images: int | None = _f(int, omit_none=True)
    n_listed: int | None = _f(omit_none=True)
    classes: list[str] | None = _f(list, omit_none=True)  # label names
    image_list_digest: str | None = _f(omit_none=True)  # vlmsae.data.shards.image_list_digest of stored images' keys
    listing_digest: str | None = _f(omit_none=True)
    order_seed: int | None = _f(omit_none=True)
    order_unit: str | None = _f(omit_none=True)  # image | shard (wds)
    order_digest: str | None = _f(omit_none=True)
    image_idx_meaning: str | None = _f(omit_none=True)
    exif_transpose: bool | None = _f(omit_none=True)
    alpha_background: str | None = _f(omit_none=True)
    decode: str | None = _f(omit_none=True)  # cpu | cpu_draft | cuda_nvjpeg: image decoding (vlmsae.models.gpu_decode)
    n_skipped: int | None = _f(int, omit_none=True)
    skipped: list[dict[str, Any]] | None = _f(list, omit_none=True)  # {key, path, error, reason} per unreadable image
    skipped_by_reason: dict[str, int] | None = _f(dict, omit_none=True)
    # listed files that were not used, by reason: other files under data.root (``not an image extension: .txt``,
    # ``hidden file``) and images left out by max_images (``not in the max_images subset``); skipped images
    # are in ``skipped_by_reason``. None in a store written before it was recorded.
    ignored_by_reason: dict[str, int] | None = _f(dict, omit_none=True)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> StoreManifest:
        """A manifest from the writer's flat dict (its ``meta`` and fields): named keys typed, the rest in extra."""
        return _build(cls, obj, "the activation store manifest", _EXTRACT_JOB, StoreManifest.VERSIONS[-1])


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
    return StoreManifest.read(fpath)


def manifest_from_json(text: str | bytes, where: str) -> StoreManifest:
    """A ``manifest.json`` read from elsewhere than a local file (a URL): ``where`` names it in errors."""
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON ({err}): the store is damaged or not a vlmsae store.") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{where} holds a JSON {type(obj).__name__}, expected an object; re-run `{_EXTRACT_JOB}`.")
    return StoreManifest.from_json(obj, where)


@dataclass
class StoreProgress(_JsonFormat):
    """``progress.json``: the shard writer's state after its last complete shard, the point a killed
    extraction resumes from (rewritten only after that shard is in place).

    ``meta``: the extraction's settings (a resume with other settings is refused); ``stats``: the running
    statistics (:meth:`vlmsae.data.shards.RunningStats.state_dict`); ``state``: the caller's resume state
    (e.g. the next image position), None before the first shard.
    """

    FILE, JOB, INDENT = PROGRESS_JSON, _EXTRACT_JOB, None
    meta: dict[str, Any] = _f(dict, default=MISSING)
    n_shards: int = _f(int, default=MISSING)
    n_rows: int = _f(int, default=MISSING)
    n_chunks: int = _f(int, default=MISSING)
    stats: dict[str, Any] = _f(dict, default=MISSING)
    state: dict[str, Any] | None = _f(dict)


# --------------------------------------------------------------------------------------------
# SAE checkpoint: config.json (the weights, sae.safetensors, are vlmsae.sae.checkpoint's)
# --------------------------------------------------------------------------------------------
@dataclass
class SAECheckpointConfig(_JsonFormat):
    """``config.json`` of an SAE checkpoint folder (:func:`vlmsae.sae.save_sae`): what the SAE is (``config``,
    the full :class:`vlmsae.sae.SAEConfig`, plus arch, sizes, threshold and the folded input scale), its
    precision policy (``precision``, :mod:`vlmsae.sae.precision`), what it was trained on (``trained_on``: model,
    pretrained, layer, tokens, data, ...) and by which code. ``format`` is always ``"vlmsae-sae"``.
    """

    FILE, JOB = SAE_CONFIG_JSON, "python -m vlmsae.train"
    VERSIONS = (1, 2)  # 2: the training record is "trained_on" (version 1 called it "source")
    format: str = _f(str, default=SAE_FORMAT)
    arch: str | None = _f(str)
    d_in: int | None = _f(int)
    n_latents: int | None = _f(int)
    k: int | None = _f(int)
    group_sizes: list[int] | None = _f(list)
    threshold: float | None = _f(*_NUM)  # None: no scalar threshold (jumprelu: per-latent [F] in sae.safetensors)
    input_scale: dict[str, Any] | None = _f(dict)  # {value, folded, convention}
    n_steps: int | None = _f(int)
    dtype: str | None = None
    precision: dict[str, Any] | None = _f(dict, omit_none=True)  # absent in checkpoints before it
    trained_on: dict[str, Any] = _f(dict, default=dict, none_empty=True)  # "source" in version 1 files
    config: dict[str, Any] = _f(dict, default=dict)  # SAEConfig.to_dict(); the reader requires it
    vlmsae_version: str | None = None
    git_commit: str | None = None
    created: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
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
    return SAECheckpointConfig.from_json(obj, fpath)


# --------------------------------------------------------------------------------------------
# latents.csv
# --------------------------------------------------------------------------------------------
LATENTS_COLUMNS = ("latent", "ms", "freq", "max_act", "group", "top_keys")  # always written
LATENTS_NAME_COLUMNS = ("name", "name_score", "names")  # written when the run named its latents
LATENTS_AUTOINTERP_COLUMNS = ("autointerp", "autointerp_score")  # written when the run asked LLaVA
_MS_JOB = "python -m vlmsae.monosemanticity"
_MS_REWRITE = f"re-run `{_MS_JOB}` to rewrite it."
_LATENTS_FLOATS = ("ms", "freq", "max_act", "name_score", "autointerp_score")  # an empty or absent cell reads as NaN


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


def _csv_version(fpath: Path, first: str, name: str, known: tuple[int, ...], job: str, alt: str = "") -> int:
    """The version on the first line of a CSV format, ``# vlmsae <name> format_version=<n>``."""
    match = re.match(rf"^# vlmsae {re.escape(name)} format_version=(\S+)\s*$", first.rstrip("\r\n"))
    if match is None:
        raise ValueError(
            f"{fpath} starts with {first.strip()!r}, expected '# vlmsae {name} format_version=<n>'{alt}; "
            f"re-run `{job}` to rewrite it."
        )
    found: Any = int(match.group(1)) if match.group(1).isdigit() else match.group(1)
    return check_version(fpath, found, known, job)


def _csv_writer(name: str, version: int) -> tuple[io.StringIO, Any]:
    """A buffer holding the version line of a CSV format, and a ``csv.writer`` onto it."""
    buf = io.StringIO()
    buf.write(f"# vlmsae {name} format_version={version}\r\n")  # csv.writer ends lines \r\n
    return buf, csv.writer(buf)


def read_latents_csv(path: str | Path) -> LatentsTable:
    """``latents.csv`` (the file or its run folder) -> typed rows; columns ``latent`` and ``ms`` are required."""
    fpath = _found(path, LATENTS_CSV, _MS_JOB)
    with open(fpath, newline="", encoding="utf-8") as f:
        first = f.readline()
        if first.startswith("#"):
            known, alt = LATENTS_CSV_VERSIONS, " or the header line"
            version, offset = _csv_version(fpath, first, LATENTS_CSV, known, _MS_JOB, alt), 1
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
            numbers = {c: _cell_float(r.get(c), fpath, line, c) for c in _LATENTS_FLOATS}
            lists = {c: tuple(r[c].split("|")) if r.get(c) else () for c in ("top_keys", "names")}
            texts = {c: r.get(c) for c in ("name", "autointerp")}  # None when the column is absent; "" when empty
            group = _cell_int(r.get("group"), fpath, line, "group")
            rows.append(LatentRow(latent, group=group, **numbers, **lists, **texts))
    return LatentsTable(rows, format_version=version)


def _float_cell(x: float, nan: str = "") -> str:
    return nan if math.isnan(x) else f"{x:.6f}"


def write_latents_csv(dpath: str | Path, table: LatentsTable) -> Path:
    """Write ``dpath/latents.csv`` at the current version (the version line, the header, one row per latent).

    The name columns are written when any row has a ``name`` (not None), the autointerp ones when any row
    has an ``autointerp``; a run without them keeps the six columns of version 2.
    """
    with_names = any(r.name is not None for r in table.rows)
    with_autointerp = any(r.autointerp is not None for r in table.rows)
    buf, writer = _csv_writer(LATENTS_CSV, LATENTS_CSV_VERSIONS[-1])
    writer.writerow(
        LATENTS_COLUMNS
        + (LATENTS_NAME_COLUMNS if with_names else ())
        + (LATENTS_AUTOINTERP_COLUMNS if with_autointerp else ())
    )
    for r in table.rows:
        cells = [
            r.latent,
            _float_cell(r.ms, "nan"),
            f"{r.freq:.6g}",
            f"{r.max_act:.6g}",
            "" if r.group is None else r.group,
            "|".join(r.top_keys),
        ]
        if with_names:
            cells += [r.name or "", _float_cell(r.name_score), "|".join(r.names)]
        if with_autointerp:
            cells += [r.autointerp or "", _float_cell(r.autointerp_score)]
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
    fpath = dpath / TOP_TENSORS
    if not fpath.exists():
        raise FileNotFoundError(f"{fpath} not found: point at a top_images/ folder written by `{_MS_JOB}`.")
    images_fpath = dpath / TOP_IMAGES_JSON
    if not images_fpath.is_file():
        raise FileNotFoundError(
            f"{images_fpath} is missing: the top_images index needs {TOP_TENSORS} and {TOP_IMAGES_JSON}."
        )
    meta_fpath = dpath / TOP_META_JSON
    meta = read_json_object(meta_fpath, _MS_REWRITE) if meta_fpath.exists() else {}
    # An index written before format_version existed (or without meta.json) is version 1.
    version = check_version(meta_fpath, meta.pop("format_version", 1), TOP_IMAGES_VERSIONS, _MS_JOB)
    tensors = load_file(str(fpath))
    if "image_idx" not in tensors or "acts" not in tensors:
        raise ValueError(f"{fpath} must hold tensors 'image_idx' and 'acts' [K, T]; it has {sorted(tensors)}.")
    images = read_json_object(images_fpath, _MS_REWRITE)
    image_idx, acts = tensors.pop("image_idx"), tensors.pop("acts")
    keys, paths, labels = list(images.get("keys") or []), images.get("paths"), images.get("labels")
    return TopImagesIndex(image_idx, acts, keys, paths, labels, meta, extra=tensors, format_version=version)


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
class StabilitySummary(_JsonFormat):
    """``stability.json`` of ``python -m vlmsae.stability``: how alike SAEs trained with different seeds are.

    ``runs``: the SAE folders (the first is the reference); ``matching``: the latent matching against the
    reference; ``metrics``: per training metric {mean, ci95, std, n} over seeds; ``ms`` / ``hierarchy``: the same
    for the seeds' ms_summary.json / hierarchy.json, when given. Every key: docs/outputs.md. Non-finite numbers are
    written as null.
    """

    FILE, JOB, FINITE = STABILITY_JSON, _STABILITY_JOB, True
    runs: list[str] = _f(list, default=MISSING)
    n_latents: int = _f(int, default=MISSING)
    d_in: int = _f(int, default=MISSING)
    matching: dict[str, Any] = _f(dict, default=MISSING)
    metrics: dict[str, Any] = _f(dict, default=dict)
    ms: dict[str, Any] | None = _f(dict, omit_none=True)
    hierarchy: dict[str, Any] | None = _f(dict, omit_none=True)


STABILITY_LATENTS_COLUMNS = ("latent", "found_in", "mean_cos")  # then match_<seed> per seed after the reference


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
    buf, writer = _csv_writer(STABILITY_LATENTS_CSV, STABILITY_LATENTS_VERSIONS[-1])
    writer.writerow([*STABILITY_LATENTS_COLUMNS, *(f"match_{s}" for s in range(1, len(table.matches) + 1))])
    for i, latent in enumerate(table.latent):
        row = [latent, table.found_in[i], _float_cell(table.mean_cos[i], "nan")]
        writer.writerow(row + [m[i] for m in table.matches])
    return atomic_write_text(Path(dpath) / STABILITY_LATENTS_CSV, buf.getvalue())


def read_stability_latents(path: str | Path) -> StabilityLatents:
    fpath = _found(path, STABILITY_LATENTS_CSV, _STABILITY_JOB)
    with open(fpath, newline="", encoding="utf-8") as f:
        first = f.readline()
        version = _csv_version(fpath, first, STABILITY_LATENTS_CSV, STABILITY_LATENTS_VERSIONS, _STABILITY_JOB)
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
@dataclass
class InspectResult(_JsonFormat):
    """``inspect.json`` of ``python -m vlmsae.inspect``: what an SAE sees in the given images, and where.

    ``images``: one object per image (its top latents, pooled and by peak patch, with their heatmaps); ``latents``:
    what the MS run says of every latent shown; ``query`` and ``compare``: the answers to those options, or null;
    ``settings``: what was run. Every key: docs/outputs.md. Non-finite numbers are written as null.
    """

    FILE, JOB, FINITE = INSPECT_JSON, "python -m vlmsae.inspect", True
    images: list[dict[str, Any]] = _f(list, default=MISSING)
    latents: dict[str, Any] = _f(dict, default=dict)
    query: dict[str, Any] | None = _f(dict)
    compare: dict[str, Any] | None = _f(dict)
    settings: dict[str, Any] = _f(dict, default=dict)


# Each JSON format is read by its class (read_manifest and read_sae_config add their own errors) and written by the
# one writer.
read_ms_summary, write_ms_summary = MsSummary.read, _write
read_hierarchy, write_hierarchy = HierarchySummary.read, _write
read_steer, write_steer = SteerResult.read, _write
read_steer_eval, write_steer_eval = SteerEvalResult.read, _write
read_splice, write_splice = SpliceResult.read, _write
read_run_info, write_run_info = RunInfo.read, _write
write_manifest = _write
read_progress, write_progress = StoreProgress.read, _write
write_sae_config = _write
read_stability, write_stability = StabilitySummary.read, _write
read_inspect, write_inspect = InspectResult.read, _write
