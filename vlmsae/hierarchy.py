"""Taxonomy alignment of Matryoshka levels (METHOD §4): does a deeper group hold finer taxa?

    python -m vlmsae.hierarchy sae_path=<checkpoint dir> data=folder data.root=<images> \
        taxonomy=<inat_dirnames|inat_json|wordnet|csv>
    python -m vlmsae.hierarchy sae_path=<ckpt> ms_run=<monosemanticity run dir> taxonomy=inat_dirnames \
        taxonomy.path=<iNat root>      # reuse a finished MS run's top_images/ and latents.csv

Steps: the top-16 images of every latent (computed here by running the SAE's source model and the
SAE over the images, or read from an MS run), each image's taxon path, the LCA depth of all 120
pairs per latent (vlmsae.metrics.hierarchy), averaged per Matryoshka group, beside the group's MS.

Outputs in the run dir (docs/outputs.md): ``hierarchy.json``, ``hierarchy.md`` (the paper's Table 2 layout),
``hierarchy.png``, ``latent_taxa.csv`` (per latent: the majority taxon at each rank, the label the browser shows),
``top_images/`` (when computed here) and ``run_info.json``.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from vlmsae.config import launch, typed_job
from vlmsae.config.jobs.hierarchy import HierarchyJob
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info

log = logging.getLogger(__name__)


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    """Score every latent's top images against the taxonomy and write the per-group table. A sweep (a folder of
    SAEs or a comma list; with ``ms_run``, an MS sweep's run dir): each SAE in ``out_dpath/<name>/``, and
    ``hierarchy_table.md/.csv``; its SAEs share the images' embeddings and, per model and layer, the activations.

    ``cfg``: conf/hierarchy.yaml (keys: :class:`vlmsae.config.jobs.hierarchy.HierarchyJob`).
    """
    from vlmsae.data.image_set import ImageSet
    from vlmsae.report.job_log import log_job
    from vlmsae.report.tables import hierarchy_table
    from vlmsae.studies import hierarchy_study as study
    from vlmsae.studies import sweep

    hint = "sae_path is required: an SAE folder (<run>/sae, a published SAE's folder or hf://org/repo)."
    job, config = typed_job(cfg, HierarchyJob, sae_path=hint)
    out_dpath = run_dir(out_dpath)
    members, is_sweep = sweep.open_members(str(job.sae_path), job.sae_format, "hierarchy table", job.model)
    if not is_sweep and members[0].arch != "matryoshka":
        log.warning("sae_path holds a %s SAE: one group only (the study is meant for Matryoshka SAEs)", members[0].arch)
    data = study.taxonomy_data(job.data, job.ms_run)
    # The taxonomy first: a missing WordNet or a bad CSV fails before any image is encoded.
    taxonomy = study.open_taxonomy(job.taxonomy, data)
    hint = " (or pass ms_run=<monosemanticity run dir> to reuse its top images)"
    images = None if job.ms_run else ImageSet.from_data(data, job="hierarchy", hint=hint)
    classes = study.check_images_have_taxa(taxonomy, images) if images is not None else []
    embedder = job.embedder if job.embedder and images is not None else None
    score = _scorer(job, config, taxonomy, classes, images, embedder, is_sweep)
    table = partial(hierarchy_table, paper=study.PAPER_TABLE2)
    result = sweep.run_study(members, is_sweep, out_dpath, score, table, config)
    # after the files (W&B may fail); a sweep logs one sweep-level run holding the table
    log_job(job, "hierarchy", out_dpath, result, sae_path=None if is_sweep else job.sae_path)
    return result


def _scorer(job: HierarchyJob, config: dict, taxonomy, classes: list[str], images, embedder, is_sweep: bool):
    """The study of one SAE: its top images (computed, or read from ``ms_run``; for a sweep, the MS sweep's folder
    of this SAE), their LCA depths, and the outputs with run_info.json in its folder."""
    from vlmsae import formats
    from vlmsae.report.studies import write_hierarchy_outputs
    from vlmsae.studies import hierarchy_study as study
    from vlmsae.studies import sweep

    def score(m: sweep.SweepMember, shared: sweep.SweepCache, sub_dpath: Path) -> tuple[dict, object]:
        if job.ms_run:
            top, ms_K = study.load_ms_run(Path(job.ms_run) / m.name if is_sweep else job.ms_run, m.sae.n_latents)
        else:
            src = shared.open(m, job.model, job.layer, job.pool, job.device, job.check_fit)
            batch_size = job.batch_size or images.batch_size
            top, ms_K, n_embedded = study.compute_top_images(
                src, images, embedder, top_k=job.top_k, batch_size=batch_size, sae_path=m.sae_path,
                embed_memo=shared.embeddings if shared.keep else None,
            )  # fmt: skip
            shared.n_embedded += n_embedded
            top.save(sub_dpath / formats.TOP_IMAGES_DIR)
        result = study.score_hierarchy(
            top, ms_K, taxonomy, classes, m.sae, n_top=job.n_top, min_majority=job.min_majority,
            sae_path=m.sae_path, ms_run=job.ms_run,
        )  # fmt: skip
        outputs = write_hierarchy_outputs(sub_dpath, result, m.name)
        write_run_info(sub_dpath, {**config, "sae_path": m.sae_path}, outputs=outputs)
        for r in result.summary.groups:
            values = [r[k] for k in ("group", "n_scored", "n_latents", "depth_mean", "ms_mean")]
            log.info("group %d: %d/%d latents scored, depth %s, MS %s", *values)
        return result.summary.to_dict(), m.trained_on_layer

    return score


def _main(cfg: DictConfig) -> None:
    out = run(cfg)
    if "tables" in out:  # a sweep
        print(Path(out["tables"]["hierarchy_table"]["md"]).read_text())
        return
    print((Path(out["out_dpath"]) / "hierarchy.md").read_text())
    print(f"outputs: {out['out_dpath']} (hierarchy.json, hierarchy.md, hierarchy.png, latent_taxa.csv)")


main = launch("hierarchy", _main, __name__)
