"""Automatic feature names for a finished monosemanticity run.

    python -m vlmsae.names ms_run=outputs/monosemanticity/<run> names=imagenet
    python -m vlmsae.names ms_run=<run> names=wordnet embedder=clip_b32
    python -m vlmsae.names ms_run=<run> names=my_names.txt names_top=5
    python -m vlmsae.names ms_run=<run> names=imagenet autointerp=llava autointerp_model=llava15_7b

Embeds the run's top images again (``top_images/``, latent by latent) with a CLIP embedder (default: the
run's own), names each latent by the vocabulary entry whose prompt-averaged text embedding is closest to
its concept (:mod:`vlmsae.studies.naming`), and rewrites ``<ms_run>/latents.csv`` atomically with the
``name``, ``name_score`` and ``names`` columns, plus the ``names`` entry of ``ms_summary.json``.
``autointerp=llava`` adds LLaVA's one word for a grid of each latent's top images and its cosine with the
concept (``autointerp``, ``autointerp_score``; :mod:`vlmsae.studies.autointerp`). The same
names come out of ``python -m vlmsae.monosemanticity ... names=imagenet`` directly. Keys: ``NamesJob``
(:mod:`vlmsae.config.jobs.names`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlmsae.config import launch, typed_job
from vlmsae.config.jobs.names import NamesJob
from vlmsae.formats import LATENTS_CSV, MS_SUMMARY_JSON, read_ms_summary, write_latents_csv, write_ms_summary
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict[str, Any]:
    """Name ``cfg.ms_run``'s latents with ``cfg.names``; rewrites its latents.csv; run_info.json in ``out_dpath``."""
    from vlmsae.report.job_log import log_job
    from vlmsae.studies.naming import ms_run_embedder, name_ms_run, namer_for

    hint = "Pass ms_run=<monosemanticity run folder> (it holds latents.csv and top_images/)."
    job, config = typed_job(cfg, NamesJob, ms_run=hint)
    ms_dpath = Path(job.ms_run).expanduser()
    namer = namer_for(job, ms_run_embedder(ms_dpath, job.embedder))
    table, names = name_ms_run(ms_dpath, namer)
    written = [str(write_latents_csv(ms_dpath, table))]
    summary = namer.study_summary(names, table.ms_K(len(table.rows)))  # latents are 0..K-1
    if (ms_dpath / MS_SUMMARY_JSON).is_file():
        ms_summary = read_ms_summary(ms_dpath)
        ms_summary.extra["names"] = summary
        written.append(str(write_ms_summary(ms_dpath, ms_summary)))
    out_dpath = run_dir(out_dpath)
    write_run_info(out_dpath, config, outputs=written, ms_run=str(ms_dpath))
    result = {"out_dpath": str(out_dpath), "latents_csv": str(ms_dpath / LATENTS_CSV), **summary}
    log_job(job, "names", out_dpath, result)  # after the files
    return result


def _main(cfg: DictConfig) -> None:
    summary = run(cfg)
    print(json.dumps({k: summary[k] for k in ("n_named", "mean_name_score", "latents_csv", "out_dpath")}, indent=2))
    for row in summary["top_latents"]:
        said = f"; LLaVA: {row['autointerp']} ({row['autointerp_score']:.3f})" if "autointerp" in row else ""
        print(f"latent {row['latent']}: {row['name']} ({row['name_score']:.3f}); {row['names']}{said}")


main = launch("names", _main, __name__)
