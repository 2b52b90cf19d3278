"""Taxonomy alignment of Matryoshka levels (SPEC 4): does a deeper group hold finer taxa?

    python -m vlmsae.hierarchy sae_path=<checkpoint dir> data=folder data.root=<images> \
        taxonomy=<inat_dirnames|inat_json|wordnet|csv>
    python -m vlmsae.hierarchy sae_path=<ckpt> ms_run=<monosemanticity run dir> taxonomy=inat_dirnames \
        taxonomy.path=<iNat root>      # reuse a finished MS run's top_images/ and latents.csv

Steps: the top-16 images of every latent (computed here by running the SAE's source model and the
SAE over the images, or read from an MS run), each image's taxon path, the LCA depth of all 120
pairs per latent (vlmsae.metrics.hierarchy), averaged per Matryoshka group, beside the group's MS.

Outputs in the run dir: ``hierarchy.json`` (``groups``: one object per group), ``hierarchy.md``
(the paper's Table 2 layout, with the paper's numbers for comparison), ``hierarchy.png`` (depth
against level), ``latent_taxa.csv`` (per latent: depth mean / mode, the majority taxon at each rank,
and ``label`` = the deepest rank with a clear majority, which the feature browser shows),
``top_images/`` (when computed here) and ``run_info.json``.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vlmsae.config import conf_dir, register_configs

log = logging.getLogger(__name__)

# SPEC 4, the paper's Table 2 (Matryoshka x2 on CLIP ViT-L/14 embeddings, iNat 2021, groups 0..4)
PAPER_TABLE2 = {"depth": [3.33, 2.92, 3.85, 3.86, 4.06], "ms_mean": [0.67, 0.68, 0.70, 0.73, 0.74]}


def _node(cfg: DictConfig, key: str) -> dict:
    value = cfg.get(key)
    return OmegaConf.to_container(value, resolve=True) if value is not None else {}


# ----------------------------------------------------------------------------------------------
# Inputs: the top-images index and MS per latent
# ----------------------------------------------------------------------------------------------


def load_ms_run(ms_run: str | Path, n_latents: int):
    """(TopImages, MS [K] or None) from a finished ``python -m vlmsae.monosemanticity`` run."""
    from vlmsae.formats import LATENTS_CSV, TOP_IMAGES_DIR, read_latents_csv
    from vlmsae.metrics.topimages import TopImages

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


def _synthetic_opts(data: dict) -> dict | None:
    """Options of the generated concept images for ``data.source=synthetic`` (as the MS job reads them)."""
    from vlmsae.data.images import synthetic_options

    return synthetic_options(data.get("source"), data.get("extra"), data.get("seed", 0))


def compute_top_images(cfg: DictConfig, sae, source: dict[str, Any], out_dpath: Path, data: dict):
    """Run the SAE's source model and the SAE over the images, in one pass.

    The model, layer and token pooling are resolved by :func:`vlmsae.metrics.codes.open_sae_source`
    and the images encoded by :func:`vlmsae.metrics.codes.encode_images`, as ``vlmsae.monosemanticity``
    does, so the top images here equal those of an MS run on the same images.
    Returns the top-images index (also saved to ``out_dpath/top_images``), the per-image codes
    (sparse [N, K]) and the image embeddings of ``cfg.embedder`` for MS (None without one).
    """
    from vlmsae.data.images import SkipLog, iter_images
    from vlmsae.metrics.codes import encode_images, open_sae_source
    from vlmsae.models import ModelSpec

    if data.get("source") not in ("folder", "list", "wds", "synthetic"):
        raise ValueError(f"hierarchy reads images: data.source={data.get('source')!r} must be folder, list, wds or "
                         "synthetic (or pass ms_run=<monosemanticity run dir> to reuse its top images).")
    model = ModelSpec.from_cfg(cfg.model) if cfg.get("model") is not None else None
    src = open_sae_source(sae, source, model=model, layer=cfg.get("layer"), pool=cfg.get("pool"),
                          device=cfg.get("device"), sae_dpath=cfg.sae_path)
    embedder = None
    if cfg.get("embedder") is not None:
        from vlmsae.models.embedders import load_embedder

        embedder = load_embedder(_node(cfg, "embedder"))
    skip_log = SkipLog()
    records = iter_images(data["source"], data.get("root"), max_images=data.get("max_images"), skip_log=skip_log,
                          synthetic=_synthetic_opts(data))
    emb_chunks: list[torch.Tensor] = []

    def embed(batch: list) -> None:
        emb_chunks.append(embedder.embed([r.image for r in batch]).float().cpu())

    batch_size = int(cfg.get("batch_size") or data.get("batch_size") or 32)
    images = encode_images(src, records, batch_size, on_batch=embed if embedder is not None else None,
                           desc="hierarchy: encode images")
    if not images.keys:
        raise ValueError(f"No readable image in data.source={data['source']} data.root={data.get('root')} "
                         f"({len(skip_log)} skipped).")
    top = images.top_images(int(cfg.top_k), meta={
        "what": "top-activating images of SAE latents", "sae_path": str(cfg.sae_path), "model": src.spec.name,
        "layer": src.layer, "pool": src.pool, "data_source": data["source"], "data_root": str(data.get("root")),
        "skipped": skip_log.to_list(), "written_by": "vlmsae.hierarchy",
    })
    top.save(out_dpath / "top_images")
    return top, images.codes_NF, torch.cat(emb_chunks) if emb_chunks else None


def compute_ms(codes_NK: torch.Tensor, embeddings_NE: torch.Tensor | None) -> torch.Tensor | None:
    """MS per latent (SPEC 3) from the images' codes and embeddings; None without an embedder."""
    if embeddings_NE is None:
        return None
    from vlmsae.metrics import monosemanticity_scores

    return monosemanticity_scores(codes_NK, embeddings_NE).double()


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def latent_taxa_rows(depths, group_K, code_KR, frac_KR, names, ranks, min_majority: float) -> list[dict]:
    """One row per latent for latent_taxa.csv (the columns the feature browser reads)."""
    from vlmsae.metrics.hierarchy import deepest_majority_rank

    deepest_K = deepest_majority_rank(code_KR, frac_KR, min_majority)
    rows = []
    for k in range(code_KR.shape[0]):
        row: dict[str, Any] = {"latent": k, "group": int(group_K[k])}
        valid = bool(depths.valid_K[k])
        row["depth_mean"] = f"{float(depths.depth_mean_K[k]):.4f}" if valid else ""
        row["depth_mode"] = int(depths.depth_mode_K[k]) if valid else ""
        for r, rank in enumerate(ranks):
            row[rank] = names[r][int(code_KR[k, r])]
        d = int(deepest_K[k])
        row["label"] = f"{names[d][int(code_KR[k, d])]} ({ranks[d]})" if d >= 0 else ""
        rows.append(row)
    return rows


def write_csv(fpath: Path, rows: list[dict], fieldnames: list[str]) -> None:
    from vlmsae.utils.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(fpath, buf.getvalue())


def plot_depth(groups: list[dict], fpath: Path, title: str) -> None:
    """Mean LCA depth (+- std over latents) against Matryoshka level, and the paper's values when 5 groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmsae.utils.io import atomic_write

    g = [r["group"] for r in groups if r["depth_mean"] is not None]
    d = [r["depth_mean"] for r in groups if r["depth_mean"] is not None]
    s = [r["depth_std"] or 0.0 for r in groups if r["depth_mean"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(g, d, yerr=s, marker="o", capsize=3, label="this SAE (mean +- std over latents)")
    if len(groups) == len(PAPER_TABLE2["depth"]):
        ax.plot(range(len(groups)), PAPER_TABLE2["depth"], "s--", color="grey", label="paper, Table 2")
    ax.set_xlabel("Matryoshka group (level)")
    ax.set_ylabel("mean LCA depth of top-16 pairs")
    ax.set_xticks([r["group"] for r in groups])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(fpath, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    """Score every latent's top images against the taxonomy and write the per-group table."""
    from vlmsae import formats
    from vlmsae.data.taxonomy import encode_paths, load_taxonomy
    from vlmsae.metrics import hierarchy as H
    from vlmsae.formats import read_sae_config
    from vlmsae.sae import load_sae
    from vlmsae.utils.io import atomic_write_text
    from vlmsae.utils.paths import run_dir
    from vlmsae.utils.provenance import write_run_info

    out_dpath = run_dir(out_dpath)
    if cfg.get("sae_path") is None:
        raise ValueError("sae_path is required: the checkpoint folder of a trained SAE (<run>/sae with config.json).")
    sae_info = read_sae_config(cfg.sae_path)
    sae = load_sae(cfg.sae_path)
    group_K = sae.group_of_latent.cpu()
    if sae_info.arch != "matryoshka":
        log.warning("sae_path holds a %s SAE: one group only (the study is meant for Matryoshka SAEs)",
                    sae_info.arch)
    data = _node(cfg, "data")
    if cfg.get("ms_run") and not data.get("root"):
        data = _ms_run_data(cfg.ms_run) or data  # the images the MS run ranked
    # The taxonomy first: a missing WordNet or a bad CSV fails before any image is encoded.
    tax_cfg = _node(cfg, "taxonomy")
    taxonomy = load_taxonomy(
        tax_cfg["kind"], tax_cfg.get("path"), key_column=tax_cfg.get("key_column"), ranks=tax_cfg.get("ranks"),
        wordnet_dpath=tax_cfg.get("wordnet_dpath"), data_root=data.get("root") or _concept_root(data),
    )
    classes: list[str] = []
    if cfg.get("ms_run"):
        top, ms_K = load_ms_run(cfg.ms_run, sae.n_latents)
    else:
        if data.get("source") in ("folder", "list", "synthetic"):
            # every listed image must have a taxon: say so now, not after an hour of encoding
            from vlmsae.data.images import list_source

            listing = list_source(data["source"], data.get("root"), synthetic=_synthetic_opts(data))
            classes = listing.classes
            items = listing.items if data.get("max_images") is None else listing.items[: int(data["max_images"])]
            names = [classes[lab] if isinstance(lab, int) and 0 <= lab < len(classes) else None for _, _, lab in items]
            taxonomy.match([k for k, _, _ in items], [p for _, p, _ in items], names)
        top, codes, embeddings = compute_top_images(cfg, sae, sae_info.source, out_dpath, data)
        ms_K = compute_ms(codes, embeddings)

    # integer labels are class indices: give the taxonomy the class name when it is known
    labels = [classes[lab] if classes and isinstance(lab, int) and 0 <= lab < len(classes) else lab
              for lab in (top.labels or [None] * len(top.keys))]
    image_paths = taxonomy.match(top.keys, top.paths, labels)
    codes_NR, names = encode_paths(image_paths, taxonomy.n_ranks)

    n_top = int(cfg.get("n_top", H.N_TOP))
    depths = H.lca_depths(top.image_idx, top.acts, codes_NR, n_top=n_top)
    groups = H.group_table(depths, group_K, ms_K, n_groups=len(sae.group_sizes))
    code_KR, frac_KR, _ = H.majority_taxa(top.image_idx, top.acts, codes_NR, n_top=n_top)
    rows = latent_taxa_rows(depths, group_K, code_KR, frac_KR, names, taxonomy.ranks,
                            float(cfg.get("min_majority", 0.5)))

    write_csv(out_dpath / "latent_taxa.csv", rows,
              ["latent", "group", "depth_mean", "depth_mode", *taxonomy.ranks, "label"])
    summary = formats.HierarchySummary(
        groups=groups,
        group_sizes=list(sae.group_sizes),
        n_latents=sae.n_latents,
        n_scored=int(depths.valid_K.sum()),
        n_images=len(top.keys),
        n_top=n_top,
        ranks=list(taxonomy.ranks),
        taxonomy=taxonomy.source,
        sae_path=str(cfg.sae_path),
        ms_run=cfg.get("ms_run"),
        paper_table2=PAPER_TABLE2,
    )
    formats.write_hierarchy(out_dpath, summary)
    reference = ({"paper depth": PAPER_TABLE2["depth"], "paper MS mean": PAPER_TABLE2["ms_mean"]}
                 if len(groups) == len(PAPER_TABLE2["depth"]) else None)
    md = (f"# Taxonomy alignment of Matryoshka levels\n\nSAE: `{cfg.sae_path}`  \nTaxonomy: {taxonomy.source} "
          f"(ranks: {', '.join(taxonomy.ranks)})  \nImages: {len(top.keys)}; top-{n_top} per latent; "
          f"{summary.n_scored} of {sae.n_latents} latents have {n_top} firing images and are scored.\n\n"
          + H.table_markdown(groups, reference)
          + "\nLCA depth = length of the shared taxon path of a pair of top images (0 = different "
            f"{taxonomy.ranks[0]}, {taxonomy.n_ranks} = same {taxonomy.ranks[-1]}), mean over the "
            f"{n_top * (n_top - 1) // 2} pairs of a latent, then over the latents of a group.\n")
    atomic_write_text(out_dpath / "hierarchy.md", md)
    plot_depth(groups, out_dpath / "hierarchy.png", f"{Path(str(cfg.sae_path)).name}: {taxonomy.source}"[:90])
    write_run_info(out_dpath, OmegaConf.to_container(cfg, resolve=True), outputs=[
        formats.HIERARCHY_JSON, "hierarchy.md", "hierarchy.png", "latent_taxa.csv"])
    for r in groups:
        log.info("group %d: %d/%d latents scored, depth %s, MS %s", r["group"], r["n_scored"], r["n_latents"],
                 r["depth_mean"], r["ms_mean"])
    log.info("hierarchy outputs in %s", out_dpath)
    return {**summary.to_dict(), "out_dpath": str(out_dpath)}


def _ms_run_data(ms_run: str | Path) -> dict | None:
    """The ``data`` node an MS run was made with (its run_info.json), to find the taxonomy's images."""
    from vlmsae.formats import RUN_INFO_JSON, read_run_info

    info_fpath = Path(ms_run) / RUN_INFO_JSON
    if not info_fpath.is_file():
        return None
    data = read_run_info(info_fpath).config.get("data")
    return data if isinstance(data, dict) and data.get("source") else None


def _concept_root(data: dict) -> str | None:
    """The generated concept-image folder of ``data=tiny`` (its concepts.json names the classes)."""
    if data.get("source") != "synthetic":
        return None
    from vlmsae.data.concepts import ensure_concept_images

    return str(ensure_concept_images(root=data.get("root"), **_synthetic_opts(data)))


def _main(cfg: DictConfig) -> None:
    out = run(cfg)
    print((Path(out["out_dpath"]) / "hierarchy.md").read_text())
    print(f"outputs: {out['out_dpath']} (hierarchy.json, hierarchy.md, hierarchy.png, latent_taxa.csv)")


def main() -> None:
    register_configs()
    hydra.main(config_path=str(conf_dir()), config_name="hierarchy", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
