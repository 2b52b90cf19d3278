"""A static HTML feature browser: one card per SAE latent, readable from ``file://`` with no server.

The browser only *reads* what the other jobs wrote (through :mod:`vlmsae.formats`): a monosemanticity
run (``latents.csv``, ``ms_summary.json``, ``top_images/``), an optional hierarchy run (``latent_taxa.csv``,
``hierarchy.json``) and optional steering runs (``steer.json``), and writes a folder that opens from disk:
``index.html``, ``img/`` thumbnails, ``chunks/`` of card data above ``max_inline`` cards (docs/demo.md, "At
the paper's size").

Patch heatmaps come from an optional ``patch_acts`` [K, X, P] tensor in ``top.safetensors`` (P a square
grid) when a writer recorded it; otherwise they are recomputed from the MS run's ``run_info.json``
(``sae_path``, ``sae_format``, model; the SAE's ``trained_on`` as the run recorded it) when the SAE's
``trained_on.tokens`` is patches | all | random_k. Latent ids mean something within one SAE only, so a
steering run attaches to the cards only when its ``settings.sae_path`` is the MS run's SAE.

Safety: labels come from folder names and CSVs we do not control. They reach the page only as
JSON inside a ``<script type="application/json">`` block or a chunk file's ``vlmsaeChunk(<json>)`` call with
``<``, ``>`` and ``&`` escaped, and the page's script puts them into the DOM with ``textContent``, never
``innerHTML``; a label like ``<script>alert(1)</script>`` shows up as text.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import json
import math
import multiprocessing
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmsae import formats
from vlmsae.config.nodes import LoggerSchema
from vlmsae.utils.io import atomic_write_text

TEMPLATE_DPATH = Path(__file__).resolve().parent / "templates"
# Token selections whose SAE has seen patch tokens, so a per-patch heatmap means something.
PATCH_TOKEN_SELECTIONS = ("patches", "all", "random_k")
# Images a card shows; the index usually holds 16 per latent.
DEFAULT_IMAGES_PER_CARD = 16
# Cards per chunk file of a large browser, and the most cards inlined into index.html (one file, as
# W&B's html panel needs); above it the cards are loaded from chunks/ as they scroll into view.
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_MAX_INLINE = 1000
# The page of an inspect run (python -m vlmsae.inspect, vlmsae.report.inspect_page) the cards link to.
INSPECT_PAGE = "inspect.html"
# Fewer thumbnails than this are written in-process (a pool's start-up costs more than it saves).
POOL_MIN_IMAGES = 2000


# --------------------------------------------------------------------------------------------
# What the browser finds on disk
# --------------------------------------------------------------------------------------------
@dataclass
class RunSources:
    """The run folders one browser is built from (only ``ms_dpath`` is required)."""

    ms_dpath: Path
    hierarchy_dpath: Path | None = None
    steer_fpaths: list[Path] = field(default_factory=list)
    found: list[str] = field(default_factory=list)  # how each run was found, for the user


def _is_ms_run(dpath: Path) -> bool:
    return (dpath / formats.LATENTS_CSV).is_file() and (dpath / formats.TOP_IMAGES_DIR).is_dir()


_SKIP_DIRS = {"browser", ".hydra", "wandb", "checkpoints", "top_images", "csv"}


def _recorded_sae_path(dpath: Path) -> str | None:
    """The ``sae_path`` a job recorded in ``dpath/run_info.json`` (None without one, or for another kind of run)."""
    try:
        value = formats.read_run_info(dpath).config.get("sae_path")
    except (OSError, ValueError):
        return None
    return str(value) if value else None


def _sae_keys(sae_path: str, bases: list[Path]) -> set[Path]:
    """Where ``sae_path`` may point, resolved against each launch folder in ``bases`` (a job records it as typed,
    relative to the folder it was started from); a train run folder stands for its ``sae/``."""
    keys = set()
    for base in bases:
        path = Path(sae_path).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        keys.add(path / "sae" if (path / "sae").is_dir() else path)
    return keys


def runs_of_same_sae(ms_dpath: str | Path) -> tuple[list[Path], list[Path]]:
    """``(hierarchy run folders, steer.json files)`` of the SAE the MS run ``ms_dpath`` scored, wherever they are
    under the ``outputs/`` folder above the MS run, matched through the ``sae_path`` each run recorded in its
    ``run_info.json``. Newest first."""
    ms_dpath = Path(ms_dpath)
    sae_path = _recorded_sae_path(ms_dpath)
    if sae_path is None:
        return [], []
    # The outputs/ folder above the run (Hydra's default run dirs), else the run's grandparent.
    resolved = ms_dpath.resolve()
    root = next((parent for parent in resolved.parents if parent.name == "outputs"), resolved.parent.parent)
    bases = [Path.cwd(), root.resolve().parent]
    want = _sae_keys(sae_path, bases)
    hierarchy, steer = [], []
    for info in root.rglob(formats.RUN_INFO_JSON):
        dpath = info.parent
        if _SKIP_DIRS & set(dpath.relative_to(root).parts):
            continue
        is_hierarchy, is_steer = (dpath / "latent_taxa.csv").is_file(), (dpath / formats.STEER_JSON).is_file()
        if not (is_hierarchy or is_steer):
            continue
        other = _recorded_sae_path(dpath)
        if other is None or not (_sae_keys(other, bases) & want):
            continue
        if is_hierarchy:
            hierarchy.append(dpath)
        if is_steer:
            steer.append(dpath / formats.STEER_JSON)

    def newest(p: Path) -> float:
        return -(p if p.is_file() else p / formats.RUN_INFO_JSON).stat().st_mtime

    return sorted(hierarchy, key=newest), sorted(steer, key=newest)


def find_runs(
    root: str | Path,
    ms_run: str | Path | None = None,
    hierarchy_run: str | Path | None = None,
    steer_runs: list[str | Path] | None = None,
) -> RunSources:
    """Locate the monosemanticity, hierarchy and steering outputs under ``root``.

    ``root`` may be one run folder or a parent of several (``outputs/demo/``). Explicit
    ``ms_run`` / ``hierarchy_run`` / ``steer_runs`` take precedence over the scan. Several
    candidates for the same role are an error that names them, not a silent guess.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"run={root} is not a folder. Pass the output folder of a monosemanticity run "
            f"(it holds latents.csv and top_images/), or a parent of several runs."
        )
    skip = {"browser", ".hydra", "wandb", "checkpoints"}

    def scan(pattern: str) -> list[Path]:
        return sorted(p for p in root.rglob(pattern) if not (skip & set(p.relative_to(root).parts[:-1])))

    if ms_run is not None:
        ms_dpath = Path(ms_run)
        if not _is_ms_run(ms_dpath):
            raise FileNotFoundError(
                f"ms_run={ms_dpath} holds no latents.csv + top_images/; "
                f"run `python -m vlmsae.monosemanticity` first or fix the path."
            )
    else:
        ms_dpath = _at_most_one(
            [p.parent for p in scan(formats.LATENTS_CSV) if _is_ms_run(p.parent)],
            f"monosemanticity runs under run={root}",
            "ms_run=<dir> (or point run= at one of them)",
        )
        if ms_dpath is None:
            raise FileNotFoundError(
                f"No monosemanticity run under run={root}: found no folder with latents.csv and top_images/. "
                f"Run `python -m vlmsae.monosemanticity sae_path=...` and point run= at its output folder."
            )

    found = [f"monosemanticity run: {ms_dpath}" + (" (ms_run=)" if ms_run is not None else f" (under run={root})")]

    # Hydra puts each job in its own folder (outputs/<job>/<time>/): runs of the same SAE elsewhere under
    # outputs/ are found through the sae_path their run_info.json recorded.
    @functools.cache
    def of_same_sae() -> tuple[list[Path], list[Path]]:
        return runs_of_same_sae(ms_dpath)

    if hierarchy_run is not None:
        hierarchy_dpath: Path | None = Path(hierarchy_run)
        if not (hierarchy_dpath / "latent_taxa.csv").is_file():
            raise FileNotFoundError(f"hierarchy_run={hierarchy_dpath} holds no latent_taxa.csv.")
        found.append(f"hierarchy run: {hierarchy_dpath} (hierarchy_run=)")
    else:
        hierarchy_dpath = _at_most_one(
            [p.parent for p in scan("latent_taxa.csv")], f"hierarchy runs under run={root}", "hierarchy_run=<dir>"
        )
        if hierarchy_dpath is not None:
            found.append(f"hierarchy run: {hierarchy_dpath} (under run={root})")
        elif of_same_sae()[0]:
            hierarchy_dpath, *older = of_same_sae()[0]
            found.append(
                f"hierarchy run: {hierarchy_dpath} (same sae_path"
                + (f"; the newest of {len(older) + 1}, pick another with hierarchy_run=<dir>)" if older else ")")
            )
        else:
            found.append(
                "hierarchy run: none (run `python -m vlmsae.hierarchy` with the same sae_path, or pass hierarchy_run=)"
            )

    if steer_runs is not None:
        steer_fpaths = [Path(s) / formats.STEER_JSON if Path(s).is_dir() else Path(s) for s in steer_runs]
        for s, p in zip(steer_runs, steer_fpaths):
            if not p.is_file():
                raise FileNotFoundError(f"steer_runs entry {s} holds no steer.json.")
        found.append(f"steering runs: {len(steer_fpaths)} (steer_runs=)")
    else:
        steer_fpaths = scan(formats.STEER_JSON)
        how = f"under run={root}"
        if not steer_fpaths and of_same_sae()[1]:
            steer_fpaths, how = of_same_sae()[1], "same sae_path"
        found.append(f"steering runs: {len(steer_fpaths)} ({how})" + "".join(f"\n  {p.parent}" for p in steer_fpaths))
    return RunSources(ms_dpath=ms_dpath, hierarchy_dpath=hierarchy_dpath, steer_fpaths=steer_fpaths, found=found)


def _at_most_one(cands: list[Path], what: str, pick: str) -> Path | None:
    """The one candidate (None for none); several are an error that lists them and says how to ``pick``."""
    if len(cands) > 1:
        listing = "\n  ".join(str(c) for c in cands)
        raise ValueError(f"Several {what}:\n  {listing}\nPick one with {pick}.")
    return cands[0] if cands else None


# --------------------------------------------------------------------------------------------
# Readers for the documented formats
# --------------------------------------------------------------------------------------------
def _float(value: Any) -> float | None:
    """CSV cell -> float, with empty / nan / unparsable -> None (JSON has no NaN)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def latent_rows(table: formats.LatentsTable) -> list[dict[str, Any]]:
    """``latents.csv`` rows (:func:`vlmsae.formats.read_latents_csv`) as the page's dicts: NaN -> None
    (JSON has no NaN), ``top_keys`` joined by "|" as written."""
    return [
        {
            "latent": r.latent,
            "ms": _float(r.ms),
            "freq": _float(r.freq),
            "max_act": _float(r.max_act),
            "group": r.group,
            "top_keys": "|".join(r.top_keys),
            "name": (getattr(r, "name", None) or "").strip(),  # the automatic name (names=...), "" when unnamed
            "names": _names(getattr(r, "names", None)),
        }
        for r in table.rows
    ]


def _names(value: Any) -> list[str]:
    """The optional ``names`` column (best names first) as a list, whether the reader gives a tuple or a
    "|"-joined string."""
    if isinstance(value, str):
        value = value.split("|")
    if not isinstance(value, (list, tuple)):
        return []
    return [str(v).strip() for v in value if str(v).strip()]


def read_taxa_csv(fpath: Path) -> dict[int, dict[str, Any]]:
    """``latent_taxa.csv`` -> {latent: {"label", "depth_mean", "depth_mode", "group", "ranks": {rank: taxon}}}."""
    fixed = {"latent", "group", "depth_mean", "depth_mode", "label"}
    out: dict[int, dict[str, Any]] = {}
    with open(fpath, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "latent" not in (reader.fieldnames or []):
            raise ValueError(f"{fpath} has no 'latent' column (columns: {reader.fieldnames}).")
        rank_cols = [c for c in reader.fieldnames or [] if c not in fixed]
        for r in reader:
            latent = _int(r["latent"])
            if latent is None:
                continue
            out[latent] = {
                "label": r.get("label") or "",
                "group": _int(r.get("group")),
                "depth_mean": _float(r.get("depth_mean")),
                "depth_mode": _float(r.get("depth_mode")),
                "ranks": {c: r[c] for c in rank_cols if r.get(c)},
            }
    return out


def read_top_index(dpath: Path) -> tuple[Any, list[int], Any]:
    """The top-images index (``vlmsae.metrics.topimages.TopImages.load``) with the browser's extras: the latent id
    of each row (a ``latents`` tensor or ``meta["latents"]``, else row k = latent k) and the recorded per-patch
    activations [K, X, P] (``patch_acts``, None when absent)."""
    from vlmsae.metrics.topimages import TopImages

    top = TopImages.load(dpath)
    if "latents" in top.extra:
        row_latents = [int(x) for x in top.extra["latents"].tolist()]
    elif isinstance(top.meta.get("latents"), list):
        row_latents = [int(x) for x in top.meta["latents"]]
    else:
        row_latents = list(range(top.n_latents))
    patch = next((top.extra[k] for k in ("patch_acts", "patch_acts_KXP") if k in top.extra), None)
    return top, row_latents, patch


def read_steering(fpaths: list[Path]) -> list[dict[str, Any]]:
    """Each ``steer.json`` -> one example: the settings, the latents it steered, one row per image.

    Follows ``vlmsae.steer``'s format: ``steered`` and ``baseline`` answer lists (one per image),
    optional ``activation_steering`` (the plain add-the-direction baseline) and ``sweep``
    ({alpha: answers}), and ``settings`` with ``latents`` ({latent: alpha}), ``mode``, ``prompt``,
    ``images``. A bare ``latent`` / ``alpha`` / ``image`` in the settings is understood too.
    """
    examples = []
    for fpath in fpaths:
        obj = formats.read_steer(fpath)
        settings = obj.settings
        latents = _steered_latents(settings)
        alpha = settings.get("alpha")
        if alpha is None and isinstance(settings.get("latents"), dict):
            alpha = {str(k): v for k, v in settings["latents"].items()}
        steered, baseline, added = obj.steered, obj.baseline, obj.activation_steering or []
        images = _as_list(settings.get("images", settings.get("image")))
        rows = [
            {
                "image": str(images[i]) if i < len(images) else (str(images[0]) if len(images) == 1 else ""),
                "baseline": _answer_text(baseline[i]) if i < len(baseline) else "",
                "steered": _answer_text(steered[i]) if i < len(steered) else "",
                "activation_steering": _answer_text(added[i]) if i < len(added) else None,
            }
            for i in range(max(len(steered), len(baseline)))
        ]
        examples.append(
            {
                "steering_run": str(fpath.parent.name),
                "sae_path": settings.get("sae_path"),
                "latents": latents,
                "alpha": alpha,
                "mode": settings.get("mode"),
                "prompt": settings.get("prompt"),
                "rows": rows,
                "sweep": {str(a): [_answer_text(x) for x in _as_list(v)] for a, v in obj.sweep.items()}
                if obj.sweep
                else None,
            }
        )
    return examples


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _answer_text(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        for k in ("answer", "text", "output", "generated"):
            if isinstance(x.get(k), str):
                return x[k]
    return json.dumps(x, default=str)


def _steered_latents(settings: dict[str, Any]) -> list[int]:
    """Latent ids named by the steering settings (``latent: 3``, ``latents: [3, 4]`` or ``{3: 100}``)."""
    for key in ("latents", "latent"):
        val = settings.get(key)
        if val is None:
            continue
        vals = list(val) if isinstance(val, (dict, list, tuple)) else [val]  # a dict's keys are the latents
        out = [i for i in (_int(v) for v in vals) if i is not None]
        if out:
            return out
    return []


# --------------------------------------------------------------------------------------------
# Thumbnails and heatmaps
# --------------------------------------------------------------------------------------------
def write_thumbnail(src_fpath: str | Path, dst_fpath: Path, size_px: int) -> bool:
    """Save a ``size_px`` square JPEG thumbnail; False (and no file) when the image cannot be read."""
    from PIL import Image, UnidentifiedImageError

    from vlmsae.data.images import load_image  # the pixels the model saw (EXIF, 16-bit, alpha rules)

    try:
        img = load_image(src_fpath)
        # The centre square, the region CLIP-style preprocessing (resize + centre crop) sees, so a patch grid
        # drawn over the thumbnail lines up with the tokens the model saw.
        (w, h), s = img.size, min(img.size)
        left, top = (w - s) // 2, (h - s) // 2
        thumb = img.crop((left, top, left + s, top + s)).resize((size_px, size_px), Image.Resampling.BICUBIC)
    except (OSError, UnidentifiedImageError, ValueError):
        return False
    tmp = dst_fpath.with_name(f".{dst_fpath.name}.tmp")
    thumb.save(tmp, format="JPEG", quality=88)
    tmp.replace(dst_fpath)
    return True


def _thumb_rel(image_idx: int) -> str:
    """Where image ``image_idx``'s thumbnail lives, relative to index.html (browser.js builds the same path)."""
    return f"img/{image_idx:07d}.jpg"


def _thumbnail_job(job: tuple[int, str, str, int]) -> int | None:
    image_idx, src, dst, size_px = job
    return image_idx if write_thumbnail(src, Path(dst), size_px) else None


def write_thumbnails(
    sources: list[tuple[int, str]], img_dpath: Path, size_px: int, workers: int | None = None
) -> set[int]:
    """Write one thumbnail per (image index, source path) into ``img_dpath``; returns the indices written.

    Tens of thousands of images (every latent's top images) take a minute on one core, so large sets
    go through a process pool of ``workers`` (default: the CPU count); a small set stays in-process."""
    jobs = [(i, src, str(img_dpath / _thumb_rel(i).split("/", 1)[1]), size_px) for i, src in sources]
    workers = workers or os.cpu_count() or 1
    if workers < 2 or len(jobs) < POOL_MIN_IMAGES:
        return {i for i in map(_thumbnail_job, jobs) if i is not None}
    # fork: the workers need nothing but PIL and this module, which the parent has already imported.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return {i for i in pool.map(_thumbnail_job, jobs, chunksize=256) if i is not None}


def quantize_grid(values_P: list[float], scale: float) -> list[int]:
    """Per-patch activations -> ints 0..255 relative to ``scale`` (the latent's largest patch value),
    so the same colour means the same activation across one latent's images."""
    if scale <= 0:
        return [0] * len(values_P)
    return [max(0, min(255, round(255 * v / scale))) for v in values_P]


def _grid_side(n_patches: int) -> int | None:
    side = math.isqrt(n_patches)
    return side if side * side == n_patches and side > 0 else None


def recompute_heatmaps(
    ms_config: dict[str, Any],
    requests: dict[int, list[tuple[int, int, int]]],
    image_paths: list[str],
    batch_size: int = 32,
    sae_trained_on: dict[str, Any] | None = None,
    sae_format: str | None = None,
) -> tuple[dict[tuple[int, int], list[float]], str]:
    """Per-patch activations of the requested latents, recomputed with the model and the SAE.

    ``requests`` maps an image index to (card, slot, latent) triples. Each image goes through the
    model once (in batches), all its patch tokens through the SAE (thresholded inference), and the
    columns of the latents that list it are kept. Returns ({(card, slot): values_P}, reason); the
    reason is non-empty when nothing could be recomputed (no SAE, CLS-only SAE, model unavailable).
    ``sae_trained_on``: what the SAE reads (default: :func:`run_sae_trained_on` of ``ms_config`` alone);
    ``sae_format``: the SAE's format for :func:`vlmsae.sae.load` (default: the MS run's, else detect).
    """
    sae_path = ms_config.get("sae_path")
    if not sae_path or ("://" not in str(sae_path) and not Path(sae_path).is_dir()):
        return {}, f"no SAE checkpoint at sae_path={sae_path!r} of the MS run"
    trained_on = sae_trained_on if sae_trained_on is not None else run_sae_trained_on(ms_config, {})
    tokens = str(trained_on.get("tokens") or ms_config.get("tokens") or "")
    if tokens not in PATCH_TOKEN_SELECTIONS:
        return {}, f"the SAE was trained on tokens={tokens or 'unknown'!r}, not patch tokens"
    # The MS run's model node, else the model the SAE names (a registered name, conf/model/<name>.yaml).
    model = ms_config.get("model") if isinstance(ms_config.get("model"), dict) else trained_on.get("model")
    # The layer the MS run was told (layer=), else the SAE's own: the codes the cards rank came from there.
    layer = ms_config.get("layer") if ms_config.get("layer") is not None else trained_on.get("layer")
    if not model or layer is None:
        return {}, "neither the MS run nor the SAE names the model and layer"
    if str(layer) == "last":
        return {}, "the SAE reads the pooled embedding (layer=last): no patch tokens"
    try:
        import torch

        from vlmsae.models import load_tap
        from vlmsae.models.open_sae import load_job_sae

        tap = load_tap(model)
        sae = load_job_sae(sae_path, sae_format or ms_config.get("sae_format"), device=tap.device).eval()
    except Exception as e:
        return {}, f"could not load the model or SAE ({type(e).__name__}: {e})"
    if sae.d_in != tap.width:
        return {}, f"the SAE reads {sae.d_in}-d activations but {tap.name}'s layer {layer} is {tap.width}-d"

    from tqdm import tqdm

    from vlmsae.data.images import load_image

    out: dict[tuple[int, int], list[float]] = {}
    todo = [i for i in sorted(requests) if i < len(image_paths) and image_paths[i]]
    with torch.no_grad(), tqdm(total=len(todo), desc="heatmaps", unit="img", leave=False, disable=None) as bar:
        for i0 in range(0, len(todo), batch_size):
            batch, pixels = [], []
            for image_idx in todo[i0 : i0 + batch_size]:
                try:
                    pixels.append(tap.preprocess(load_image(image_paths[image_idx])))  # decoded as when ranked
                    batch.append(image_idx)
                except OSError:
                    continue  # unreadable now: its card simply shows no heatmap
            bar.update(len(todo[i0 : i0 + batch_size]))
            if not batch:
                continue
            acts_BTD = tap.forward_to(torch.stack(pixels), layer=int(layer))
            patches_BPD = acts_BTD[:, 1:] if tap.has_cls else acts_BTD
            for image_idx, patches_PD in zip(batch, patches_BPD):
                codes_PF = sae.encode(patches_PD.float())  # one image at a time: P x F stays small
                for card, slot, latent in requests[image_idx]:
                    out[(card, slot)] = codes_PF[:, latent].float().cpu().tolist()
    return out, "" if out else "no image could be re-read for heatmaps"


# --------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------
def build_browser(
    sources: RunSources,
    out_dpath: str | Path,
    max_cards: int | None = None,
    images_per_card: int = DEFAULT_IMAGES_PER_CARD,
    thumb_px: int = 96,
    heatmaps: str = "auto",
    title: str | None = None,
    sae_format: str | None = None,
    max_inline: int = DEFAULT_MAX_INLINE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write ``out_dpath/index.html`` (+ ``img/`` thumbnails, ``chunks/``, plots) and return the page's data.

    Cards: every latent (``max_cards=None``) or the ``max_cards`` with the highest MS (dead latents last),
    plus every latent a steering run used; above ``max_inline`` cards their data goes to ``chunks/`` files of
    ``chunk_size`` cards (:func:`write_page`). ``heatmaps``: ``auto``
    (recorded, else recomputed when the SAE saw patch tokens), ``recorded`` (only what the MS run stored)
    or ``off``. ``sae_format``: the SAE's format when heatmaps are recomputed (default: the MS run's
    ``sae_format``, else detect). ``workers``: processes writing thumbnails (default: the CPU count).
    """
    if heatmaps not in ("auto", "recorded", "off"):
        raise ValueError(f"heatmaps={heatmaps!r}: use auto, recorded or off.")
    if max_cards is not None and max_cards < 1:
        raise ValueError(f"max_cards={max_cards} must be >= 1, or null for every latent.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (cards per chunk file, e.g. 1024).")
    if max_inline < 0:
        raise ValueError(f"max_inline={max_inline} must be >= 0 (0 always writes chunk files).")
    out_dpath = Path(out_dpath)
    img_dpath = out_dpath / "img"
    img_dpath.mkdir(parents=True, exist_ok=True)

    ms_dpath = sources.ms_dpath
    rows = latent_rows(formats.read_latents_csv(ms_dpath / formats.LATENTS_CSV))
    index, row_latents, patch_acts_KXP = read_top_index(ms_dpath / formats.TOP_IMAGES_DIR)
    # ms_summary.json, run_info.json and hierarchy.json are optional here: the page shows what there is.
    summary = _optional(formats.read_ms_summary, ms_dpath / formats.MS_SUMMARY_JSON)
    run_info = _optional(formats.read_run_info, ms_dpath / formats.RUN_INFO_JSON)
    ms_config = run_info.config if run_info is not None else {}
    sae_trained_on = run_sae_trained_on(ms_config, run_info.extra if run_info is not None else {})
    hier_dpath = sources.hierarchy_dpath
    taxa = read_taxa_csv(hier_dpath / "latent_taxa.csv") if hier_dpath else {}
    hierarchy = _optional(formats.read_hierarchy, hier_dpath / formats.HIERARCHY_JSON) if hier_dpath else None
    steering = read_steering(sources.steer_fpaths)

    # Choose the cards: highest MS first (None = dead, last), then the steered latents.
    by_latent = {r["latent"]: r for r in rows}
    ranked = sorted(rows, key=lambda r: (r["ms"] is None, -(r["ms"] or 0.0), r["latent"]))
    chosen = [r["latent"] for r in (ranked if max_cards is None else ranked[:max_cards])]
    chosen_set = set(chosen)
    steer_by_latent: dict[int, list[int]] = defaultdict(list)
    for i, ex in enumerate(steering):
        # Latent ids only mean something within one SAE: attach a steering run to the cards only
        # when it steered with the SAE this MS run scored (or either side does not say).
        ex["same_sae"] = _same_path(ex.get("sae_path"), ms_config.get("sae_path"))
        if not ex["same_sae"]:
            continue
        for latent in ex["latents"]:
            steer_by_latent[latent].append(i)
            if latent not in chosen_set and latent in by_latent:
                chosen.append(latent)
                chosen_set.add(latent)
    row_of_latent = {latent: row for row, latent in enumerate(row_latents)}

    # The top images of every card as [cards, X] tensors (one gather, not 16 Python lookups per card).
    import torch

    n_show = min(images_per_card, int(index.image_idx.shape[1])) if index.image_idx.ndim == 2 else 0
    card_rows = [row_of_latent.get(latent) for latent in chosen]
    gather = torch.tensor([r if r is not None else 0 for r in card_rows], dtype=torch.long)
    card_image_idx_KX = index.image_idx[gather, :n_show].clone()
    card_image_idx_KX[torch.tensor([r is None for r in card_rows], dtype=torch.bool)] = -1
    card_acts_KX = index.acts[gather, :n_show].float()

    # Thumbnails, one per image: each written once and shared by every card that shows it.
    paths = index.paths or []
    used = sorted(int(i) for i in torch.unique(card_image_idx_KX[card_image_idx_KX >= 0]).tolist())
    written = write_thumbnails(
        [(i, paths[i]) for i in used if i < len(paths) and paths[i]], img_dpath, thumb_px, workers=workers
    )
    n_keys, labels = len(index.keys), index.labels

    @functools.cache
    def caption(image_idx: int) -> str:
        key = index.keys[image_idx] if image_idx < n_keys else ""
        return _caption(key, labels[image_idx] if labels and image_idx < len(labels) else None)

    inspect_href = inspect_links(ms_dpath, out_dpath)
    show_recorded = heatmaps != "off" and patch_acts_KXP is not None and _grid_side(patch_acts_KXP.shape[-1])
    cards: list[dict[str, Any]] = []
    idx_rows, act_rows = card_image_idx_KX.tolist(), card_acts_KX.tolist()
    for c, latent in enumerate(chosen):
        r = by_latent[latent]
        tx = taxa.get(latent, {})
        row = card_rows[c]
        heat = patch_acts_KXP[row, :n_show].float().tolist() if show_recorded and row is not None else []
        top = []
        for slot, (image_idx, act) in enumerate(zip(idx_rows[c], act_rows[c])):
            if image_idx < 0:
                continue  # -1 pads latents with fewer than X firing images
            top.append(
                {
                    "slot": slot,
                    "image": image_idx,
                    "key": index.keys[image_idx] if image_idx < n_keys else str(image_idx),
                    "label": caption(image_idx),
                    "act": _float(act),
                    "src": _thumb_rel(image_idx) if image_idx in written else None,
                    "heat": heat[slot] if slot < len(heat) else None,
                }
            )
        cards.append(
            {
                **{k: r[k] for k in ("latent", "ms", "freq", "max_act", "name", "names")},
                "group": r["group"] if r["group"] is not None else tx.get("group"),
                "label": tx.get("label", ""),
                "ranks": tx.get("ranks", {}),
                "depth_mean": tx.get("depth_mean"),
                "top_keys": r["top_keys"] if row is None else "",
                "top": top,
                "steering": steer_by_latent.get(latent, []),
                **({"inspect": inspect_href[latent]} if latent in inspect_href else {}),
            }
        )

    heatmap_note = _fill_heatmaps(
        cards, patch_acts_KXP is not None, index.paths, ms_config, heatmaps, sae_trained_on, sae_format
    )
    plots = _copy_plots(ms_dpath, sources.hierarchy_dpath, out_dpath)
    data = {
        "title": title or f"vlmsae feature browser: {ms_dpath.name}",
        "n_latents": len(rows),
        "n_cards": len(cards),
        "max_cards": max_cards,
        "heatmap_note": heatmap_note,
        "sources": {
            "ms": str(ms_dpath),
            "hierarchy": str(sources.hierarchy_dpath or ""),
            "steer": [str(p) for p in sources.steer_fpaths],
        },
        "summary": summary.to_dict() if summary is not None else None,
        "hierarchy": hierarchy.to_dict() if hierarchy is not None else None,
        "model": _model_line(ms_config, index.meta, sae_trained_on),
        "plots": plots,
        "steering": steering,
        "cards": cards,
        "inline": len(cards) <= max_inline,
        "chunk_size": chunk_size,
        "n_chunks": math.ceil(len(cards) / chunk_size),
    }
    write_page(data, out_dpath)
    return data


def inspect_links(ms_dpath: str | Path, page_dpath: str | Path) -> dict[int, str]:
    """``{latent: href}`` from the page at ``page_dpath`` into the inspect page (``python -m vlmsae.inspect``) of
    each inspect run beside the MS run (a sibling or child folder whose inspect.json names ``ms_run`` = this run),
    for every latent that page shows; {} when there is none. A broken or too-new inspect.json gives no link."""
    ms_dpath = Path(ms_dpath).resolve()
    links: dict[int, str] = {}
    beside = {*ms_dpath.parent.glob(f"*/{formats.INSPECT_JSON}"), *ms_dpath.glob(f"*/{formats.INSPECT_JSON}")}
    for fpath in sorted(beside):
        if not (fpath.parent / INSPECT_PAGE).is_file():
            continue
        try:
            result = formats.read_inspect(fpath)
        except ValueError:
            continue
        ms_run = result.settings.get("ms_run")
        if not ms_run or Path(ms_run).resolve() != ms_dpath:
            continue
        href = Path(os.path.relpath(fpath.parent / INSPECT_PAGE, Path(page_dpath).resolve())).as_posix()
        for latent in result.latents:
            links.setdefault(int(latent), f"{href}#latent-{latent}")
    return links


def _same_path(a: Any, b: Any) -> bool:
    """True unless both paths are given and point to different places."""
    if not a or not b:
        return True
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    except OSError:
        return str(a) == str(b)


def _caption(key: str, label: Any) -> str:
    """What to print under a thumbnail: a text label, else the class folder of an ImageFolder key
    (``circle_blue/00003.png`` -> ``circle_blue``), else the numeric label (-1 = none)."""
    if isinstance(label, str) and label:
        return label
    if "/" in key:
        return key.rsplit("/", 1)[0]
    return "" if label is None or (isinstance(label, int) and label < 0) else str(label)


def _fill_heatmaps(
    cards: list[dict[str, Any]],
    recorded: bool,
    image_paths: list[str] | None,
    ms_config: dict[str, Any],
    mode: str,
    sae_trained_on: dict[str, Any],
    sae_format: str | None,
) -> str:
    """Quantize recorded heatmaps, or recompute them; returns a note for the page header."""
    if mode == "off":
        return "heatmaps off"
    if not recorded:
        if mode == "recorded":
            return "no per-patch activations recorded by the MS run"
        requests: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for c, card in enumerate(cards):
            for s, t in enumerate(card["top"]):
                requests[t["image"]].append((c, s, card["latent"]))
        values, reason = recompute_heatmaps(
            ms_config, requests, image_paths or [], sae_trained_on=sae_trained_on, sae_format=sae_format
        )
        if not values:
            return f"no patch heatmaps: {reason}"
        for (c, s), vals in values.items():
            cards[c]["top"][s]["heat"] = vals
        note = "patch heatmaps recomputed with the model and SAE"
    else:
        note = "patch heatmaps recorded by the MS run"
    for card in cards:
        grids = [t["heat"] for t in card["top"] if t["heat"]]
        scale = max((max(g) for g in grids), default=0.0)
        for t in card["top"]:
            t["heat"] = quantize_grid(t["heat"], scale) if t["heat"] and _grid_side(len(t["heat"])) else None
    return note


def run_sae_trained_on(ms_config: dict[str, Any], run_extra: dict[str, Any]) -> dict[str, Any]:
    """What the MS run's SAE reads: the ``sae_trained_on`` the run recorded (any SAE format; ``sae_source`` in
    runs before the rename), else, for runs made before either, the ``trained_on`` in a vlmsae SAE folder's
    ``config.json``; {} when none is there."""
    for key in ("sae_trained_on", "sae_source"):
        if isinstance(run_extra.get(key), dict):
            return dict(run_extra[key])
    sae_path = ms_config.get("sae_path")
    if not sae_path or "://" in str(sae_path):
        return {}
    sae_config = _optional(formats.read_sae_config, Path(sae_path) / formats.SAE_CONFIG_JSON)
    return dict(sae_config.trained_on) if sae_config is not None else {}


def _optional(read: Any, fpath: Path) -> Any:
    """``read(fpath)`` when the file is there, else None (a broken or too-new file is still an error)."""
    return read(fpath) if fpath.is_file() else None


def _copy_plots(ms_dpath: Path, hierarchy_dpath: Path | None, out_dpath: Path) -> list[dict[str, str]]:
    """Copy the jobs' PNG plots next to the page (so the folder stays self-contained)."""
    plots = []
    named = [
        (ms_dpath, "ms_hist.png", "MS of SAE latents vs raw neurons"),
        (ms_dpath, "ms_vs_freq.png", "MS against firing frequency"),
    ]
    if hierarchy_dpath:
        named.append((hierarchy_dpath, "hierarchy.png", "LCA depth per Matryoshka group"))
    (out_dpath / "plots").mkdir(exist_ok=True)
    for dpath, name, caption in named:
        if (dpath / name).is_file():
            shutil.copyfile(dpath / name, out_dpath / "plots" / name)
            plots.append({"src": f"plots/{name}", "caption": caption})
    return plots


def _model_line(ms_config: dict[str, Any], top_meta: dict[str, Any], trained_on: dict[str, Any]) -> str:
    """``model · layer L · tokens · SAE path`` from the MS run's config, its index meta and the SAE's trained_on."""
    model = ms_config.get("model") if isinstance(ms_config.get("model"), dict) else {}
    sae_path = ms_config.get("sae_path") or top_meta.get("sae_path")
    name = model.get("name") or top_meta.get("model") or trained_on.get("model")
    layer = next(
        (x for x in (ms_config.get("layer"), top_meta.get("layer"), trained_on.get("layer")) if x is not None), None
    )
    parts = [
        str(name) if name else "",
        f"layer {layer}" if layer is not None else "",
        f"tokens {trained_on['tokens']}" if trained_on.get("tokens") else "",
        f"SAE {sae_path}" if sae_path else "",
    ]
    return " · ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
def json_for_script(obj: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>``, ``&`` or
    line separators survive literally, so no string can close the script element."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def search_index(cards: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """What the page needs of every card up front, column by column: id, MS, frequency, group, name
    and the lower-case text a search matches (name, names, taxonomy label and ranks)."""

    return {
        "latent": [c["latent"] for c in cards],
        "ms": [_round_sig(c["ms"], 5) for c in cards],
        "freq": [_round_sig(c["freq"], 5) for c in cards],
        "group": [c["group"] for c in cards],
        "name": [c["name"] for c in cards],
        "text": [" ".join([c["name"], *c["names"], c["label"], *c["ranks"].values()]).strip().lower() for c in cards],
    }


def _round_sig(x: float | None, digits: int) -> float | None:
    """``x`` to ``digits`` significant digits: the page shows 3, and the JSON shrinks by a third."""
    return None if x is None else float(f"{x:.{digits}g}")


def chunk_payload(data: dict[str, Any], chunk: int) -> dict[str, Any]:
    """Cards ``chunk * chunk_size`` onwards as the page reads them: each card's top images as
    ``[image, act]`` pairs and base64 heatmaps, and the key, caption and thumbnail flag of each image
    the chunk shows once (a thumbnail's path is ``img/<image:07d>.jpg``)."""
    size = data["chunk_size"]
    images: dict[str, list[Any]] = {}
    cards = []
    for card in data["cards"][chunk * size : (chunk + 1) * size]:
        for t in card["top"]:
            images.setdefault(str(t["image"]), [t["key"], t["label"], 1 if t["src"] else 0])
        # A quantized heatmap (ints 0..255) as base64 bytes: a third of its JSON list's size.
        heats = [base64.b64encode(bytes(t["heat"])).decode("ascii") if t["heat"] else None for t in card["top"]]
        cards.append(
            {
                **{k: card[k] for k in CARD_FIELDS},
                "top": [[t["image"], _round_sig(t["act"], 4)] for t in card["top"]],
                **({"heat": heats} if any(heats) else {}),
                **({"inspect": card["inspect"]} if card.get("inspect") else {}),
            }
        )
    return {"chunk": chunk, "images": images, "cards": cards}


# Card fields a chunk carries as they are (the top images are packed by chunk_payload; MS, frequency and
# group are in the search index only).
CARD_FIELDS = ("latent", "max_act", "name", "names", "label", "ranks", "depth_mean", "top_keys", "steering")
PAGE_FIELDS = ("title", "n_latents", "n_cards", "max_cards", "heatmap_note", "sources", "summary", "hierarchy")
PAGE_FIELDS += ("model", "plots", "steering", "inline", "chunk_size", "n_chunks")


def chunk_fname(chunk: int) -> str:
    """``chunks/c00012.js``: the file that registers chunk 12 (browser.js builds the same name)."""
    return f"chunks/c{chunk:05d}.js"


def write_page(data: dict[str, Any], out_dpath: Path) -> None:
    """``index.html`` with the page data and search index inline, plus (unless ``data["inline"]``) one
    ``chunks/cNNNNN.js`` per chunk: ``vlmsaeChunk(<json>);``, a script file because a page opened from
    ``file://`` may load sibling scripts but not ``fetch()`` them."""
    page = {k: data[k] for k in PAGE_FIELDS}
    page["index"] = search_index(data["cards"])
    chunks_dpath = out_dpath / "chunks"
    if chunks_dpath.is_dir():
        shutil.rmtree(chunks_dpath)  # a previous, larger build's chunks must not linger
    if data["inline"]:
        page["chunks"] = [chunk_payload(data, c) for c in range(data["n_chunks"])]
    else:
        chunks_dpath.mkdir()
        for c in range(data["n_chunks"]):
            text = f"vlmsaeChunk({json_for_script(chunk_payload(data, c))});\n"
            atomic_write_text(out_dpath / chunk_fname(c), text)
    atomic_write_text(out_dpath / "index.html", render_html(page))


def render_html(data: dict[str, Any]) -> str:
    """Fill the template with inline CSS, JS and the JSON data (no request beyond the chunk scripts)."""
    page = (TEMPLATE_DPATH / "browser.html").read_text(encoding="utf-8")
    css = (TEMPLATE_DPATH / "browser.css").read_text(encoding="utf-8")
    js = (TEMPLATE_DPATH / "browser.js").read_text(encoding="utf-8")
    # One pass, so text filled into one placeholder is never scanned for another.
    fills = {"TITLE": html.escape(str(data["title"])), "CSS": css, "JS": js, "DATA": json_for_script(data)}
    return re.sub(r"\{\{(TITLE|CSS|JS|DATA)\}\}", lambda m: fills[m.group(1)], page)


# --------------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------------
# The page's heatmap ramp (browser.js RAMP): violet -> orange -> yellow.
# Rows of the W&B table (the highest-MS cards; steered latents always).
WANDB_MAX_ROWS = 500
HEAT_RAMP = ((13, 8, 135), (156, 23, 158), (237, 121, 83), (240, 249, 33))


def _ramp(v: float) -> tuple[int, int, int]:
    x = min(1.0, max(0.0, v)) * (len(HEAT_RAMP) - 1)
    i = min(len(HEAT_RAMP) - 2, int(x))
    f = x - i
    return tuple(round(a + f * (b - a)) for a, b in zip(HEAT_RAMP[i], HEAT_RAMP[i + 1]))  # type: ignore[return-value]


def card_overlay_image(thumb_fpath: Path, heat: list[int] | None) -> Any:
    """A PIL thumbnail with its patch heatmap blended in, as the page draws it (for W&B, which
    cannot run the page's script)."""
    from PIL import Image

    img = Image.open(thumb_fpath).convert("RGB")
    side = _grid_side(len(heat)) if heat else None
    if not side:
        return img
    colours = Image.new("RGB", (side, side))
    colours.putdata([_ramp(v / 255) for v in heat])
    alpha = Image.new("L", (side, side))
    alpha.putdata([round(190 * math.sqrt(v / 255)) for v in heat])
    size = img.size
    return Image.composite(
        colours.resize(size, Image.Resampling.BILINEAR), img, alpha.resize(size, Image.Resampling.BILINEAR)
    )


def wandb_table(
    data: dict[str, Any], out_dpath: str | Path, images_per_row: int = 8, max_rows: int = WANDB_MAX_ROWS
) -> Any:
    """The browser's cards as a ``wandb.Table``: one row per latent, ``images_per_row`` image columns.

    At most the first ``max_rows`` cards (highest MS), plus the steered ones: a table of all 65,536 latents
    of a paper-size SAE would upload a million images; the page in the run folder has them all."""
    import wandb

    out_dpath = Path(out_dpath)
    columns = ["latent", "ms", "freq", "group", "label", "depth_mean", "name", "steering"] + [
        f"top_{i}" for i in range(images_per_row)
    ]
    table = wandb.Table(columns=columns)
    for card in (c for i, c in enumerate(data["cards"]) if i < max_rows or c["steering"]):
        steer_text = " | ".join(
            f"{r['baseline']} -> {r['steered']}" for i in card["steering"] for r in data["steering"][i]["rows"][:2]
        )
        images = []
        for t in card["top"][:images_per_row]:
            if t["src"]:
                caption = f"{t['key']} ({t['label']}) act={t['act']:.3g}" if t["act"] is not None else t["key"]
                images.append(wandb.Image(card_overlay_image(out_dpath / t["src"], t["heat"]), caption=caption))
            else:
                images.append(None)
        images += [None] * (images_per_row - len(images))
        table.add_data(*(card[c] for c in columns[:7]), steer_text, *images)  # columns[7] is "steering"
    return table


def log_to_wandb(
    data: dict[str, Any], out_dpath: str | Path, logger: LoggerSchema | Mapping[str, Any], config: dict[str, Any]
) -> str:
    """Log the cards table to W&B; returns the run dir. ``logger``: the job's logger node (a mapping takes
    :class:`~vlmsae.config.nodes.LoggerSchema`'s defaults for the keys it lacks). The mode is ``$WANDB_MODE``
    if set (as for training: ``WANDB_MODE=disabled`` always wins), else ``logger.mode`` (online | offline |
    disabled)."""
    from vlmsae.report.job_log import init_wandb

    if not isinstance(logger, LoggerSchema):
        logger = LoggerSchema(**logger)
    run = init_wandb(logger, os.environ.get("WANDB_MODE") or logger.mode, "browse", Path(out_dpath), config, {})
    try:
        run.log({"feature_browser": wandb_table(data, out_dpath)})
        return str(getattr(run, "dir", "") or "")
    finally:
        run.finish()


def cards_summary(data: dict[str, Any]) -> dict[str, Any]:
    """A few numbers about a built page (for logs and ``run()``'s return value)."""
    cards = data["cards"]
    return {
        "n_cards": len(cards),
        "n_latents": data["n_latents"],
        "n_images": sum(len(c["top"]) for c in cards),
        "n_thumbnails": len({t["image"] for c in cards for t in c["top"] if t["src"]}),
        "n_chunks": 0 if data["inline"] else data["n_chunks"],
        "n_heatmaps": sum(1 for c in cards for t in c["top"] if t["heat"]),
        "n_labelled": sum(1 for c in cards if c["label"]),
        "n_steering": len(data["steering"]),
        "heatmap_note": data["heatmap_note"],
    }
