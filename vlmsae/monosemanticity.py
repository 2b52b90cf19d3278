"""Monosemanticity of an SAE's latents vs the raw neurons of the layer it reads (METHOD §3).

    python -m vlmsae.monosemanticity sae_path=<checkpoint dir> data=folder data.root=<images> embedder=clip_b32

1. Embeds the images with the embedder E (cached under ``embed_cache``, keyed by the image list's
   digest and the embedder), and runs the source model (the loaded SAE's ``trained_on`` says model,
   layer, tokens; ``model=<name>`` / ``layer=<L>`` override; any format ``vlmsae.sae.load`` reads,
   ``sae_format=`` names one) and the SAE (inference
   encoder, thresholded) on the same images; codes stay sparse. One vector per image: the CLS
   token (``pool=cls``), or the SAE codes / raw activations pooled over the patch tokens
   (``pool=mean`` or ``pool=max``).
2. Scores every SAE latent and every raw neuron with the exact linear-time MS
   (:func:`vlmsae.metrics.monosemanticity_scores`).
3. Writes ``latents.csv``, ``ms_summary.json``, ``top_images/`` (the index the hierarchy study, steering and
   the browser reuse), ``ms_hist.png``, ``ms_vs_freq.png`` and ``run_info.json`` (docs/outputs.md).

The study itself is :func:`vlmsae.studies.ms_study.score_sae` (embedding cache:
:mod:`vlmsae.studies.embedding_cache`, plots: :mod:`vlmsae.report.plots`); the keys and their
defaults are :class:`vlmsae.config.jobs.monosemanticity.MonosemanticityJob`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from vlmsae.config import launch, pick, typed_job
from vlmsae.config.jobs.monosemanticity import MonosemanticityJob
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info

if TYPE_CHECKING:
    from vlmsae.data.image_set import ImageSet

log = logging.getLogger(__name__)


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict[str, Any]:
    """Score ``cfg.sae_path``'s latents and the raw neurons on ``cfg.data``; outputs in ``out_dpath``. A sweep
    (a folder of SAEs or a comma list): each SAE's outputs in ``out_dpath/<name>/`` and ``ms_table.md/.csv``;
    its SAEs share the images' embeddings and, per model and layer, the source activations.
    """
    from vlmsae.data.image_set import ImageSet
    from vlmsae.models.tiny import vlmsae_home
    from vlmsae.report.job_log import log_job
    from vlmsae.report.tables import ms_table
    from vlmsae.studies import sweep
    from vlmsae.studies.ms_study import score_sae
    from vlmsae.studies.naming import namer_for

    hint = "Pass sae_path=<SAE folder or hf://org/repo[/sub]> (a training run keeps it in <run>/sae/)."
    job, config = typed_job(cfg, MonosemanticityJob, sae_path=hint)
    out_dpath = run_dir(out_dpath)
    sae_dpath = os.path.expanduser(str(job.sae_path))  # a str, not a Path: Path("hf://a/b") drops a slash
    namer = namer_for(job, job.embedder)  # before any image is read
    members, is_sweep = sweep.open_members(sae_dpath, job.sae_format, "MS table", job.model)
    images = ImageSet.from_data(job.data, job="monosemanticity")
    cache_dpath = Path(job.embed_cache).expanduser() if job.embed_cache else vlmsae_home() / "embeddings"

    def score(m: sweep.SweepMember, shared: sweep.SweepCache, sub_dpath: Path) -> tuple[dict, Any]:
        # model: null = the SAE's trained_on.model
        src = shared.open(m, job.model, job.layer, job.pool, job.device, job.check_fit)
        study = score_sae(
            src, images, job.embedder, cache_dpath, **pick(job, *_STUDY_KEYS),
            sae_path=m.sae_path, embed_memo=shared.embeddings if shared.keep else None, namer=namer,
        )  # fmt: skip
        shared.n_embedded += study.n_embedded
        _finish(job, config, sub_dpath, study, src, images, m.sae_path)
        return study.summary, src.layer

    result = sweep.run_study(members, is_sweep, out_dpath, score, ms_table, config)
    # after the files (W&B may fail); a sweep logs one sweep-level run holding the table
    log_job(job, "monosemanticity", out_dpath, result, sae_path=None if is_sweep else sae_dpath)
    return result


_STUDY_KEYS = ("top_k", "baseline", "chunk_size", "dense_threshold", "progress")


def _finish(
    job: MonosemanticityJob, config: dict, out_dpath: Path, study: Any, src: Any, images: ImageSet, sae_path: str
) -> None:
    """The optional zero-shot check, then the study's files and run_info.json in ``out_dpath``."""
    from vlmsae.report.studies import write_ms_outputs
    from vlmsae.studies.ms_study import zero_shot_check

    if job.zero_shot:
        study.summary["zero_shot"] = zero_shot_check(
            src, images, study.classes, template=job.zero_shot_template, max_images=job.zero_shot_max_images
        )
    outputs = write_ms_outputs(out_dpath, study)
    write_run_info(
        out_dpath,
        {**config, "sae_path": str(sae_path)},
        outputs=outputs,
        sae_path=str(sae_path),
        data_root=str(images.root),
        skipped=study.skip_log.to_list(),
        image_list_digest=study.image_list_digest,
        sae_trained_on=src.trained_on,
    )
    log.info("mean MS: SAE %.4f, raw neurons %s", study.summary["mean"], study.summary.get("baseline", {}).get("mean"))


def _main(cfg: DictConfig) -> None:
    summary = run(cfg)
    if "tables" in summary:  # a sweep: the table says it all
        print(Path(summary["tables"]["ms_table"]["md"]).read_text())
        return
    brief = {k: summary[k] for k in ("mean", "std", "min", "max", "dead", "n_latents", "n_images", "out_dpath")}
    if "baseline" in summary:
        brief["baseline_mean"] = summary["baseline"]["mean"]
    print(json.dumps(brief, indent=2))


main = launch("monosemanticity", _main, __name__)
