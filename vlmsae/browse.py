"""Build the static feature browser of a monosemanticity run.

    python -m vlmsae.browse run=outputs/demo            # -> outputs/demo/browser/index.html
    python -m vlmsae.browse run=<ms run> max_cards=2000 heatmaps=off   # default: every latent
    python -m vlmsae.browse run=<dir> logger=wandb logger.mode=offline   # also a W&B Table

The page is one self-contained folder (docs/outputs.md): open it from disk, no server needed. Keys:
``BrowseJob`` (:mod:`vlmsae.config.jobs.browse`); library code lives in :mod:`vlmsae.report.browser`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from vlmsae.config import launch, pick, typed_job
from vlmsae.config.jobs.browse import BrowseJob


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    """Build ``<out>/index.html`` from the runs found under ``cfg.run``; returns counts and the page path."""
    from vlmsae.report.browser import build_browser, cards_summary, find_runs, log_to_wandb
    from vlmsae.utils.paths import run_dir
    from vlmsae.utils.provenance import write_run_info

    job, config = typed_job(cfg, BrowseJob)  # below, every node is its dataclass; config: run_info.json
    out_dpath = run_dir(out_dpath if out_dpath is not None else job.out or None)
    sources = find_runs(job.run, ms_run=job.ms_run, hierarchy_run=job.hierarchy_run, steer_runs=job.steer_runs)
    keys = ("max_cards", "max_inline", "chunk_size", "images_per_card", "thumb_px", "heatmaps", "title", "sae_format")
    data = build_browser(sources, out_dpath, **pick(job, *keys))
    result = {
        **cards_summary(data),
        "index_html": str(Path(out_dpath) / "index.html"),
        "ms_run": str(sources.ms_dpath),
        "hierarchy_run": str(sources.hierarchy_dpath) if sources.hierarchy_dpath else None,
        "steer_files": [str(p) for p in sources.steer_fpaths],
        "found": sources.found,
    }
    if job.logger.kind == "wandb":
        result["wandb_dir"] = log_to_wandb(data, out_dpath, job.logger, config)
    write_run_info(out_dpath, config, result=result)
    return result


def _main(cfg: DictConfig) -> None:
    result = run(cfg)
    print("\n".join(result["found"]))  # which runs the page shows, and how they were found
    print(
        f"feature browser: {result['n_cards']} cards of {result['n_latents']} latents "
        f"({result['n_chunks']} chunk files), {result['n_thumbnails']} thumbnails, "
        f"{result['n_heatmaps']} patch heatmaps ({result['heatmap_note']})"
    )
    print(f"open file://{Path(result['index_html']).resolve()}")


main = launch("browse", _main, __name__)
