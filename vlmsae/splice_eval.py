"""Splice fidelity inside LLaVA: how much of LLaVA's answer loss survives the SAE in its vision tower.

    python -m vlmsae.splice_eval model=llava15_7b sae_path=<sae dir> images=<folder> prompts=<prompts.csv>

The SAE replaces its vision block's output (every token) by its reconstruction; LLaVA is teacher-forced
on reference answers (``prompts=``: a .json/.csv of image, prompt, answer; default: the built-in images
asked "Describe the image.", the clean model's greedy answer as reference). Writes ``splice.json``, ``splice.md``
and ``run_info.json`` (the figures: docs/outputs.md). Keys: ``SpliceEvalJob`` (:mod:`vlmsae.config.jobs.splice_eval`);
library: :mod:`vlmsae.steering.splice`.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from vlmsae.config import launch, pick, typed_job
from vlmsae.config.jobs.splice_eval import SpliceEvalJob
from vlmsae.formats import write_splice
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    """Measure splice fidelity as ``cfg`` says (keys: :class:`SpliceEvalJob`); outputs in ``out_dpath``.
    Returns the flat headline figures (:meth:`~vlmsae.steering.splice.SpliceScores.summary`) + table + out_dpath."""
    import torch

    from vlmsae.report.job_log import log_job
    from vlmsae.report.splice import write_splice_report
    from vlmsae.steering import splice
    from vlmsae.steering.setup import load_steering
    from vlmsae.studies.ms_study import clip_zero_shot

    job, config = typed_job(cfg, SpliceEvalJob)  # below, every node is its dataclass; config: run_info.json
    out_dpath = run_dir(out_dpath)
    if job.prompts is not None:  # a bad prompt file fails before the model loads
        splice.read_prompt_file(job.prompts)
    torch.manual_seed(job.seed)
    setup = load_steering(job.model, job.sae_path, job.layer, job.device_map, job.sae_format, job.check_fit)
    keys = ("prompts", "images", "n_images", "max_new_tokens", "batch_size")
    items, source_note = splice.prompt_items(setup, **pick(job, *keys))
    scores = splice.evaluate_splice(setup, items, job.batch_size)
    scores.notes.append(source_note)
    if job.zero_shot:
        args = (job.zero_shot_images, job.zero_shot_template, job.zero_shot_max_images, job.batch_size)
        scores.zero_shot = clip_zero_shot(setup.sae, *args)
    settings = {"model": job.model.name, "sae_path": job.sae_path, "images": job.images, "prompts": job.prompts}
    result = scores.result(settings)
    n_tokens = result.summary["n_tokens"]
    title = f"Splice fidelity: {job.model.name}, block {setup.layer}, {len(items)} answers ({n_tokens} tokens)"
    table = write_splice_report(out_dpath, result.rows, result.notes, title)
    write_splice(out_dpath, result)
    write_run_info(out_dpath, config)
    print(table)
    log_job(job, "splice_eval", out_dpath, scores.summary(), sae_path=job.sae_path)  # after the files
    return {**scores.summary(), "table": table, "out_dpath": str(out_dpath)}


def _main(cfg: DictConfig) -> None:
    out = run(cfg)
    print(json.dumps({k: out[k] for k in ("kl", "frac_recovered_zero", "frac_recovered_mean", "out_dpath")}))


main = launch("splice_eval", _main, __name__)
