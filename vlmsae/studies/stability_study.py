"""The seed-stability study of ``python -m vlmsae.stability``: read the seeds' SAEs and summaries
(:func:`open_runs`), match the decoders (:mod:`vlmsae.metrics.seed_matching`) and aggregate (:func:`stability_study`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmsae import formats
from vlmsae.metrics.seed_matching import StabilityResult, mean_ci, seed_stability, summaries_mean_ci
from vlmsae.sae import load_sae

log = logging.getLogger(__name__)

# Training metrics summarised over seeds (metrics.json / sae/run_info.json "metrics")
TRAIN_METRICS = ("fve", "l0", "dead_fraction", "nmse", "dense_fraction")
_FIX = "train every seed with the same sae.* settings and layer, e.g. `python -m vlmsae.train -m seed=0,1,2 ...`"


@dataclass
class SeedRun:
    """One seed: its SAE folder, decoder [F, D] and training metrics ({} when the folder records none)."""

    sae_dpath: Path
    W_dec_FD: torch.Tensor
    metrics: dict[str, Any]


def sae_folder(path: str | Path) -> Path:
    """The SAE checkpoint folder of ``path``: itself when it holds config.json, else ``path/sae``."""
    path = Path(path).expanduser()
    for cand in (path, path / "sae"):
        if (cand / formats.SAE_CONFIG_JSON).is_file():
            return cand
    raise FileNotFoundError(
        f"{str(path)!r} is not an SAE folder (no {formats.SAE_CONFIG_JSON} in it or in its sae/): pass the "
        "<run>/sae/ folders that `python -m vlmsae.train` writes, or the training run folders that hold them."
    )


def _train_metrics(sae_dpath: Path) -> dict[str, Any]:
    """The final validation metrics that training recorded with the SAE (sae/run_info.json, else the run's)."""
    for dpath in (sae_dpath, sae_dpath.parent):
        if (dpath / formats.RUN_INFO_JSON).is_file():
            metrics = formats.read_run_info(dpath).extra.get("metrics")
            if isinstance(metrics, dict) and "fve" in metrics:
                return metrics
    log.warning("%s records no training metrics (run_info.json 'metrics'): left out of the means", sae_dpath)
    return {}


def open_runs(paths: list[str]) -> list[SeedRun]:
    """Every seed's SAE, refusing fewer than two or SAEs of different sizes (naming each)."""
    paths = list(paths or [])
    if len(paths) < 2:
        raise ValueError(
            f"runs= lists {len(paths)} SAE(s) ({paths}); seed stability needs at least two: "
            "runs=[<run0>/sae,<run1>/sae,...], " + _FIX + "."
        )
    dpaths = [sae_folder(p) for p in paths]  # every folder checked before any SAE loads
    runs = [SeedRun(d, load_sae(d).W_dec.detach().float(), _train_metrics(d)) for d in dpaths]
    for what, dim in (("n_latents", 0), ("d_in", 1)):
        values = [int(r.W_dec_FD.shape[dim]) for r in runs]
        if len(set(values)) > 1:
            listing = ", ".join(f"{r.sae_dpath}: {v}" for r, v in zip(runs, values))
            raise ValueError(f"the SAEs differ in {what} ({listing}); seeds must differ only in the seed: {_FIX}.")
    return runs


def _summaries(paths: list[str] | None, n_runs: int, key: str, read) -> dict[str, Any] | None:
    """Mean ± 95% interval of every numeric field of the seeds' summary files (``read`` is the formats reader)."""
    if not paths:
        return None
    if len(paths) != n_runs:
        raise ValueError(
            f"{key}= lists {len(paths)} run(s) but runs= lists {n_runs} SAEs: give one {key} entry per seed, "
            "in the same order."
        )
    dicts = [{k: v for k, v in read(p).to_dict().items() if k != "format_version"} for p in paths]
    return {"runs": [str(p) for p in paths], **(summaries_mean_ci(dicts) or {})}


@dataclass
class StabilityStudy:
    result: StabilityResult
    summary: formats.StabilitySummary
    latents: formats.StabilityLatents


def stability_study(
    runs: list[SeedRun],
    threshold: float = 0.7,
    all_pairs: bool = False,
    exact_max: int = 8192,
    ms_runs: list[str] | None = None,
    hierarchy_runs: list[str] | None = None,
) -> StabilityStudy:
    """Match the seeds' latents and aggregate their metrics (and MS / hierarchy summaries when given)."""
    result = seed_stability([r.W_dec_FD for r in runs], threshold, all_pairs, exact_max)
    metrics = {}
    for name in TRAIN_METRICS:
        values = [r.metrics.get(name) for r in runs]
        if any(isinstance(v, (int, float)) for v in values):
            metrics[name] = {**mean_ci(values), "per_seed": values}
    summary = formats.StabilitySummary(
        runs=[str(r.sae_dpath) for r in runs],
        n_latents=int(runs[0].W_dec_FD.shape[0]),
        d_in=int(runs[0].W_dec_FD.shape[1]),
        matching={**result.summary(), "pairs_mode": "all" if all_pairs else "reference"},
        metrics=metrics,
        ms=_summaries(ms_runs, len(runs), "ms_runs", formats.read_ms_summary),
        hierarchy=_summaries(hierarchy_runs, len(runs), "hierarchy_runs", formats.read_hierarchy),
    )
    latents = formats.StabilityLatents(
        latent=list(range(summary.n_latents)),
        found_in=result.found_in_F.tolist(),
        mean_cos=result.mean_cos_F.tolist(),
        matches=[result.match_FS[:, s].tolist() for s in range(1, result.n_seeds)],
    )
    return StabilityStudy(result, summary, latents)


def headline(summary: formats.StabilitySummary) -> dict[str, Any]:
    """The flat figures a logger or a sweep table shows: matching, then mean and ci95 of each metric."""
    m = summary.matching
    out: dict[str, Any] = {"n_seeds": m["n_seeds"], "n_latents": summary.n_latents}
    out.update({k: m[k] for k in ("threshold", "mean_matched_cos", "frac_found_in_all", "mean_found_in")})
    for name, stats in summary.metrics.items():
        out[f"{name}_mean"], out[f"{name}_ci95"] = stats["mean"], stats["ci95"]
    if summary.ms and isinstance(summary.ms.get("mean"), dict):
        out["ms_mean"], out["ms_ci95"] = summary.ms["mean"]["mean"], summary.ms["mean"]["ci95"]
    return out
