"""Steer LLaVA through SAE latents: answers with and without the intervention, side by side (METHOD §5).

    python -m vlmsae.steer model=llava15_7b sae_path=<sae dir> latent=123 alpha=100 \
        prompt="Write me a short love poem" image=white

Writes ``steer.json`` (``steered``, ``baseline``, ``settings``; plus ``activation_steering`` and
``sweep`` when asked) and ``run_info.json`` into the Hydra run directory. Keys: ``SteerJob``
(:mod:`vlmsae.config.jobs.steer`); library: :mod:`vlmsae.steering.compare`.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from vlmsae.config import launch, pick, typed_job
from vlmsae.config.jobs.steer import SteerJob
from vlmsae.formats import write_steer
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    import torch

    from vlmsae.report.job_log import log_job
    from vlmsae.report.steering import side_by_side
    from vlmsae.steering.compare import SteerRequest, compare_answers, latent_alphas, load_images
    from vlmsae.steering.setup import load_steering

    job, config = typed_job(cfg, SteerJob)  # below, every node is its dataclass; config: run_info.json
    out_dpath = run_dir(out_dpath)
    keys = ("mode", "patches", "prompt", "max_new_tokens", "batch_size", "compare_add", "sweep")
    request = SteerRequest(latent_alphas(job.latent, job.alpha), **pick(job, *keys))
    torch.manual_seed(job.seed)
    setup = load_steering(job.model, job.sae_path, job.layer, job.device_map, job.sae_format, job.check_fit)
    images, names = load_images(job.image, setup.image_size)
    result, rows = compare_answers(setup, images, names, request)
    result.settings = {
        "model": job.model.name,
        "dtype": job.model.dtype,
        **pick(job, "device_map", "sae_path"),
        **result.settings,
    }
    print(side_by_side(names, rows, result.sweep))
    write_steer(out_dpath, result)
    write_run_info(out_dpath, config)
    log_job(job, "steer", out_dpath, result.to_dict(), sae_path=job.sae_path)  # after the files
    return {**result.to_dict(), "out_dpath": str(out_dpath)}


main = launch("steer", lambda cfg: print(json.dumps({"out_dpath": run(cfg)["out_dpath"]})), __name__)
