"""Callbacks around training: the Hydra sweep summary (after ``python -m vlmsae.train -m ...``).

Import-light on purpose: Hydra instantiates :class:`SweepSummary` when the CLI starts, before any
job runs, so nothing heavy (torch, Lightning) is imported here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from vlmsae.utils.io import atomic_write_text, write_csv_rows

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("layer", "n_latents", "k", "fve", "mse", "nmse", "l0", "dead_fraction", "dense_fraction", "step")


def _job_overrides(job_dpath: Path) -> dict[str, str]:
    """``key=value`` overrides of one job, from Hydra's ``.hydra/overrides.yaml``."""
    fpath = job_dpath / ".hydra" / "overrides.yaml"
    if not fpath.is_file():
        return {}
    from omegaconf import OmegaConf

    out = {}
    for item in OmegaConf.to_container(OmegaConf.load(fpath)) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def collect_sweep(sweep_dpath: str | Path) -> list[dict[str, Any]]:
    """One row per job dir (``job_*`` or any subdir with a metrics.json or run_info.json), sorted by job."""
    sweep_dpath = Path(sweep_dpath)
    rows = []
    for job_dpath in sorted(p for p in sweep_dpath.iterdir() if p.is_dir() and not p.name.startswith(".")):
        metrics_fpath = job_dpath / "metrics.json"
        if not metrics_fpath.is_file() and not (job_dpath / "run_info.json").is_file():
            continue
        row: dict[str, Any] = {"job": job_dpath.name, **_job_overrides(job_dpath)}
        if metrics_fpath.is_file():
            metrics = json.loads(metrics_fpath.read_text(encoding="utf-8"))
            row.update({"status": "done", **{key: metrics.get(key) for key in SUMMARY_METRICS}})
        else:
            info = json.loads((job_dpath / "run_info.json").read_text(encoding="utf-8"))
            row["status"] = info.get("status", "unfinished")
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_sweep_summary(sweep_dpath: str | Path) -> tuple[Path, Path] | None:
    """Write ``sweep_summary.csv`` and ``sweep_summary.md`` (the final metrics of every job)."""
    sweep_dpath = Path(sweep_dpath)
    if not sweep_dpath.is_dir():
        return None
    rows = collect_sweep(sweep_dpath)
    if not rows:
        log.warning("sweep summary: no job results under %s", sweep_dpath)
        return None
    columns = list(dict.fromkeys(c for row in rows for c in row))
    # The markdown shows what varies between jobs; overrides shared by all go in one line above it.
    metric_cols = {"job", "status", *SUMMARY_METRICS}
    shared = {c: rows[0].get(c) for c in columns if c not in metric_cols and len({str(r.get(c)) for r in rows}) == 1}
    md_columns = [c for c in columns if c not in shared]
    csv_fpath = write_csv_rows(sweep_dpath / "sweep_summary.csv", rows, columns)
    lines = [
        f"# Sweep summary: {sweep_dpath.name}",
        "",
        f"{len(rows)} jobs; final validation metrics. Shared overrides: "
        + (", ".join(f"`{k}={v}`" for k, v in shared.items()) or "none"),
        "",
        "| " + " | ".join(md_columns) + " |",
        "|" + "|".join("---" for _ in md_columns) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in md_columns) + " |" for row in rows]
    md_fpath = atomic_write_text(sweep_dpath / "sweep_summary.md", "\n".join(lines) + "\n")
    log.info("sweep summary: %s", md_fpath)
    return csv_fpath, md_fpath


class SweepSummary(Callback):
    """Hydra callback (registered in conf/train.yaml): summarises a multirun when it ends."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        write_sweep_summary(config.hydra.sweep.dir)
