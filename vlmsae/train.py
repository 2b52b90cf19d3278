"""Train an SAE on vision-encoder activations (METHOD §2) with Lightning.

    python -m vlmsae.train model=clip_l14 sae=batchtopk sae.k=64 sae.expansion=16 \\
        data=acts data.acts=/acts/layer22 trainer=gpu trainer.max_steps=110000 logger=wandb
    python -m vlmsae.train -m layer=11,17,22,23 sae.expansion=1,2,4,8,16,64 sae.k=20 \\
        data=acts 'data.acts=/acts/layer${layer}'          # a sweep; summary in the sweep dir
    python -m vlmsae.train <same overrides>    # again after a crash: continues the killed run in its folder
    python -m vlmsae.train data=acts data.acts=/acts/layer22 \\
        'sae_grid=[{expansion:8,k:32},{expansion:16,k:64,arch:topk,lr:1e-4}]'   # many SAEs, one pass

Outputs (the Hydra run dir, listed in docs/outputs.md): ``sae/`` (the vlmsae.sae checkpoint: it takes raw
activations), ``metrics.json``, ``run_info.json``, ``checkpoints/last.ckpt`` (for resume), ``csv/`` and ``wandb/``.

``layer`` and ``tokens`` (top level) say what to train on. With ``data=acts`` they default to the
store's manifest and, when set, must agree with it (so a layer sweep whose ``data.acts`` forgot
the ``${layer}`` interpolation fails instead of training four times on one layer). With image
sources (``data=images``, ``data=tiny``) the activations are computed on the fly at that layer.

The work is done by :mod:`vlmsae.lit.fit` (data, datamodule, loggers, trainer, outputs) and
:mod:`vlmsae.lit.resume` (which checkpoint ``resume`` continues from).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from vlmsae.config import launch, pick, typed_job
from vlmsae.config.jobs.train import TrainJob
from vlmsae.utils.paths import hydra_chose_run_dir, run_dir


def run(cfg: DictConfig, out_dpath: str | Path | None = None, callbacks: list | None = None) -> dict:
    """Train one SAE as ``cfg`` says; returns the final validation metrics (also in metrics.json).

    ``callbacks``: extra Lightning callbacks (tests use them to interrupt a run or record steps).
    """
    from vlmsae.lit.fit import FitPlan, check_accelerator, fit_sae, resolve_grid, resolve_train_input
    from vlmsae.lit.resume import choose_run
    from vlmsae.lit.val_ms import val_ms_callbacks
    from vlmsae.sae.precision import check_trainer_precision

    job, config = typed_job(cfg, TrainJob)  # config: the record in run_info.json, W&B, what resume matches
    # the same command again continues its unfinished run in that run's folder (vlmsae.lit.resume)
    chosen = choose_run(job.resume, run_dir(out_dpath), config, new_dpath=hydra_chose_run_dir(out_dpath))
    if chosen.finished_metrics is not None:
        return chosen.finished_metrics
    out_dpath = chosen.out_dpath
    # Everything that can be wrong with the input is checked before any training starts.
    check_trainer_precision(job.trainer.precision)  # the SAE trains in float32 only (vlmsae.sae.precision)
    check_accelerator(job.trainer.accelerator)  # trainer=gpu on a machine without one: say so, name trainer=cpu
    rows = resolve_train_input(job.data, job.model, job.layer, job.tokens, job.tokens_k)
    callbacks = [*(callbacks or []), *val_ms_callbacks(job.val_ms, job.model, rows, bool(job.sae_grid))]
    plan = FitPlan(
        **pick(job, "model", "data", "trainer", "logger", "seed"),
        rows=rows,
        sae_config=job.sae.resolved(rows.d),
        resume_ckpt=chosen.resume_ckpt,
        config=config,
    )
    # many SAEs per pass, each reading the same batches
    grid = resolve_grid(job.sae_grid, job.sae, rows.d, job.trainer.lr) if job.sae_grid else None
    return fit_sae(plan, out_dpath, callbacks, grid=grid, sae_devices=job.sae_devices)


main = launch("train", run, __name__)  # Hydra calls run(cfg); its metrics are the job's return value
