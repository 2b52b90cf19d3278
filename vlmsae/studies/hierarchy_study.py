"""The taxonomy-alignment study of one SAE (METHOD §4): what ``vlmsae.hierarchy`` runs.

Each latent's top images (computed here as the MS study encodes them, or read from a finished MS run) and
each image's taxon path give the LCA depths (:mod:`vlmsae.metrics.hierarchy`), the per-group table and each
latent's majority taxa.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmsae.config.nodes import DataSchema, TaxonomySchema
from vlmsae.data.concepts import ensure_concept_images
from vlmsae.data.image_set import ImageSet
from vlmsae.data.images import SkipLog, synthetic_options_of
from vlmsae.data.taxonomy import Taxonomy, encode_paths, load_taxonomy
from vlmsae.formats import LATENTS_CSV, RUN_INFO_JSON, TOP_IMAGES_DIR, HierarchySummary, read_latents_csv, read_run_info
from vlmsae.metrics import hierarchy as H
from vlmsae.metrics.monosemanticity import monosemanticity_scores
from vlmsae.metrics.topimages import TopImages
from vlmsae.models.embedders import EmbedderSpec
from vlmsae.models.open_sae import TappedSAE
from vlmsae.studies.codes import encode_images, top_images_meta
from vlmsae.studies.embedding_cache import CachedEmbedder
from vlmsae.utils.io import atomic_write_text

log = logging.getLogger(__name__)

# METHOD §4, the paper's Table 2 (Matryoshka x2 on CLIP ViT-L/14 embeddings, iNat 2021, groups 0..4)
PAPER_TABLE2 = {"depth": [3.33, 2.92, 3.85, 3.86, 4.06], "ms_mean": [0.67, 0.68, 0.70, 0.73, 0.74]}


# ----------------------------------------------------------------------------------------------
# Inputs: the taxonomy, the top-images index and MS per latent
# ----------------------------------------------------------------------------------------------


def taxonomy_data(data: DataSchema, ms_run: str | Path | None) -> dict:
    """The ``data`` node whose images the taxonomy must cover, as a mapping: the job's ``data``, or with
    ``ms_run`` and no ``data.root`` the images the MS run ranked (as its run_info.json records them)."""
    info_fpath = Path(ms_run or "") / RUN_INFO_JSON
    if ms_run and not data.root and info_fpath.is_file():
        recorded = read_run_info(info_fpath).config.get("data")
        if isinstance(recorded, dict) and recorded.get("source"):
            return recorded
    return dataclasses.asdict(data)


def open_taxonomy(taxonomy: TaxonomySchema, data: Mapping[str, Any]) -> Taxonomy:
    """Load the taxonomy of a ``taxonomy`` node; folder kinds read ``data``'s root (or the generated concept
    images of ``data=tiny``, whose concepts.json names the classes) when ``taxonomy.path`` is not set."""
    concept_root = None
    if data.get("source") == "synthetic":
        concept_root = str(ensure_concept_images(root=data.get("root"), **synthetic_options_of(data)))
    return load_taxonomy(
        taxonomy.kind,
        taxonomy.path,
        key_column=taxonomy.key_column,
        ranks=taxonomy.ranks,
        wordnet_dpath=taxonomy.wordnet_dpath,
        data_root=data.get("root") or concept_root,
    )


def _class_name(classes: list[str], label: Any, default: Any) -> Any:
    """The class name of an integer image label, else ``default``."""
    return classes[label] if isinstance(label, int) and 0 <= label < len(classes) else default


def check_images_have_taxa(taxonomy: Taxonomy, images: ImageSet) -> list[str]:
    """Match every listed image to a taxon now, not after an hour of encoding (a :class:`TaxonomyError`
    names examples); returns the class names of the listing ([] for a stream, which cannot be listed)."""
    if not images.listable:
        return []
    listing = images.listing()
    classes = list(listing.classes)
    items = images.items(listing)
    names = [_class_name(classes, lab, None) for _, _, lab in items]
    taxonomy.match([k for k, _, _ in items], [p for _, p, _ in items], names)
    return classes


def load_ms_run(ms_run: str | Path, n_latents: int) -> tuple[TopImages, torch.Tensor | None]:
    """(TopImages, MS [K] or None) from a finished ``python -m vlmsae.monosemanticity`` run."""
    ms_dpath = Path(ms_run)
    if not (ms_dpath / TOP_IMAGES_DIR).is_dir():
        raise FileNotFoundError(
            f"ms_run={ms_dpath} has no top_images/ folder: point it at a run dir of `python -m vlmsae.monosemanticity`."
        )
    top = TopImages.load(ms_dpath / TOP_IMAGES_DIR)
    if top.n_latents != n_latents:
        raise ValueError(
            f"ms_run={ms_dpath} ranks {top.n_latents} latents but the SAE at sae_path has {n_latents}: "
            "use the MS run made with this SAE."
        )
    ms_fpath = ms_dpath / LATENTS_CSV
    ms_K = read_latents_csv(ms_fpath).ms_K(n_latents) if ms_fpath.is_file() else None
    if ms_K is None:
        log.warning("%s not found: the table will have no MS columns", ms_fpath)
    return top, ms_K


def compute_top_images(
    src: TappedSAE,
    images: ImageSet,
    embedder_spec: EmbedderSpec | None,
    *,
    top_k: int,
    batch_size: int,
    sae_path: str | Path,
    embed_memo: dict[str, torch.Tensor] | None = None,
) -> tuple[TopImages, torch.Tensor | None, int]:
    """Run the SAE's source model and the SAE over the images in one pass, encoded as the monosemanticity study
    encodes them (:func:`vlmsae.studies.codes.encode_images`), so the top images equal an MS run's on the same
    images. Returns the top-``top_k`` index, the MS per latent from the embedder's image embeddings (None without
    an embedder) and the number of images embedded (``embed_memo``: embeddings shared by the SAEs of a sweep)."""
    skip_log = SkipLog()
    embed = None if embedder_spec is None else CachedEmbedder(embedder_spec, None, images.where(), memo=embed_memo)
    encoded = encode_images(src, images.records(skip_log), batch_size, on_batch=embed, desc="hierarchy: encode images")
    if not encoded.keys:
        raise ValueError(
            f"No readable image in data.source={images.source} data.root={images.root} ({len(skip_log)} skipped)."
        )
    top = encoded.top_images(
        top_k, top_images_meta(src, images, sae_path, skipped=skip_log.to_list(), written_by="vlmsae.hierarchy")
    )
    if embed is None:
        return top, None, 0
    return top, monosemanticity_scores(encoded.codes_NF, torch.cat(embed.rows)).double(), embed.n_embedded


# ----------------------------------------------------------------------------------------------
# Scores and outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class HierarchyStudy:
    """The per-group table (hierarchy.json) and the per-latent rows (latent_taxa.csv) of one run."""

    summary: HierarchySummary  # .taxonomy: where the taxonomy came from (Taxonomy.origin)
    latent_rows: list[dict]  # latent_taxa.csv rows (latent_taxa_rows)


def score_hierarchy(
    top: TopImages,
    ms_K: torch.Tensor | None,
    taxonomy: Taxonomy,
    classes: list[str],
    sae,
    *,
    n_top: int,
    min_majority: float,
    sae_path: str | Path,
    ms_run: str | Path | None = None,
) -> HierarchyStudy:
    """LCA depths of every latent's top-``n_top`` images in ``taxonomy``, per Matryoshka group of ``sae``.

    classes: names of integer image labels (a listed folder's classes), so the taxonomy can match a
    label by name; ``min_majority``: see :func:`latent_taxa_rows`; ``sae_path``, ``ms_run``: recorded.
    """
    group_K = sae.group_of_latent.cpu()
    labels = [_class_name(classes, lab, lab) for lab in (top.labels or [None] * len(top.keys))]
    codes_NO, names = encode_paths(taxonomy.match(top.keys, top.paths, labels), taxonomy.n_ranks)
    depths = H.lca_depths(top.image_idx, top.acts, codes_NO, n_top=n_top)
    groups = H.group_table(depths, group_K, ms_K, n_groups=len(sae.group_sizes))
    code_KO, frac_KO, _ = H.majority_taxa(top.image_idx, top.acts, codes_NO, n_top=n_top)
    rows = latent_taxa_rows(depths, group_K, code_KO, frac_KO, names, taxonomy.ranks, min_majority)
    summary = HierarchySummary(
        groups=groups,
        group_sizes=list(sae.group_sizes),
        n_latents=sae.n_latents,
        n_scored=int(depths.valid_K.sum()),
        n_images=len(top.keys),
        n_top=n_top,
        ranks=list(taxonomy.ranks),
        taxonomy=taxonomy.origin,
        sae_path=str(sae_path),
        ms_run=None if ms_run is None else str(ms_run),
        paper_table2=PAPER_TABLE2,
    )
    return HierarchyStudy(summary=summary, latent_rows=rows)


def latent_taxa_rows(depths, group_K, code_KO, frac_KO, names, ranks, min_majority: float) -> list[dict]:
    """One row per latent for latent_taxa.csv (the columns the feature browser reads); ``label`` is the
    deepest rank whose majority taxon holds more than ``min_majority`` of the latent's top images."""
    deepest_K = H.deepest_majority_rank(code_KO, frac_KO, min_majority)
    rows = []
    for k in range(code_KO.shape[0]):
        row: dict[str, Any] = {"latent": k, "group": int(group_K[k])}
        valid = bool(depths.valid_K[k])
        row["depth_mean"] = f"{float(depths.depth_mean_K[k]):.4f}" if valid else ""
        row["depth_mode"] = int(depths.depth_mode_K[k]) if valid else ""
        row.update({rank: names[r][int(code_KO[k, r])] for r, rank in enumerate(ranks)})
        d = int(deepest_K[k])
        row["label"] = f"{names[d][int(code_KO[k, d])]} ({ranks[d]})" if d >= 0 else ""
        rows.append(row)
    return rows


def write_latent_taxa_csv(fpath: Path, rows: list[dict], ranks: list[str]) -> None:
    """latent_taxa.csv: latent, group, depth_mean, depth_mode, one column per rank, label."""
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=["latent", "group", "depth_mean", "depth_mode", *ranks, "label"], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(fpath, buf.getvalue())


def hierarchy_markdown(summary: HierarchySummary) -> str:
    """hierarchy.md: the paper's Table 2 layout for this SAE, with the paper's rows when the group count matches."""
    groups, ranks, n_top = summary.groups, summary.ranks, summary.n_top
    paper = {"paper depth": PAPER_TABLE2["depth"], "paper MS mean": PAPER_TABLE2["ms_mean"]}
    reference = paper if len(groups) == len(PAPER_TABLE2["depth"]) else None
    return (
        f"# Taxonomy alignment of Matryoshka levels\n\nSAE: `{summary.sae_path}`  \nTaxonomy: {summary.taxonomy} "
        f"(ranks: {', '.join(ranks)})  \nImages: {summary.n_images}; top-{n_top} per latent; "
        f"{summary.n_scored} of {summary.n_latents} latents have {n_top} firing images and are scored.\n\n"
        + H.table_markdown(groups, reference)
        + "\nLCA depth = length of the shared taxon path of a pair of top images (0 = different "
        f"{ranks[0]}, {len(ranks)} = same {ranks[-1]}), mean over the "
        f"{n_top * (n_top - 1) // 2} pairs of a latent, then over the latents of a group.\n"
    )
