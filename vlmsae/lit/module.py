"""The LightningModule that trains pure-torch SAEs from :mod:`vlmsae.sae` (METHOD §2): one SAE, or a grid of
them reading each batch once (``sae_grid=``); one SAE is a grid of one.

Manual optimisation, because the SAE step (:func:`vlmsae.sae.step.sae_step`) has its own order that Lightning's
automatic loop would hide, and so that a non-finite loss stops the run *before* the step (the last checkpoint
stays good). Each SAE has its own Adam and scheduler, so a grid SAE ends with exactly the weights of a separate
run. A single run's SAE is named ``""`` and logs ``train/loss``; a grid's are ``sae_<i>`` and log
``sae_<i>/train/loss``.

Units: the SAE takes raw activations (its input scale is inside). ``mse`` is per element in raw units; ``nmse``
is ||x - x_hat||^2 / ||x||^2; ``fve`` is 1 - ||x - x_hat||^2 / ||x - mean(x)||^2 over the rows seen; ``l0``
active latents per row; all from :class:`vlmsae.metrics.reconstruction.ReconstructionAccumulator`, except
``train/l0`` (the training encoder's, from ``sae.loss``). ``trainer.precision`` other than 32-true is refused
at fit start (:mod:`vlmsae.sae.precision`).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import numpy as np
import torch

from vlmsae.metrics.reconstruction import ReconstructionAccumulator
from vlmsae.sae.build import build_sae
from vlmsae.sae.config import SAEConfig
from vlmsae.sae.precision import check_master_weights, check_trainer_precision
from vlmsae.sae.step import default_lr, make_optimizer, sae_step

DENSE_FREQ = 0.1  # a latent firing on more than 10% of rows is "dense" (rarely interpretable)
DENSITY_EDGES = np.arange(-7.0, 0.01, 0.25)  # log10 firing-frequency bins for the density histogram


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or weights; the message holds the step and batch statistics."""


def batch_stats(x_BD: torch.Tensor) -> str:
    """One line describing a batch: what a NaN report needs to tell bad data from divergence."""
    x = x_BD.detach().float()
    finite = torch.isfinite(x)
    xf = x[finite] if not bool(finite.all()) else x
    parts = [f"{x.shape[0]} rows x {x.shape[1]}", f"{int((~finite).sum())} non-finite values"]
    if xf.numel():
        parts += [f"mean {xf.mean():.4g}", f"std {xf.std():.4g}", f"min {xf.min():.4g}", f"max {xf.max():.4g}"]
        parts.append(f"max row norm {torch.nan_to_num(x, 0.0, 0.0, 0.0).norm(dim=1).max():.4g}")
    return ", ".join(parts)


class SAELitModule(L.LightningModule):
    """Trains ``build_sae(c)`` for each resolved config ``c`` of ``sae_configs`` (one SAEConfig: a single SAE) on
    every batch; ``lrs``: one per SAE (None: :func:`vlmsae.sae.default_lr`); ``names``: see the module docstring;
    ``devices``: one per SAE (``sae_devices``; None: where Lightning puts the module)."""

    def __init__(
        self,
        sae_configs: SAEConfig | list[SAEConfig],
        lrs: list[float | None] | None = None,
        names: list[str] | None = None,
        warmup_steps: int = 1000,
        grad_clip: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        log_every_n_steps: int = 50,
        seed: int = 0,
        devices: list[str] | None = None,
    ):
        super().__init__()
        configs = [sae_configs] if isinstance(sae_configs, SAEConfig) else list(sae_configs)
        # placement is not part of the checkpointed SAEs; the configs are recorded as plain data (no pickled class)
        self.save_hyperparameters(ignore=["devices", "sae_configs"])
        self.hparams["sae_configs"] = [c.to_dict() for c in configs]
        self.saes = torch.nn.ModuleList(build_sae(c, seed=seed) for c in configs)
        lrs = list(lrs) if lrs is not None else [None] * len(configs)
        self.lrs = [float(lr) if lr is not None else default_lr(s.n_latents) for lr, s in zip(lrs, self.saes)]
        self.names = list(names) if names is not None else [""] * len(configs)
        self.sae_devices = list(devices) if devices is not None else None
        self.automatic_optimization = False
        self.val_metrics: list[dict[str, Any]] = [{} for _ in configs]
        self._vals: list[ReconstructionAccumulator] = []

    @property
    def sae(self):
        """The SAE of a single-SAE run (a grid has none: use ``saes``)."""
        if len(self.saes) != 1:
            raise AttributeError("sae")  # nn.Module.__getattr__ then names the missing attribute
        return self.saes[0]

    def _key(self, i: int, metric: str) -> str:
        return f"{self.names[i]}/{metric}" if self.names[i] else metric

    # ------------------------------------------------------------------ optimisation
    def on_fit_start(self) -> None:
        """Enforce the precision policy (float32 master weights) and note the trainer's setting for config.json."""
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
        warmup = self.hparams.warmup_steps
        pairs = [make_optimizer(s.parameters(), lr, betas, warmup) for s, lr in zip(self.saes, self.lrs)]
        return [o for o, _ in pairs], [{"scheduler": s, "interval": "step"} for _, s in pairs]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x_BD = batch.float()
        step = int(self.global_step)
        check_input(self, x_BD, step)
        optimizers, schedulers = _as_list(self.optimizers()), _as_list(self.lr_schedulers())
        log_now = step % max(1, int(self.hparams.log_every_n_steps)) == 0
        losses = []
        for i, (sae, x_i_BD) in enumerate(zip(self.saes, self._on_devices(x_BD))):
            # Lightning counts every wrapped optimizer step as a global step: step the last SAE's wrapped
            # optimizer and the others' raw ones (the maths is the same).
            last = i == len(self.saes) - 1
            optimizer = optimizers[i] if last else getattr(optimizers[i], "optimizer", optimizers[i])
            out = self._step(sae, x_i_BD, optimizer, schedulers[i], step)
            losses.append(out["loss"].detach().to(self.device))
            if log_now:
                metrics = train_metrics(sae, x_i_BD, out, optimizer_lr(optimizer))
                self.log_dict({self._key(i, k): v for k, v in metrics.items()}, on_step=True, on_epoch=False)
                self.log(self._key(i, "train/fve_bar"), metrics["train/fve"], prog_bar=True, logger=False)
        return torch.stack(losses).sum()

    def _step(self, sae, x_BD: torch.Tensor, optimizer, scheduler, step: int) -> dict:
        """:func:`vlmsae.sae.step.sae_step` with DDP's backward and dead-latent sync and the non-finite guards."""

        def check(out: dict) -> None:  # before anything changes: the last checkpoint stays good
            sync_dead_tracking(sae, out["fired_F"], x_BD.shape[0])
            loss = out["loss"]
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(
                    f"loss is {float(loss.detach())} at step {step} (recon {float(out['recon']):.4g}, "
                    f"aux {float(out['aux']):.4g}, l0 {float(out['l0']):.4g}, lr {optimizer_lr(optimizer):.3g}): "
                    f"batch {batch_stats(x_BD)}; training stopped before the optimizer step, "
                    f"{checkpoint_note(self)}. Lower trainer.lr or check the activations."
                )

        clip = self.hparams.grad_clip
        out = sae_step(sae, x_BD, optimizer, scheduler, grad_clip=clip, check=check, backward=self.manual_backward)
        if not weights_finite(sae):
            raise NonFiniteLossError(
                f"weights became non-finite in the optimizer step of step {step} (loss {float(out['loss']):.4g}): "
                f"batch {batch_stats(x_BD)}; {checkpoint_note(self)}. Lower trainer.lr."
            )
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for name, sae in zip(self.names, self.saes):
            if not weights_finite(sae):
                where = f" in {name}" if name else ""
                raise NonFiniteLossError(
                    f"refusing to save a checkpoint with non-finite weights{where} at step {self.global_step}; "
                    f"{checkpoint_note(self)}"
                )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A single-SAE checkpoint written before one SAE became a grid of one names its weights ``sae.*``."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("sae.")]:
            state["saes.0." + key[len("sae.") :]] = state.pop(key)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._vals = [
            ReconstructionAccumulator(s.n_latents, DENSE_FREQ, d_in=s.d_in, device=s.W_dec.device) for s in self.saes
        ]

    @torch.no_grad()
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for val, sae, x_BD in zip(self._vals, self.saes, self._on_devices(batch.float())):
            codes_BF = _encode(sae, x_BD)
            val.update(x_BD, sae.decode(codes_BF).float(), codes_BF)

    def _val_over_ranks(self, val: ReconstructionAccumulator) -> ReconstructionAccumulator:
        """This rank's validation sums, merged with every other rank's (DDP)."""
        if self.trainer.world_size == 1:
            return val
        gathered = self.all_gather(val.state_dict())  # each tensor gains a leading [world] dim
        merged = ReconstructionAccumulator(dense_threshold=DENSE_FREQ)
        for r in range(self.trainer.world_size):
            merged.merge(ReconstructionAccumulator.from_state({k: t[r] for k, t in gathered.items()}))
        return merged

    def on_validation_epoch_end(self) -> None:
        for i, (val, sae) in enumerate(zip(self._vals, self.saes)):
            val = self._val_over_ranks(val)
            if val.n == 0:
                continue
            metrics, self.val_metrics[i], freq_F = val_summary(val, sae, int(self.global_step))
            self.log_dict(
                {self._key(i, f"val/{k}"): float(x) for k, x in metrics.items()},
                on_step=False,
                on_epoch=True,
                rank_zero_only=True,
            )  # already merged over ranks above
            self._log_histogram(i, freq_F)

    def _log_histogram(self, i: int, freq_F: np.ndarray) -> None:
        """Latent density histogram to SAE ``i``'s W&B run (other loggers get the scalar summaries only)."""
        for logger in self.loggers:
            inner = getattr(logger, "inner", logger)  # a grid SAE's own logger (vlmsae.lit.fit.OneSAELogger)
            if type(inner).__name__ != "WandbLogger" or getattr(logger, "sae_name", self.names[i]) != self.names[i]:
                continue
            import wandb

            log10 = np.log10(np.clip(freq_F, 1e-8, None))
            inner.experiment.log(
                {"val/latent_density_log10": wandb.Histogram(log10), "trainer/global_step": self.global_step}
            )


def _encode(sae, x_BD: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # before the threshold exists encode() uses top-k: expected here
        warnings.simplefilter("ignore", UserWarning)
        return sae.encode(x_BD)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def checkpoint_note(lm: L.LightningModule) -> str:
    """Where the last good checkpoint is (for error messages)."""
    callback = getattr(lm.trainer, "checkpoint_callback", None) if lm._trainer is not None else None
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return f"the last good checkpoint is {path}" if path else "no checkpoint was saved yet"


def check_input(lm: L.LightningModule, x_BD: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(x_BD).all()):
        raise NonFiniteLossError(
            f"non-finite input at step {step} (the batch itself holds NaN/inf; check the activation store): "
            f"batch {batch_stats(x_BD)}; training stopped, {checkpoint_note(lm)}"
        )


def weights_finite(sae) -> bool:
    sums = torch.stack([p.detach().float().sum() for p in sae.parameters()])
    return bool(torch.isfinite(sums).all())


def optimizer_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


@torch.no_grad()
def sync_dead_tracking(sae, fired_F: torch.Tensor, batch_size: int) -> None:
    """DDP: a latent is alive if it fired on any rank, and every rank's rows count as samples.

    ``sae.loss`` updated ``samples_since_fired`` from this rank's batch only; this adds the
    other ranks' rows and zeroes the latents that fired elsewhere, so the dead mask (and AuxK)
    follows the global stream and the buffers stay identical on every rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    fired_any_F = fired_F.to(torch.int32)
    dist.all_reduce(fired_any_F, op=dist.ReduceOp.MAX)
    counts_F = sae.samples_since_fired
    counts_F.add_(batch_size * (dist.get_world_size() - 1))
    counts_F.masked_fill_(fired_any_F.bool(), 0)


@torch.no_grad()
def train_metrics(sae, x_BD: torch.Tensor, out: dict, lr: float) -> dict[str, float]:
    """The ``train/*`` scalars of one step (see the module docstring for the units)."""
    codes_BF = _encode(sae, x_BD)  # inference codes, for firing frequencies
    batch = ReconstructionAccumulator(sae.n_latents, DENSE_FREQ, device=x_BD.device)
    batch.update(x_BD, out["x_hat"].float(), codes_BF)
    rec = batch.result()
    metrics = {
        "train/loss": out["loss"].detach(),
        "train/recon": out["recon"],
        "train/mse": rec["mse"],
        "train/nmse": rec["normalized_mse"],
        "train/fve": rec["fve"],
        "train/l0": out["l0"],
        "train/aux_loss": out["aux"],
        "train/dead_fraction": sae.dead_latents.float().mean(),
        "train/dense_fraction": rec["dense_fraction"],
        "train/lr": lr,
    }
    return {k: float(v) for k, v in metrics.items()}


def val_summary(val: ReconstructionAccumulator, sae, step: int) -> tuple[dict, dict, np.ndarray]:
    """(scalar metrics, metrics.json's record with the density histogram, firing frequencies) of a validation."""
    rec = val.result()
    freq_F = rec["freq_F"].numpy()
    metrics = {
        "mse": rec["mse"],
        "nmse": rec["normalized_mse"],
        "fve": rec["fve"],
        "l0": rec["l0"],
        "dead_fraction": float(sae.dead_latents.float().mean()),  # the trainer's dead mask (AuxK)
        "dense_fraction": rec["dense_fraction"],
        "never_fired_val_fraction": rec["dead_fraction"],  # no validation row fired it
    }
    hist_counts, _ = np.histogram(np.log10(freq_F[freq_F > 0]), bins=DENSITY_EDGES)
    record = {
        **metrics,
        "step": int(step),
        "n_val_rows": int(val.n),
        "density_hist": {
            "log10_freq_edges": DENSITY_EDGES.tolist(),
            "counts": hist_counts.tolist(),
            "never_fired": int((freq_F == 0).sum()),
        },
    }
    return metrics, record, freq_F
