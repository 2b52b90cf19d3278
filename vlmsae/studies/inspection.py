"""Ask an SAE about one's own images: which latents fire, how strongly, and on which patches.

Per image (:func:`inspect_image`): reconstruction of its tokens, latents pooled as the MS study pools them and
each latent's peak over the patches with its per-patch heatmap (row-major; an SAE on the CLS token or the
projected embedding has no heatmap and its peak is the pooled value); the top latents ranked by both.
:func:`compare_images` contrasts two images, :func:`query_latents` ranks latents by the cosine of their concept
(as names computes it) with a text, and :func:`open_ms_run` adds what an MS run of the same SAE says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmsae.config import to_typed
from vlmsae.data.images import IMAGE_EXTENSIONS, list_file, list_folder, load_image
from vlmsae.formats import (
    LATENTS_CSV,
    RUN_INFO_JSON,
    TOP_IMAGES_DIR,
    InspectResult,
    LatentsTable,
    read_latents_csv,
    read_run_info,
)
from vlmsae.metrics.pooling import pool_rows, pool_sparse
from vlmsae.metrics.reconstruction import fve, normalized_mse
from vlmsae.metrics.topimages import TopImages
from vlmsae.models import embedders
from vlmsae.models.open_sae import TappedSAE
from vlmsae.steering.score import unit
from vlmsae.studies.naming import (
    DEFAULT_TEMPLATES,
    concepts_from_embeddings,
    ms_run_embedder,
    name_embeddings,
    text_side,
)

_IMAGES_FIX = "pass images=<an image file | a folder of images | a .txt list of image paths | [a.jpg, b.png]>"


# ---------------------------------------------------------------------------------------------- the images
def list_images(images: str | Path | Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(key, path)`` of every image ``images=`` names: an image file, a folder (ImageFolder tree or flat), a
    text file listing image paths (``.txt`` / ``.tsv`` / ``.list``), or a list of any of these."""
    if isinstance(images, (list, tuple)):
        out = [item for entry in images for item in list_images(entry)]
        if not out:
            raise ValueError(f"images={list(images)} names no image: {_IMAGES_FIX}.")
        return out
    path = Path(str(images)).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() in (".txt", ".tsv", ".list")):
        return [(key, p) for key, p, _ in (list_folder(path) if path.is_dir() else list_file(path)).items]
    if path.is_file():
        return [(path.name, str(path))]
    raise FileNotFoundError(f"images={images}: {path} is neither a file nor a folder; {_IMAGES_FIX}.")


def open_image(path: str | Path) -> Any:
    """The RGB image at ``path`` (as extraction decodes it); a file that is not an image is refused by name."""
    try:
        return load_image(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"images=: {path} does not exist; {_IMAGES_FIX}.") from None
    except (OSError, ValueError, SyntaxError) as err:
        kinds = ", ".join(IMAGE_EXTENSIONS)
        raise ValueError(
            f"images=: {path} is not an image vlmsae can read ({type(err).__name__}: {err}). Pass image files "
            f"({kinds}), a folder of them, or a .txt file listing their paths."
        ) from None


# ---------------------------------------------------------------------------------------------- one image
@dataclass
class LatentHit:
    """One latent on one image: pooled activation, peak patch activation and where it peaks."""

    latent: int
    pooled: float
    peak: float
    peak_patch: int  # row-major patch index of the peak; -1 without patch rows or when it fires on none
    heat_P: torch.Tensor  # [P] activation on every patch (empty without patch rows)

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("latent", "pooled", "peak", "peak_patch")}
        return {**out, "heat": [float(f"{v:.{digits}g}") for v in self.heat_P.tolist()]}


@dataclass
class ImageInspection:
    """What the SAE sees in one image. ``codes_RF``: the sparse codes of the rows the SAE read (the patch tokens,
    row-major, for ``pool=mean|max``; one row for ``cls`` / ``last``); ``pooled_F``: dense pooled codes."""

    key: str
    path: str | None
    fve: float  # fraction of variance of the image's token rows explained (NaN for a single row)
    nmse: float  # sum ||x - x_hat||^2 / sum ||x||^2 over the same rows
    codes_RF: torch.Tensor
    pooled_F: torch.Tensor
    grid: int | None  # side of the square patch grid, None without patch rows
    top_pooled: list[LatentHit] = field(default_factory=list)
    top_peak: list[LatentHit] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return int(self.codes_RF.shape[0])

    def hit(self, latent: int) -> LatentHit:
        """The latent's pooled and peak activation on this image, with its heatmap."""
        column_R = self.codes_RF.index_select(1, torch.tensor([latent])).to_dense()[:, 0]
        pooled = float(self.pooled_F[latent])
        if self.grid is None:
            return LatentHit(latent, pooled, pooled, -1, torch.zeros(0))
        peak, where = column_R.max(0)
        where = int(where) if float(peak) > 0 else -1  # a latent silent on every patch peaks nowhere
        return LatentHit(latent, pooled, float(peak), where, column_R.clone())

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("key", "path", "fve", "nmse", "n_rows", "grid")}
        return {**out, **{k: [h.to_dict() for h in getattr(self, k)] for k in ("top_pooled", "top_peak")}}


def _top(values_F: torch.Tensor, n: int) -> list[int]:
    """Latents with the ``n`` largest positive values, largest first (a latent that never fired is no hit)."""
    n = min(n, int((values_F > 0).sum()))
    return values_F.topk(n).indices.tolist() if n > 0 else []


@torch.no_grad()
def inspect_image(
    src: TappedSAE, image: Any, top_n: int = 8, key: str = "", path: str | None = None
) -> ImageInspection:
    """One image through ``src``'s tap and SAE: reconstruction, pooled and peak top latents with heatmaps."""
    if top_n < 1:
        raise ValueError(f"top_n={top_n}: show at least 1 latent per image.")
    sae, tap = src.sae, src.tap
    acts = tap.forward_to(tap.preprocess(image)[None], src.layer)
    rows_RD, per_image = pool_rows(acts, src.pool, tap.has_cls)
    x_RD = rows_RD.to(sae.W_dec.device, torch.float32)
    codes_RF = sae.encode(x_RD, sparse=True)
    x_hat_RD = sae.decode(codes_RF)
    codes_RF = codes_RF.cpu().coalesce()
    pooled_F = pool_sparse(codes_RF, per_image, src.pool, 1).to_dense()[0]
    side = math.isqrt(per_image)
    grid = side if per_image > 1 and side * side == per_image else None  # the square patch grid, if any
    peak_F = codes_RF.to_dense().amax(0) if grid is not None else pooled_F
    out = ImageInspection(
        key=key,
        path=path,
        fve=fve(x_RD, x_hat_RD) if x_RD.shape[0] > 1 else math.nan,
        nmse=normalized_mse(x_RD, x_hat_RD),
        codes_RF=codes_RF,
        pooled_F=pooled_F,
        grid=grid,
    )
    out.top_pooled = [out.hit(j) for j in _top(pooled_F, top_n)]
    out.top_peak = [out.hit(j) for j in _top(peak_F, top_n)]
    return out


def compare_images(a: ImageInspection, b: ImageInspection, top_n: int = 8) -> dict[str, Any]:
    """The latents whose pooled activation differs most between two images: ``a_over_b`` (stronger on ``a``)
    and ``b_over_a``, each ``top_n`` rows {latent, a, b, diff}, largest difference first."""
    diff_F = a.pooled_F - b.pooled_F

    def rows(sign: float) -> list[dict[str, Any]]:
        return [
            {"latent": j, "a": float(a.pooled_F[j]), "b": float(b.pooled_F[j]), "diff": float(diff_F[j])}
            for j in _top(sign * diff_F, top_n)
        ]

    return {"a": a.key, "b": b.key, "a_over_b": rows(1.0), "b_over_a": rows(-1.0)}


# ---------------------------------------------------------------------------------------------- the MS run
@dataclass
class MSRunView:
    """What a monosemanticity run says of each latent: its latents.csv rows and its top-images index."""

    dpath: Path
    table: LatentsTable
    top: TopImages

    def latent(self, latent: int, n_top: int = 8) -> dict[str, Any]:
        """Name, names, MS, frequency, Matryoshka group and the paths of the first ``n_top`` top images."""
        row = self.table.rows[latent] if latent < len(self.table.rows) else None
        if row is None or row.latent != latent:
            row = next((r for r in self.table.rows if r.latent == latent), None)
        paths = self.top.paths or []
        top = [paths[i] for i in self.top.image_idx[latent, :n_top].tolist() if 0 <= i < len(paths)]
        if row is None:
            return {"name": "", "names": [], "ms": None, "freq": None, "group": None, "top_paths": top}
        said = {"name": row.name or "", "names": list(row.names or ()), "ms": row.ms, "freq": row.freq}
        return {**said, "group": row.group, "top_paths": top}


def _same_sae(a: Any, b: Any) -> bool:
    if "://" in str(a) or "://" in str(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def open_ms_run(ms_run: str | Path, sae_path: str | Path, n_latents: int) -> MSRunView:
    """The monosemanticity run ``ms_run`` of the SAE at ``sae_path`` (``n_latents`` latents). A folder that is
    not an MS run, or the run of another SAE (its run_info.json names another sae_path, or its latent count
    differs), is refused with the path and the fix."""
    dpath = Path(ms_run).expanduser()
    if not (dpath / LATENTS_CSV).is_file() or not (dpath / TOP_IMAGES_DIR).is_dir():
        raise FileNotFoundError(
            f"ms_run={ms_run}: {dpath} holds no latents.csv + top_images/. Pass the output folder of "
            f"`python -m vlmsae.monosemanticity sae_path={sae_path} ...`, or drop ms_run=."
        )
    config = (read_run_info(dpath).config or {}) if (dpath / RUN_INFO_JSON).is_file() else {}
    run_sae = config.get("sae_path")
    top = TopImages.load(dpath / TOP_IMAGES_DIR)
    if (run_sae and not _same_sae(run_sae, sae_path)) or top.n_latents != n_latents:
        said = f"sae_path={run_sae}" if run_sae else "an unnamed SAE"
        raise ValueError(
            f"ms_run={ms_run} is a monosemanticity run of {said} with {top.n_latents} latents, not of "
            f"sae_path={sae_path} ({n_latents} latents): its names, MS and top images would describe other "
            f"latents. Pass the MS run of this SAE (python -m vlmsae.monosemanticity sae_path={sae_path} ...), or "
            "drop ms_run=."
        )
    return MSRunView(dpath, read_latents_csv(dpath), top)


# ---------------------------------------------------------------------------------------------- query
def latent_concepts(
    top: TopImages, embed_images: Callable[[list[Any]], torch.Tensor], batch_size: int = 64
) -> torch.Tensor:
    """[K, E] concept of every latent (NaN rows for latents without top images): each distinct top image of the
    index decoded and embedded once, ``batch_size`` at a time, then unit-averaged per latent as names does."""
    if top.paths is None:
        raise ValueError(
            "query= needs the MS run's top images as files, but its top_images/images.json has no paths: rerun the "
            "monosemanticity job on data=folder or data=list."
        )
    used = sorted({i for i in top.image_idx.flatten().tolist() if i >= 0})
    remap = torch.full((len(top.keys) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(used, dtype=torch.long)] = torch.arange(len(used))
    parts = []
    for i0 in range(0, len(used), batch_size):
        parts.append(embed_images([load_image(top.paths[i]) for i in used[i0 : i0 + batch_size]]).float().cpu())
    emb_NE = torch.cat(parts) if parts else torch.zeros(0, 1)
    idx_KX = remap[top.image_idx.clamp_min(-1)]  # -1 stays -1 (the last slot of remap)
    return concepts_from_embeddings(emb_NE, idx_KX)


def query_text_embedding(text: str, embed_text: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """[E] unit text embedding of ``text``, averaged over the names templates exactly as a vocabulary name is."""
    if not str(text).strip():
        raise ValueError("query= is empty: pass a text, e.g. query='a zebra', or drop it.")
    return name_embeddings([str(text)], DEFAULT_TEMPLATES, embed_text)[0]


def query_latents(concepts_KE: torch.Tensor, text_E: torch.Tensor, top_n: int = 8) -> list[tuple[int, float]]:
    """``(latent, cosine)`` of the ``top_n`` latents whose concept is closest to ``text_E``, best first (latents
    without a concept are skipped; ties keep the lower id)."""
    cos_K = concepts_KE.float() @ unit(text_E)
    order = torch.sort(cos_K.nan_to_num(-3.0), descending=True, stable=True).indices.tolist()
    return [(k, float(cos_K[k])) for k in order if not math.isnan(cos_K[k])][:top_n]


def query_ms_run(ms: MSRunView, text: str, embedder_cfg: Any = None, top_n: int = 8) -> list[tuple[int, float]]:
    """:func:`query_latents` of ``text`` against the concepts of ``ms``'s latents, embedded with ``embedder_cfg``
    (an embedder node; None = the MS run's own, as the names job does), which must have a text side."""
    spec = to_typed(ms_run_embedder(ms.dpath, embedder_cfg), embedders.EmbedderSpec)
    embedder = embedders.load_embedder(spec)  # looked up at call time (tests replace it)
    text_E = query_text_embedding(text, text_side(embedder, spec.name))
    return query_latents(latent_concepts(ms.top, embedder.embed), text_E, top_n)


# ---------------------------------------------------------------------------------------------- the result
def inspection_result(
    inspections: Sequence[ImageInspection],
    ms: MSRunView | None = None,
    query: tuple[str, list[tuple[int, float]]] | None = None,
    compare: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    strip: int = 8,
    group_K: torch.Tensor | None = None,
) -> InspectResult:
    """The :class:`~vlmsae.formats.InspectResult` of the inspected images: their hits, what ``ms`` says of every
    latent shown (``strip`` top images each) and its Matryoshka group (``group_K``, the SAE's
    ``group_of_latent``), the query's latents with their hit on every image, the comparison."""
    images = [insp.to_dict() for insp in inspections]
    shown = {h["latent"] for im in images for h in (*im["top_pooled"], *im["top_peak"])}
    query_out = None
    if query is not None:
        text, ranked = query
        hits = [
            {"latent": k, "score": score, "per_image": [insp.hit(k).to_dict() for insp in inspections]}
            for k, score in ranked
        ]
        shown |= {k for k, _ in ranked}
        query_out = {"text": text, "hits": hits}
    if compare is not None:
        shown |= {r["latent"] for key in ("a_over_b", "b_over_a") for r in compare[key]}
    latents = {str(k): ms.latent(k, strip) if ms is not None else {} for k in sorted(shown)}
    if group_K is not None:
        for k in shown:
            latents[str(k)]["group"] = int(group_K[k])
    return InspectResult(images, latents, query_out, compare, dict(settings or {}))
