"""Extract a vision encoder's activations at one layer into an activation store (METHOD §1).

    python -m vlmsae.extract model=<name> data=folder data.root=<dir> layer=<L|last> tokens=<sel> out=<dir>

Runs images through a vision encoder up to block ``layer`` (METHOD §1; later blocks never run), keeps
the rows ``tokens`` selects (cls | patches | all | random_k | mean), and writes them as an activation
store (``acts-%06d.tar`` + ``manifest.json``, see :mod:`vlmsae.data.shards`) with ``run_info.json``.
Images are visited in the seeded permutation of ``order_seed``, so every shard is a uniform sample of them.

Resumable: rerunning the same command in the same ``out`` continues after the last complete shard, with
the rows of an uninterrupted run (``random_k`` draws are seeded by ``seed`` and the batch's first visiting
position). ``out=s3://...`` (any writable fsspec URL) stages each shard locally and uploads it
(:mod:`vlmsae.data.sink`); ``torchrun --nproc_per_node=N -m vlmsae.extract ...`` splits the visiting order
over the ranks. Row order, the manifest and skipped images: docs/outputs.md; several processes and
object storage: docs/scaling.md; the work itself: :mod:`vlmsae.models.extraction`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from vlmsae.config import launch, pick, typed_job
from vlmsae.config.jobs.extract import ExtractJob
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info

if TYPE_CHECKING:
    from vlmsae.data.sink import StoreSink


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict[str, Any]:
    """Extract activations as ``cfg`` says into ``out_dpath`` (or ``cfg.out``, or Hydra's run dir; or a URL)."""
    from vlmsae.data.images import synthetic_options
    from vlmsae.data.sink import sink_of
    from vlmsae.models.extraction import ExtractionPlan, Ranks, StoreExtraction
    from vlmsae.report.job_log import log_job

    job, config = typed_job(cfg, ExtractJob)  # below, every node is its dataclass; config: run_info.json
    out = out_dpath if out_dpath is not None else job.out
    sink = sink_of(out, job.staging_dir)  # out=<url>: its protocol and package are checked before any image
    out_dpath = sink.staging_dpath if sink is not None else run_dir(out)
    data = job.data
    plan = ExtractionPlan(
        **pick(job, "layer", "tokens", "k", "seed", "dtype", "rows_per_shard", "rows_per_chunk", "order_seed"),
        **pick(data, "source", "root", "max_images", "num_workers", "exif_transpose", "fast_decode"),
        batch_size=data.images_per_forward,
        synthetic=synthetic_options(data.source, data.n_per_class, data.size, data.synthetic_seed),
        progress=job.progress,
    )
    extraction = StoreExtraction(job.model, plan, out_dpath, Ranks.from_env(), sink=sink)
    summary = extraction.finished  # rerunning a complete extraction changes nothing
    if summary is None:
        _write_run_info(sink, out_dpath, config, result=None)  # says what is being made, even if the run is killed
        summary = extraction.run()
        _write_run_info(sink, out_dpath, config, result=summary)
        log_job(job, "extract", out_dpath, summary)  # after the files: a W&B failure costs no output
    if sink is None:
        return summary
    sink.close()  # the staging folder, if temporary, is removed
    return {**summary, "out": sink.url}  # the URL the store was written to


def _write_run_info(sink: StoreSink | None, out_dpath: Path, config: Any, result: Any) -> None:
    fpath = write_run_info(out_dpath, config, result=result)
    if sink is not None:
        sink.put(fpath)


main = launch("extract", lambda cfg: print(OmegaConf.to_yaml(OmegaConf.create(run(cfg)))), __name__)
