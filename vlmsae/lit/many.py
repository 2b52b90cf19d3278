"""Many SAEs per pass: one training process reads each batch once and steps several SAEs (``sae_grid=``).

    python -m vlmsae.train data=acts data.acts=/acts/layer22 sae=batchtopk \\
        'sae_grid=[{expansion:4,k:8},{expansion:8,k:8,arch:topk},{expansion:8,k:16,lr:1e-4}]'

Each grid entry overrides the ``sae`` node (any of its keys) and may set ``lr``; every SAE gets its own
Adam + warmup scheduler, the same per-step mechanics as :class:`vlmsae.lit.module.SAELitModule` (the
shared functions of :mod:`vlmsae.lit.module`), and with the same seed and data order ends with exactly
the weights a separate single-SAE run would. Run dir: ``sae_<i>/`` per SAE (``sae/`` checkpoint,
``metrics.json``, ``latent_density.json``, its logger run), ``metrics.json`` (every SAE's metrics by name),
``run_info.json``, and one ``checkpoints/last.ckpt`` holding every SAE and optimizer (resume restores all).

Logging: one logger run per SAE, with the metric names of a single-SAE run (``train/loss``, ``val/fve``):
``sae_<i>/csv/metrics.csv``, and with logger=wandb one W&B run per SAE (``sae_<i>/wandb/``, id in
``sae_<i>/wandb_id.txt``), all in the W&B group ``logger.group`` or, when unset, the pass's run dir name;
each run's config is the job's with ``sae`` and ``trainer.lr`` as that SAE's, plus ``grid`` (its name,
index and overrides). Resume continues every SAE's run (vlmsae.lit.loggers.RestoreLogHistory per SAE).

Devices: ``sae_devices`` places each SAE on a device (:func:`place_saes`): ``auto`` round-robins over the
visible CUDA devices when the trainer runs on a GPU (CPU otherwise), or a list gives one device per SAE
(``[0,1]``, ``[cuda:0,cpu]``). Each batch is copied once to every device in use.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers.logger import Logger

from vlmsae.lit.fit import (
    FitPlan,
    adam_steps,
    build_datamodule,
    build_logger,
    build_trainer,
    fit_to_end,
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
from vlmsae.utils.io import atomic_write_json, atomic_write_text
from vlmsae.utils.provenance import write_run_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridSAE:
    """One SAE of a grid: its folder name, the overrides it came from, resolved config and learning rate."""

    name: str
    overrides: dict[str, Any]
    sae_config: dict[str, Any]
    lr: float
    sae_node: dict[str, Any]  # the job's sae node with this entry's overrides (its logger run's config)


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
        lr_i = lr_i if lr_i is not None else default_lr(cfg["n_latents"])
        out.append(GridSAE(f"sae_{i}", dict(entry), cfg, lr_i, node))
    return out


def place_saes(n_saes: int, sae_devices: Any, n_cuda: int) -> list[str]:
    """The device of each of ``n_saes`` SAEs: ``auto`` = round-robin over ``n_cuda`` CUDA devices (CPU when 0),
    or a list with one entry per SAE (an int or ``cuda:<i>`` = that CUDA device, ``cpu``).

    ``n_cuda``: for ``auto``, the CUDA devices the trainer may use (0 when it runs on CPU); for a list, the
    visible ones (an index past them fails, naming it).
    """
    if sae_devices in (None, "auto"):
        return [f"cuda:{i % n_cuda}" if n_cuda else "cpu" for i in range(n_saes)]
    if not isinstance(sae_devices, (list, tuple)) or len(sae_devices) != n_saes:
        raise ValueError(
            f"sae_devices={sae_devices!r}: expected auto or a list of {n_saes} devices (one per sae_grid entry), "
            "e.g. sae_devices='[0,1]' or sae_devices='[cuda:0,cpu]'"
        )
    out = []
    for i, dev in enumerate(sae_devices):
        text = str(dev).strip().lower()
        if text == "cpu":
            out.append("cpu")
            continue
        index = text.removeprefix("cuda:").removeprefix("gpu:")
        if not index.isdigit():
            raise ValueError(f"sae_devices[{i}]={dev!r}: expected cpu, a CUDA index (0) or cuda:<index>")
        if int(index) >= n_cuda:
            raise ValueError(
                f"sae_devices[{i}]={dev!r}: there is no CUDA device {index} ({n_cuda} visible"
                f"{', CUDA_VISIBLE_DEVICES=' + repr(_visible()) if _visible() is not None else ''}); "
                f"use an index below {n_cuda}, cpu, or sae_devices=auto"
            )
        out.append(f"cuda:{int(index)}")
    return out


def _visible() -> str | None:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


class OneSAELogger(Logger):
    """Forwards one grid SAE's metrics (``sae_<i>/...``, prefix stripped) and the shared ones (``epoch``) to
    that SAE's own logger; the hyperparameters are not forwarded (the run's config was set at its creation)."""

    def __init__(self, name: str, inner: Logger):
        super().__init__()
        self.prefix, self.inner = f"{name}/", inner

    @property
    def name(self):
        return self.inner.name

    @property
    def version(self):
        return self.inner.version

    @property
    def save_dir(self):
        return self.inner.save_dir

    @property
    def log_dir(self):
        return getattr(self.inner, "log_dir", self.inner.save_dir)

    @property
    def experiment(self):
        return self.inner.experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        own = {k[len(self.prefix) :]: v for k, v in metrics.items() if k.startswith(self.prefix)}
        if own:
            own.update({k: v for k, v in metrics.items() if "/" not in k})
            self.inner.log_metrics(own, step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the module's hyperparameters list every SAE; each run's config is its own SAE's

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        self.inner.finalize(status)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.inner.after_save_checkpoint(checkpoint_callback)


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
        devices: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["devices"])  # placement is not part of the checkpointed SAEs
        self.saes = torch.nn.ModuleList(
            build_sae(SAEConfig(**{**c, "group_fractions": _tuple_or_none(c.get("group_fractions"))}), seed=seed)
            for c in sae_configs
        )
        self.lrs = [float(lr) for lr in lrs]
        self.names = list(names)
        self.sae_devices = list(devices) if devices is not None else None
        self.automatic_optimization = False
        self.val_metrics: list[dict[str, Any]] = [{} for _ in sae_configs]
        self._vals: list[ReconstructionAccumulator] = []

    def on_fit_start(self) -> None:
        precision = check_trainer_precision(self.trainer.precision)
        for sae in self.saes:
            check_master_weights(sae, precision)
            sae.trainer_precision = precision

    def on_train_start(self) -> None:
        self._place()  # after Lightning moved the module (and a resumed optimizer state) to its root device

    def on_validation_start(self) -> None:
        self._place()

    def _place(self) -> None:
        """Each SAE and its Adam state on its own device (``sae_devices``)."""
        if self.sae_devices is None:
            return
        optimizers = _as_list(self.optimizers()) if self.trainer.optimizers else []
        for i, (sae, dev) in enumerate(zip(self.saes, self.sae_devices)):
            sae.to(dev)
            if i < len(optimizers):
                for state in getattr(optimizers[i], "optimizer", optimizers[i]).state.values():
                    for key, value in state.items():
                        if isinstance(value, torch.Tensor):
                            state[key] = value.to(dev)

    def _on_devices(self, x_BD: torch.Tensor) -> list[torch.Tensor]:
        """``x_BD`` for each SAE, copied once to each device in use."""
        if self.sae_devices is None:
            return [x_BD] * len(self.saes)
        copies = {dev: x_BD.to(dev, non_blocking=True) for dev in dict.fromkeys(self.sae_devices)}
        return [copies[dev] for dev in self.sae_devices]

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
        for i, (sae, x_i_BD) in enumerate(zip(self.saes, self._on_devices(x_BD))):
            last = i == len(self.saes) - 1  # only one wrapped step per batch: Lightning counts each as a global step
            out = sae_update(
                self, sae, x_i_BD, optimizers[i], schedulers[i], self.hparams.grad_clip, step, lightning_step=last
            )
            losses.append(out["loss"].detach().to(self.device))
            if log_now:
                metrics = train_metrics(sae, x_i_BD, out, optimizer_lr(optimizers[i]))
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
            ReconstructionAccumulator(s.n_latents, DENSE_FREQ, d_in=s.d_in, device=next(s.parameters()).device)
            for s in self.saes
        ]

    @torch.no_grad()
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for val, sae, x_BD in zip(self._vals, self.saes, self._on_devices(batch.float())):
            val_update(val, sae, x_BD)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size != 1:
            raise RuntimeError("sae_grid trains on one device: use trainer.devices=1 (DDP is not supported)")
        for i, (val, sae) in enumerate(zip(self._vals, self.saes)):
            if val.n == 0:
                continue
            metrics, self.val_metrics[i], _ = val_summary(val, sae, int(self.global_step))
            self.log_dict({f"{self.names[i]}/val/{k}": float(x) for k, x in metrics.items()}, on_epoch=True)


def fit_many(
    plan: FitPlan, grid: list[GridSAE], out_dpath: Path, callbacks: list | None = None, sae_devices: Any = "auto"
) -> dict[str, Any]:
    """Train every SAE of ``grid`` in one pass over ``plan``'s data; returns {name: final metrics}.

    ``sae_devices``: where each SAE trains (:func:`place_saes`).
    """
    warnings.filterwarnings("ignore", message=".*pre-optimization state.*")
    warnings.filterwarnings("ignore", message=".*dirpath has changed from.*")
    t, config, resume_ckpt = plan.trainer, plan.config, plan.resume_ckpt
    if int(t.num_nodes) != 1 or str(t.devices) != "1":
        raise ValueError(
            f"sae_grid trains on one device; got trainer.devices={t.devices}, num_nodes={t.num_nodes}: "
            "use trainer.devices=1 (or a multirun of single SAEs to spread over GPUs)"
        )
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    n_cuda = torch.cuda.device_count() if on_gpu or sae_devices not in (None, "auto") else 0
    devices = place_saes(len(grid), sae_devices, n_cuda)
    log.info("sae_grid devices: %s", dict(zip([g.name for g in grid], devices)))
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
        devices=devices,
    )
    logger, restores, inner = _sae_loggers(plan, grid, out_dpath)
    callbacks = [*(callbacks or []), *restores]
    trainer, checkpoint, ckpt_dpath = build_trainer(t, logger, callbacks, out_dpath)
    try:
        if resume_ckpt is None:  # each SAE's init reads the same first batches a separate run would
            for sae in module.saes:
                init_sae_from_batches(sae, datamodule.first_batches(max(1, int(t.scale_batches))))
        fit_to_end(trainer, module, datamodule, resumed_from, checkpoint, ckpt_dpath)
    except NonFiniteLossError as err:
        write_run_info(out_dpath, config, status="failed", error=str(err))
        raise
    finally:
        for lg in inner:  # each SAE's W&B run (created with reinit="create_new", so not wandb.run)
            if type(lg).__name__ == "WandbLogger" and lg._experiment is not None:
                lg._experiment.finish()
    return _write_outputs(plan, grid, module, trainer, out_dpath, resumed_from)


def _sae_loggers(plan: FitPlan, grid: list[GridSAE], out_dpath: Path):
    """One logger run per SAE under ``<run>/sae_<i>/``: (the trainer's loggers, the resume callbacks, the
    SAEs' own loggers)."""
    if plan.logger.kind == "none":
        return False, [], []
    name = out_dpath.name if not out_dpath.name.startswith("job_") else f"{out_dpath.parent.name}/{out_dpath.name}"
    group = plan.logger.group or name
    wrapped, restores, inner = [], [], []
    for i, g in enumerate(grid):
        sae_dpath = out_dpath / g.name
        history = history_dpath(plan.resume_ckpt) / g.name if plan.resume_ckpt is not None else None
        label = ",".join(f"{k}={v}" for k, v in g.overrides.items())
        loggers, wandb_id = build_logger(
            plan.logger,
            sae_dpath,
            plan.resume_ckpt,
            sae_run_config(plan.config, g, i, group),
            history=history,
            name=f"{name}/{g.name} ({label})",
            group=group,
            reinit="create_new",  # several W&B runs live in this process at once
        )
        loggers = _as_list(loggers)
        if wandb_id:
            atomic_write_text(sae_dpath / "wandb_id.txt", wandb_id)  # resume continues this SAE's W&B run
        if history is not None:
            restores.append(RestoreLogHistory(history, wandb_id=wandb_id, loggers=loggers))
        wrapped += [OneSAELogger(g.name, lg) for lg in loggers]
        inner += loggers
    return wrapped, restores, inner


def sae_run_config(config: dict[str, Any], g: GridSAE, index: int, group: str) -> dict[str, Any]:
    """The config of one grid SAE's logger run: the job's, with ``sae`` and ``trainer.lr`` as this SAE's."""
    out = copy.deepcopy(config)
    out["sae"] = dict(g.sae_node)
    out["trainer"] = {**out.get("trainer", {}), "lr": g.lr}
    out["grid"] = {"name": g.name, "index": index, "group": group, "overrides": dict(g.overrides)}
    return out


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
