"""Seed stability of SAEs: are the latents of SAEs trained with different seeds the same features?

    python -m vlmsae.train -m seed=0,1,2 <the same overrides>          # one SAE per seed, in job_0 .. job_2
    python -m vlmsae.stability 'runs=[<sweep>/job_0,<sweep>/job_1,<sweep>/job_2]' \
        ['ms_runs=[<ms run 0>,<ms run 1>,<ms run 2>]'] ['hierarchy_runs=[...]'] [threshold=0.7] [pairs=all]

Decoder rows are L2-normalised; each seed's latents are matched one-to-one to the first seed's (the Hungarian
method on the cosines; greedy above ``exact_max`` latents), and with ``pairs=all`` every pair is matched too.
A latent of the reference is "found" in a seed when its partner's cosine is >= ``threshold``.

Outputs in the run dir (every key: docs/outputs.md): ``stability.json``, ``stability_latents.csv``,
``stability.md`` (the tables), ``stability_cos.png`` (matched cosines per pair) and ``run_info.json``.

The study is :mod:`vlmsae.studies.stability_study` (matching: :mod:`vlmsae.metrics.seed_matching`); the keys and
their defaults are :class:`vlmsae.config.jobs.stability.StabilityJob`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlmsae.config import launch, pick, typed_job
from vlmsae.config.jobs.stability import StabilityJob
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info

log = logging.getLogger(__name__)


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict[str, Any]:
    """Match the seeds' latents and aggregate their metrics; returns the flat headline figures (+ out_dpath)."""
    from vlmsae.report.job_log import log_job
    from vlmsae.report.stability import write_stability_outputs
    from vlmsae.studies import stability_study as study

    hint = "Pass runs=[<run0>/sae,<run1>/sae,...]: two or more SAEs trained with different seeds."
    job, config = typed_job(cfg, StabilityJob, runs=hint)
    if job.pairs not in ("reference", "all"):
        raise ValueError(f"pairs={job.pairs!r}: expected reference (every seed vs the first) or all (every pair).")
    if not 0.0 < float(job.threshold) <= 1.0:
        raise ValueError(f"threshold={job.threshold}: a cosine in (0, 1], e.g. threshold=0.7.")
    runs = study.open_runs(list(job.runs))  # refuses < 2 runs and SAEs of different sizes before any output
    out_dpath = run_dir(out_dpath)
    keys = ("threshold", "exact_max", "ms_runs", "hierarchy_runs")  # typed by StabilityJob; [] reads as None
    result = study.stability_study(runs, all_pairs=job.pairs == "all", **pick(job, *keys))
    outputs = write_stability_outputs(out_dpath, result)
    write_run_info(out_dpath, config, outputs=outputs)
    headline = study.headline(result.summary)
    log.info("seed stability: %s", headline)
    log_job(job, "stability", out_dpath, headline)  # after the files
    return {**headline, "out_dpath": str(out_dpath)}


main = launch("stability", lambda cfg: print(json.dumps(run(cfg), indent=2)), __name__)
