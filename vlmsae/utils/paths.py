"""Where a job writes: Hydra's run directory, or an explicit folder (tests, notebooks)."""

from __future__ import annotations

from pathlib import Path


def run_dir(explicit: str | Path | None = None) -> Path:
    """The job's output folder: ``explicit`` if given, else Hydra's runtime output dir."""
    if explicit is not None:
        dpath = Path(explicit)
    else:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ValueError(
                "No output directory: call run(cfg, out_dpath=...) or launch through the Hydra CLI "
                "(python -m vlmsae.<job> ...), which sets one under outputs/."
            )
        dpath = Path(HydraConfig.get().runtime.output_dir)
    dpath.mkdir(parents=True, exist_ok=True)
    return dpath
