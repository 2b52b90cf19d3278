"""Many SAEs per pass: one training process reads each batch once and steps several SAEs (``sae_grid=``).

    python -m vlmsae.train data=acts data.acts=/acts/layer22 sae=batchtopk \\
        'sae_grid=[{expansion:4,k:8},{expansion:8,k:8,arch:topk},{expansion:8,k:16,lr:1e-4}]'

Each grid entry overrides the ``sae`` node (any of its keys) and may set ``lr``; every SAE gets its own
Adam + warmup scheduler, the same per-step mechanics as :class:`vlmsae.lit.module.SAELitModule` (the
shared functions of :mod:`vlmsae.lit.module`), and with the same seed and data order ends with exactly
the weights a separate single-SAE run would. Run dir: ``sae_<i>/`` per SAE (``sae/`` checkpoint,
``metrics.json``, ``latent_density.json``), ``metrics.json`` (every SAE's metrics by name),
``run_info.json``, and one ``checkpoints/last.ckpt`` holding every SAE and optimizer (resume restores all).
Logging: the job's one logger run (csv / W&B) with each SAE's scalars under ``sae_<i>/train/...``.
All SAEs share the job's device; spreading them over several GPUs is future work.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vlmsae.lit.fit import (
    FitPlan,
    adam_steps,
    build_datamodule,
    build_logger,
    build_trainer,
    final_checkpoint,
    training_source,
)
from vlmsae.lit.loggers import RestoreLogHistory
from vlmsae.lit.module import (
    DENSE_FREQ,
    LinearWarmup,
    NonFiniteLossError,
    check_input,
    checkpoint_note,
    init_sae_from_batches,
    optimizer_lr,
    sae_update,
    train_metrics,
    val_summary,
    val_update,
    weights_finite,
)
from vlmsae.lit.resume import history_dpath
from vlmsae.metrics.reconstruction import ReconstructionAccumulator
from vlmsae.sae import SAEConfig, build_sae, default_lr, save_sae
from vlmsae.sae.precision import check_master_weights, check_trainer_precision
from vlmsae.utils.io import atomic_write_json
from vlmsae.utils.provenance import write_run_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridSAE:
    """One SAE of a grid: its folder name, the overrides it came from, resolved config and learning rate."""

    name: str
    overrides: dict[str, Any]
    sae_config: dict[str, Any]
    lr: float


def resolve_grid(grid: Any, sae_node: dict[str, Any], d_in: int, lr: float | None) -> list[GridSAE]:
    """``sae_grid`` (a list of overrides of the ``sae`` node, each with an optional ``lr``) as resolved SAEs."""
    if not isinstance(grid, (list, tuple)) or not grid or not all(isinstance(e, dict) for e in grid):
        raise ValueError(
            f"sae_grid={grid!r}: expected a non-empty list of overrides of the sae node, e.g. "
            "sae_grid='[{expansion:4,k:8},{expansion:8,k:8,arch:topk,lr:1e-4}]'"
        )
    out = []
    for i, entry in enumerate(grid):
        overrides = dict(entry)
        entry_lr = overrides.pop("lr", None)
        node = {**sae_node, **overrides}
        if "expansion" in overrides and "n_latents" not in overrides:
            node["n_latents"] = None  # a grid expansion wins over the node's explicit width
        try:
            cfg = SAEConfig.from_schema(node, d_in=d_in).to_dict()
        except (ValueError, TypeError) as err:
            raise ValueError(f"sae_grid entry {i} {dict(entry)}: {err}") from err
        lr_i = float(entry_lr) if entry_lr is not None else (float(lr) if lr is not None else None)
        out.append(GridSAE(f"sae_{i}", dict(entry), cfg, lr_i if lr_i is not None else default_lr(cfg["n_latents"])))
    return out


class ManySAELitModule(L.LightningModule):
    """Trains several SAEs on each batch, each with its own optimizer and scheduler (manual optimisation)."""

    def __init__(
        self,
        sae_configs: list[dict[str, Any]],
        lrs: list[float],
        names: list[str],
        warmup_steps: int = 1000,
        grad_clip: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        log_every_n_steps: int = 50,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.saes = torch.nn.ModuleList(
            build_sae(SAEConfig(**{**c, "group_fractions": _tuple_or_none(c.get("group_fractions"))}), seed=seed)
            for c in sae_configs
        )
        self.lrs = [float(lr) for lr in lrs]
        self.names = list(names)
        self.automatic_optimization = False
        self.val_metrics: list[dict[str, Any]] = [{} for _ in sae_configs]
        self._vals: list[ReconstructionAccumulator] = []

    def on_fit_start(self) -> None:
        precision = check_trainer_precision(self.trainer.precision)
        for sae in self.saes:
            check_master_weights(sae, precision)
            sae.trainer_precision = precision

    def configure_optimizers(self):
        betas = tuple(self.hparams.betas)
        optimizers = [
            torch.optim.Adam(s.parameters(), lr=lr, betas=betas, fused=True) for s, lr in zip(self.saes, self.lrs)
        ]
        schedulers = [
            {
                "scheduler": torch.optim.lr_scheduler.LambdaLR(o, LinearWarmup(self.hparams.warmup_steps)),
                "interval": "step",
            }
            for o in optimizers
        ]
        return optimizers, schedulers

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x_BD = batch.float()
        step = int(self.global_step)
        check_input(self, x_BD, step)
        optimizers, schedulers = _as_list(self.optimizers()), _as_list(self.lr_schedulers())
        log_now = step % max(1, int(self.hparams.log_every_n_steps)) == 0
        losses = []
        for i, sae in enumerate(self.saes):
            last = i == len(self.saes) - 1  # only one wrapped step per batch: Lightning counts each as a global step
            out = sae_update(
                self, sae, x_BD, optimizers[i], schedulers[i], self.hparams.grad_clip, step, lightning_step=last
            )
            losses.append(out["loss"].detach())
            if log_now:
                metrics = train_metrics(sae, x_BD, out, optimizer_lr(optimizers[i]))
                self.log_dict({f"{self.names[i]}/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False)
        return torch.stack(losses).sum()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for name, sae in zip(self.names, self.saes):
            if not weights_finite(sae):
                raise NonFiniteLossError(
                    f"refusing to save a checkpoint with non-finite weights in {name} at step {self.global_step}; "
                    f"{checkpoint_note(self)}"
                )

    def on_validation_epoch_start(self) -> None:
        self._vals = [
            ReconstructionAccumulator(s.n_latents, DENSE_FREQ, d_in=s.d_in, device=self.device) for s in self.saes
        ]

    @torch.no_grad()
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for val, sae in zip(self._vals, self.saes):
            val_update(val, sae, batch.float())

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size != 1:
            raise RuntimeError("sae_grid trains on one device: use trainer.devices=1 (DDP is not supported)")
        for i, (val, sae) in enumerate(zip(self._vals, self.saes)):
            if val.n == 0:
                continue
            metrics, self.val_metrics[i], _ = val_summary(val, sae, int(self.global_step))
            self.log_dict({f"{self.names[i]}/val/{k}": float(x) for k, x in metrics.items()}, on_epoch=True)


def fit_many(plan: FitPlan, grid: list[GridSAE], out_dpath: Path, callbacks: list | None = None) -> dict[str, Any]:
    """Train every SAE of ``grid`` in one pass over ``plan``'s data; returns {name: final metrics}."""
    warnings.filterwarnings("ignore", message=".*pre-optimization state.*")
    warnings.filterwarnings("ignore", message=".*dirpath has changed from.*")
    t, config, resume_ckpt = plan.trainer, plan.config, plan.resume_ckpt
    if int(t.num_nodes) != 1 or str(t.devices) != "1":
        raise ValueError(
            f"sae_grid trains on one device; got trainer.devices={t.devices}, num_nodes={t.num_nodes}: "
            "use trainer.devices=1 (or a multirun of single SAEs to spread over GPUs)"
        )
    resumed_from = str(resume_ckpt) if resume_ckpt else None
    write_run_info(out_dpath, config, status="running", resumed_from=resumed_from)
    L.seed_everything(plan.seed, workers=True, verbose=False)
    datamodule = build_datamodule(plan.source, plan.data, plan.model, t.limit_val_batches, plan.seed)
    module = ManySAELitModule(
        [g.sae_config for g in grid],
        [g.lr for g in grid],
        [g.name for g in grid],
        warmup_steps=int(t.warmup_steps),
        grad_clip=float(t.gradient_clip_val),
        log_every_n_steps=int(t.log_every_n_steps),
        seed=plan.seed,
    )
    logger, _ = build_logger(plan.logger, out_dpath, resume_ckpt, config)
    callbacks = list(callbacks or [])
    if resume_ckpt is not None and logger:
        callbacks.append(RestoreLogHistory(history_dpath(resume_ckpt)))
    trainer, checkpoint, ckpt_dpath = build_trainer(t, logger, callbacks, out_dpath)
    try:
        if resume_ckpt is None:  # each SAE's init reads the same first batches a separate run would
            for sae in module.saes:
                init_sae_from_batches(sae, datamodule.first_batches(max(1, int(t.scale_batches))))
        trainer.fit(module, datamodule=datamodule, ckpt_path=resumed_from)
        if trainer.interrupted:
            raise KeyboardInterrupt(f"training interrupted at step {trainer.global_step}; resume with resume=true")
        final_checkpoint(trainer, checkpoint, ckpt_dpath)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    except NonFiniteLossError as err:
        write_run_info(out_dpath, config, status="failed", error=str(err))
        raise
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
            import wandb

            wandb.finish()
    return _write_outputs(plan, grid, module, trainer, out_dpath, resumed_from)


def _write_outputs(plan, grid, module, trainer, out_dpath: Path, resumed_from) -> dict[str, Any]:
    step, src = int(trainer.global_step), plan.source
    source = training_source(plan, step)
    all_metrics = {}
    for g, sae, record, optimizer in zip(grid, module.saes, module.val_metrics, trainer.optimizers):
        metrics = {k: v for k, v in record.items() if k != "density_hist"}
        metrics.update(
            {
                "step": step,
                "optimizer_steps": adam_steps(optimizer),
                "lr": g.lr,
                "n_latents": g.sae_config["n_latents"],
                "k": g.sae_config["k"],
                "arch": g.sae_config["arch"],
                "layer": src.layer,
                "input_scale": float(sae.input_scale),
                "overrides": g.overrides,
            }
        )
        sae_dpath = out_dpath / g.name
        sae.cpu()
        save_sae(sae, sae_dpath / "sae", source=source)
        atomic_write_json(sae_dpath / "metrics.json", metrics)
        atomic_write_json(sae_dpath / "latent_density.json", record.get("density_hist", {}))
        write_run_info(sae_dpath / "sae", plan.config, metrics=metrics, sae_config=g.sae_config, lr=g.lr)
        all_metrics[g.name] = metrics
    atomic_write_json(out_dpath / "metrics.json", all_metrics)
    write_run_info(out_dpath, plan.config, status="done", resumed_from=resumed_from, metrics=all_metrics)
    log.info("%d SAEs saved under %s (step %d)", len(grid), out_dpath, step)
    return all_metrics


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _tuple_or_none(value):
    return None if value is None else tuple(float(f) for f in value)
