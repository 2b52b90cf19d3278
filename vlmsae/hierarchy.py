"""Taxonomy alignment of Matryoshka levels (METHOD §4): does a deeper group hold finer taxa?

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

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from vlmsae import formats
from vlmsae.config import conf_dir, register_configs
from vlmsae.config.jobs.hierarchy import HierarchyJob
from vlmsae.data.image_set import ImageSet
from vlmsae.models.embedders import load_embedder
from vlmsae.models.open_sae import load_job_sae, open_sae_source
from vlmsae.report.job_log import log_job
from vlmsae.report.studies import write_hierarchy_outputs
from vlmsae.report.tables import hierarchy_table
from vlmsae.studies import hierarchy_study as study
from vlmsae.studies import sweep
from vlmsae.studies.sweep import sweep_paths
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info

log = logging.getLogger(__name__)


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    """Score every latent's top images against the taxonomy and write the per-group table.

    ``cfg``: conf/hierarchy.yaml (keys: :class:`vlmsae.config.jobs.hierarchy.HierarchyJob`).
    """
    out_dpath = run_dir(out_dpath)
    if OmegaConf.is_missing(cfg, "sae_path"):
        raise ValueError("sae_path is required: an SAE folder (<run>/sae, a published SAE's folder or hf://org/repo).")
    if (paths := sweep_paths(str(cfg.sae_path))) is not None:  # a sweep folder or a comma list
        return _run_sweep(cfg, out_dpath, paths)
    job: HierarchyJob = OmegaConf.to_object(cfg)
    sae = load_job_sae(job.sae_path, job.sae_format)
    if sae.arch != "matryoshka":
        log.warning("sae_path holds a %s SAE: one group only (the study is meant for Matryoshka SAEs)", sae.arch)
    data = study.taxonomy_data(OmegaConf.to_container(cfg.data, resolve=True), cfg.ms_run)
    # The taxonomy first: a missing WordNet or a bad CSV fails before any image is encoded.
    taxonomy = study.open_taxonomy(OmegaConf.to_container(cfg.taxonomy, resolve=True), data)
    classes: list[str] = []
    if job.ms_run:
        top, ms_K = study.load_ms_run(job.ms_run, sae.n_latents)
    else:
        images = ImageSet.from_node(
            data, job="hierarchy", hint=" (or pass ms_run=<monosemanticity run dir> to reuse its top images)"
        )
        classes = study.check_images_have_taxa(taxonomy, images)
        src = open_sae_source(sae, None, job.model, job.layer, job.pool, job.device, job.sae_path)
        embedder = load_embedder(job.embedder) if job.embedder is not None else None
        top, ms_K = _top_images(job, src, images, embedder, job.sae_path, out_dpath)
    summary = _score(cfg, job, out_dpath, top, ms_K, taxonomy, classes, sae, Path(str(cfg.sae_path)).name)
    study.log_groups(summary)
    log.info("hierarchy outputs in %s", out_dpath)
    log_job(cfg, "hierarchy", out_dpath, summary.to_dict(), sae_path=job.sae_path)  # after the files
    return {**summary.to_dict(), "out_dpath": str(out_dpath)}


def _top_images(job: HierarchyJob, src, images: ImageSet, embedder, sae_path: str, out_dpath: Path):
    """Rank ``images`` for every latent of ``src``'s SAE (MS too with an embedder); saved as top_images/."""
    batch_size = job.batch_size or images.batch_size
    top, ms_K = study.compute_top_images(src, images, embedder, top_k=job.top_k, batch_size=batch_size,
                                         sae_path=sae_path)  # fmt: skip
    top.save(out_dpath / formats.TOP_IMAGES_DIR)
    return top, ms_K


def _score(cfg: DictConfig, job: HierarchyJob, out_dpath: Path, top, ms_K, taxonomy, classes, sae, name: str):
    """The LCA depths of ``top`` (:func:`study.score_hierarchy`), written with run_info.json into ``out_dpath``."""
    result = study.score_hierarchy(top, ms_K, taxonomy, classes, sae, n_top=job.n_top,
                                   min_majority=job.min_majority, sae_path=job.sae_path, ms_run=job.ms_run)  # fmt: skip
    outputs = write_hierarchy_outputs(out_dpath, result, name)
    write_run_info(out_dpath, {**OmegaConf.to_container(cfg, resolve=True), "sae_path": job.sae_path}, outputs=outputs)
    return result.summary


def _run_sweep(cfg: DictConfig, out_dpath: Path, paths: list[str]) -> dict:
    """Every SAE of a sweep on the same images (embedded once; source activations shared per model and layer),
    or on ``ms_run``'s per-SAE folders of an MS sweep: outputs in ``out_dpath/<name>/``, and hierarchy_table."""
    members = sweep.load_sweep(paths, cfg.sae_format)
    sweep.require_one_model(members, "hierarchy table", cfg.model)
    data = study.taxonomy_data(OmegaConf.to_container(cfg.data, resolve=True), cfg.ms_run)
    taxonomy = study.open_taxonomy(OmegaConf.to_container(cfg.taxonomy, resolve=True), data)
    images = None if cfg.ms_run else ImageSet.from_node(data, job="hierarchy")
    classes = study.check_images_have_taxa(taxonomy, images) if images is not None else []
    shared = sweep.SweepCache()
    embedder = sweep.SharedEmbedder(load_embedder(cfg.embedder), shared) if cfg.embedder and images else None

    def score(m: sweep.SweepMember, shared: sweep.SweepCache, sub_dpath: Path) -> tuple[dict, object]:
        job: HierarchyJob = OmegaConf.to_object(cfg)
        job.sae_path = m.sae_path
        if job.ms_run:  # an MS sweep's run dir: this SAE's folder in it
            top, ms_K = study.load_ms_run(Path(job.ms_run) / m.name, m.sae.n_latents)
        else:
            src = shared.open(m, cfg.model, job.layer, job.pool, job.device)
            top, ms_K = _top_images(job, src, images, embedder, m.sae_path, sub_dpath)
        return _score(cfg, job, sub_dpath, top, ms_K, taxonomy, classes, m.sae, m.name).to_dict(), m.source_layer

    def table(dpath: Path, rows: list) -> dict:
        return hierarchy_table(dpath, rows, study.PAPER_TABLE2)

    result = sweep.run_sweep(members, out_dpath, score, table, OmegaConf.to_container(cfg, resolve=True), shared)
    log_job(cfg, "hierarchy", out_dpath, result)  # one sweep-level run holding the table
    return result


def _main(cfg: DictConfig) -> None:
    out = run(cfg)
    if "tables" in out:  # a sweep
        print(Path(out["tables"]["hierarchy_table"]["md"]).read_text())
        return
    print((Path(out["out_dpath"]) / "hierarchy.md").read_text())
    print(f"outputs: {out['out_dpath']} (hierarchy.json, hierarchy.md, hierarchy.png, latent_taxa.csv)")


def main() -> None:
    register_configs()
    hydra.main(config_path=str(conf_dir()), config_name="hierarchy", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
