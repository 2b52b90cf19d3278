"""Write an SAE of any supported format in another library's layout.

    python -m vlmsae.export sae_path=outputs/train/<run>/sae format=dictionary_learning out=exports/dl
    python -m vlmsae.export sae_path=hf://<org>/<repo>/<folder> format=saelens out=exports/sl
    python -m vlmsae.export sae_path=<dictionary_learning trainer_0> format=vlmsae out=exports/v
    python -m vlmsae.export sae_path=<matryoshka sae> format=dictionary_learning out=exports/paper \
        matryoshka_class=MatroyshkaBatchTopKSAE      # the class name (sic) the paper's code loads

The written folder loads with that library's own loader (dictionary_learning: ``utils.load_dictionary``;
SAELens: ``SAE.load_from_disk``) and back into vlmsae with ``vlmsae.sae.load``. Keys: ``ExportJob``
(:mod:`vlmsae.config.jobs.export`); library code lives in :mod:`vlmsae.sae.interop`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from vlmsae.config import launch, pick, typed_job
from vlmsae.config.jobs.export import ExportJob


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    """Load ``cfg.sae_path``, write it as ``cfg.format`` into ``cfg.out``; run_info.json goes to ``out_dpath``."""
    from vlmsae.sae.interop import export_sae, load_any
    from vlmsae.utils.paths import run_dir
    from vlmsae.utils.provenance import write_run_info

    job, config = typed_job(cfg, ExportJob)  # below, every node is its dataclass; config: run_info.json
    sae = load_any(job.sae_path, sae_format=job.sae_format)
    written = export_sae(sae, job.format, job.out, overwrite=job.overwrite, matryoshka_class=job.matryoshka_class)
    result = {
        "out": str(written),
        "format": job.format,
        "files": sorted(p.name for p in Path(written).iterdir()),
        "sae_path": job.sae_path,
        "from_format": sae.trained_on["format"],
        **pick(sae, "arch", "d_in", "n_latents"),
    }
    write_run_info(run_dir(out_dpath), config, result=result)
    return result


def _main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(
        f"exported {result['arch']} SAE ({result['d_in']} -> {result['n_latents']}) from {result['from_format']} "
        f"to {result['format']}: {result['out']} ({', '.join(result['files'])})"
    )


main = launch("export", _main, __name__)
