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


def hydra_chose_run_dir(explicit: str | Path | None = None) -> bool:
    """True when the job's output folder is Hydra's default new run dir (``conf/hydra/default.yaml``): no
    ``explicit`` folder, a single run (not a multirun) and no ``hydra.run.dir=`` override. Only such a
    folder may be given up for an earlier run's (``vlmsae.lit.resume.choose_run``)."""
    if explicit is not None:
        return False
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return False
    return not any(str(o).split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in HydraConfig.get().overrides.hydra)


def run_name(out_dpath: Path) -> str:
    """A run's name for W&B: its run dir's name (a multirun job's: ``<sweep>/job_<i>``)."""
    return out_dpath.name if not out_dpath.name.startswith("job_") else f"{out_dpath.parent.name}/{out_dpath.name}"
