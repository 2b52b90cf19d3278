"""Ask an SAE what it sees in your own images, and where.

    python -m vlmsae.inspect sae_path=<sae dir> images=photo.jpg                  # + model= / layer= if unrecorded
    python -m vlmsae.inspect sae_path=<sae> images=<folder | list.txt | [a.jpg,b.png]> ms_run=<its MS run>
    python -m vlmsae.inspect sae_path=<sae> images=<dir> ms_run=<run> query="a zebra"
    python -m vlmsae.inspect sae_path=<sae> images=[a.jpg,b.jpg] compare=true

Per image: the reconstruction FVE of its tokens and its top latents by pooled and by peak patch activation, each
with a heatmap over the image; with ``ms_run=`` (a monosemanticity run of the same SAE) also each latent's name,
MS, frequency, group and top images; ``query=``: the latents whose concept best matches a text; ``compare=true``
with two images: the latents that separate them most. Writes ``inspect.json``, ``inspect.html`` (+ ``img/``,
``heat/``) and ``run_info.json`` (docs/outputs.md). Keys: ``InspectJob`` (:mod:`vlmsae.config.jobs.inspect`);
library code in :mod:`vlmsae.studies.inspection` and :mod:`vlmsae.report.inspect_page`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlmsae.config import launch, typed_job
from vlmsae.config.jobs.inspect import InspectJob
from vlmsae.formats import write_inspect
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict[str, Any]:
    """Inspect ``cfg.images`` with the SAE at ``cfg.sae_path``; writes the page and inspect.json to ``out_dpath``."""
    from vlmsae.models.open_sae import load_job_sae, open_tapped_sae
    from vlmsae.report import inspect_page
    from vlmsae.report.job_log import log_job
    from vlmsae.studies import inspection as ins

    hint = "=... (python -m vlmsae.inspect sae_path=<sae dir> images=<image | folder>)."
    job, config = typed_job(cfg, InspectJob, sae_path=f"Pass sae_path{hint}", images=f"Pass images{hint}")
    if job.query is not None and job.ms_run is None:
        raise ValueError("query= matches the latents' concepts from their top images: pass ms_run=<its MS run> too.")
    images = ins.list_images(job.images)
    if job.compare and len(images) != 2:
        raise ValueError(f"compare=true needs exactly two images; images={job.images} names {len(images)}.")
    sae = load_job_sae(job.sae_path, job.sae_format)
    ms = ins.open_ms_run(job.ms_run, job.sae_path, sae.n_latents) if job.ms_run else None
    try:
        # model: null = the SAE's trained_on.model
        src = open_tapped_sae(sae, None, job.model, job.layer, job.pool, job.device, sae_dpath=job.sae_path)
    except ValueError as err:
        raise ValueError(f"sae_path={job.sae_path}: {err}") from None
    # one image decoded at a time (a folder of photos never sits in memory); a file that is not an image is refused
    found = [ins.inspect_image(src, ins.open_image(path), job.top_n, key, path) for key, path in images]
    # the query's embedder: embedder= or the MS run's own
    query = (job.query, ins.query_ms_run(ms, job.query, job.embedder, job.top_n)) if job.query is not None else None
    compare = ins.compare_images(found[0], found[1], job.top_n) if job.compare else None
    settings = {"sae_path": str(job.sae_path), "model": src.spec.name, "layer": src.layer, "pool": src.pool}
    settings.update(ms_run=str(ms.dpath) if ms else None, top_n=job.top_n, query=job.query, compare=job.compare)
    result = ins.inspection_result(found, ms, query, compare, settings, job.strip, src.sae.group_of_latent.cpu())
    out_dpath = run_dir(out_dpath)
    inspect_page.draw_images(result, out_dpath, job.thumb_px)
    json_fpath = write_inspect(out_dpath, result)
    page_fpath = inspect_page.write_page(result, out_dpath)
    table_fpath = inspect_page.write_table(result, out_dpath)
    summary = {
        "out_dpath": str(out_dpath),
        "inspect_json": str(json_fpath),
        "inspect_html": str(page_fpath),
        "n_images": len(found),
        "mean_fve": sum(f.fve for f in found) / len(found),
        "query_top": query[1][0][0] if query and query[1] else None,
        "tables": {"inspect": {"csv": str(table_fpath), "image_columns": ["heatmap"]}},
    }
    write_run_info(out_dpath, config, result=summary, sae_trained_on=src.trained_on)
    log_job(job, "inspect", out_dpath, summary, sae_path=job.sae_path)  # after the files
    return summary


def _main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "tables"}, indent=2))
    print(f"open file://{Path(result['inspect_html']).resolve()}")


main = launch("inspect", _main, __name__)
