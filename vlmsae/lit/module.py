"""The LightningModule that trains one pure-torch SAE from :mod:`vlmsae.sae` (METHOD §2).

Manual optimisation, because the SAE step has its own order that Lightning's automatic loop
would hide: loss -> backward -> remove the decoder-parallel gradient -> clip the gradient norm
(1.0) -> Adam step -> renormalise the decoder rows -> warmup scheduler. Doing it by hand also lets
a non-finite loss stop the run *before* the step, so the last saved checkpoint stays good.

Units: the SAE takes raw activations and keeps a scalar input scale inside (set once from the
first batches, see :meth:`SAELitModule.init_from_batches`). Logged ``mse`` is the mean squared
error per element in raw activation units; ``nmse`` is ||x - x_hat||^2 / ||x||^2; ``fve`` is
1 - ||x - x_hat||^2 / ||x - mean(x)||^2 (summed over the rows seen); ``l0`` active latents per row.
These, the dense fractions and the validation ``l0`` come from
:class:`vlmsae.metrics.reconstruction.ReconstructionAccumulator` (what ``vlmsae.monosemanticity``
reports too); ``train/l0`` is the training encoder's, from ``sae.loss``.

Precision: the SAE keeps float32 weights and computes forward and backward in float32
(:mod:`vlmsae.sae.precision`); ``trainer.precision`` other than 32-true is refused at fit start,
and the setting is recorded in the checkpoint's config.json.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
import numpy as np
import torch

from vlmsae.metrics.reconstruction import ReconstructionAccumulator
from vlmsae.sae.build import build_sae
from vlmsae.sae.config import SAEConfig
from vlmsae.sae.fit import default_lr
from vlmsae.sae.mechanics import (
    constrain_decoder_grad_,
    estimate_input_scale,
    init_b_dec_geometric_median_,
    normalize_decoder_,
    set_input_scale_,
)
from vlmsae.sae.precision import check_master_weights, check_trainer_precision, fp32_region

DENSE_FREQ = 0.1  # a latent firing on more than 10% of rows is "dense" (rarely interpretable)
DENSITY_EDGES = np.arange(-7.0, 0.01, 0.25)  # log10 firing-frequency bins for the density histogram


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or weights; the message holds the step and batch statistics."""


class LinearWarmup:
    """LR multiplier rising linearly to 1 over ``warmup_steps`` then constant (picklable, unlike a lambda)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = max(0, int(warmup_steps))

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


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
    """Trains ``vlmsae.sae.build_sae(SAEConfig(**sae_config))``; see the module docstring."""

    def __init__(
        self,
        sae_config: dict[str, Any],
        lr: float | None = None,
        warmup_steps: int = 1000,
        grad_clip: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        log_every_n_steps: int = 50,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        cfg = SAEConfig(**{**sae_config, "group_fractions": _tuple_or_none(sae_config.get("group_fractions"))})
        self.sae = build_sae(cfg, seed=seed)
        self.lr = float(lr) if lr is not None else default_lr(cfg.n_latents)  # METHOD §2: 2e-4 / sqrt(F / 2^14)
        self.automatic_optimization = False
        self.val_metrics: dict[str, Any] = {}
        self._val = ReconstructionAccumulator(dense_threshold=DENSE_FREQ)  # renewed per validation epoch

    # ------------------------------------------------------------------ init from data
    @torch.no_grad()
    def init_from_batches(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Input scale from the given batches (paper: ~100), then b_dec = geometric median of the first.

        Called once before step 0 (never on resume: both live in the checkpoint).
        """
        return init_sae_from_batches(self.sae, batches)

    # ------------------------------------------------------------------ optimisation
    def on_fit_start(self) -> None:
        """Enforce the precision policy (float32 master weights) and note the trainer's setting for config.json."""
        precision = check_trainer_precision(self.trainer.precision)
        check_master_weights(self.sae, precision)
        self.sae.trainer_precision = precision

    def configure_optimizers(self):
        betas = tuple(self.hparams.betas)
        # fused=True: one kernel over all parameters, ~20x faster than the loop on CPU.
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr, betas=betas, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(self.hparams.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _checkpoint_note(self) -> str:
        return checkpoint_note(self)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x_BD = batch.float()
        step = int(self.global_step)
        check_input(self, x_BD, step)
        optimizer = self.optimizers()
        out = sae_update(self, self.sae, x_BD, optimizer, self.lr_schedulers(), self.hparams.grad_clip, step)
        every = max(1, int(self.hparams.log_every_n_steps))
        if step % every == 0:
            self._log_train(x_BD, out)
        return out["loss"].detach()

    def _sync_dead_tracking(self, fired_F: torch.Tensor, batch_size: int) -> None:
        sync_dead_tracking(self.sae, fired_F, batch_size)

    def _current_lr(self) -> float:
        try:
            return float(self.optimizers().param_groups[0]["lr"])
        except Exception:  # before configure_optimizers
            return self.lr

    def _weights_finite(self) -> bool:
        return weights_finite(self.sae)

    @torch.no_grad()
    def _log_train(self, x_BD: torch.Tensor, out: dict) -> None:
        metrics = train_metrics(self.sae, x_BD, out, self._current_lr())
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self.log("train/fve_bar", metrics["train/fve"], prog_bar=True, logger=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if not self._weights_finite():
            raise NonFiniteLossError(
                f"refusing to save a checkpoint with non-finite weights at step {self.global_step}; "
                f"{self._checkpoint_note()}"
            )

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = ReconstructionAccumulator(self.sae.n_latents, DENSE_FREQ, d_in=self.sae.d_in, device=self.device)

    @torch.no_grad()
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        val_update(self._val, self.sae, batch.float())

    def _val_over_ranks(self) -> ReconstructionAccumulator:
        """This rank's validation sums, merged with every other rank's (DDP)."""
        if self.trainer.world_size == 1:
            return self._val
        gathered = self.all_gather(self._val.state_dict())  # each tensor gains a leading [world] dim
        merged = ReconstructionAccumulator(dense_threshold=DENSE_FREQ)
        for r in range(self.trainer.world_size):
            merged.merge(ReconstructionAccumulator.from_state({k: t[r] for k, t in gathered.items()}))
        return merged

    def on_validation_epoch_end(self) -> None:
        val = self._val_over_ranks()
        if val.n == 0:
            return
        metrics, self.val_metrics, freq_F = val_summary(val, self.sae, int(self.global_step))
        self.log_dict(
            {f"val/{k}": float(x) for k, x in metrics.items()}, on_step=False, on_epoch=True, rank_zero_only=True
        )  # already merged over ranks above
        self._log_histogram(freq_F)

    def _log_histogram(self, freq_F: np.ndarray) -> None:
        """Latent density histogram to W&B (other loggers get the scalar summaries only)."""
        for logger in self.loggers:
            if type(logger).__name__ != "WandbLogger":
                continue
            import wandb

            log10 = np.log10(np.clip(freq_F, 1e-8, None))
            logger.experiment.log(
                {"val/latent_density_log10": wandb.Histogram(log10), "trainer/global_step": self.global_step}
            )


def _tuple_or_none(value):
    return None if value is None else tuple(float(f) for f in value)


# ---------------------------------------------------------------------- the per-SAE pieces
# Module-level so that SAELitModule (one SAE) and vlmsae.lit.many.ManySAELitModule (several SAEs on one
# batch) step, log and validate each SAE the same way: a many-SAE pass equals separate runs exactly.


@torch.no_grad()
def init_sae_from_batches(sae, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Input scale from ``batches`` (paper: ~100), then b_dec = geometric median of the first batch."""
    kept: dict[str, Any] = {"first": None, "rows": 0}

    def stream():  # one batch in memory at a time (100 x 4096 x 1024 floats would be 1.6 GB)
        for batch in batches:
            if kept["first"] is None:
                kept["first"] = batch.float()
            kept["rows"] += batch.shape[0]
            yield batch

    scale = estimate_input_scale(stream(), sae.cfg.d_in)  # raises on an empty stream
    set_input_scale_(sae, scale)
    init_b_dec_geometric_median_(sae, kept["first"].to(sae.b_dec.device))
    return {"input_scale": scale, "init_rows": kept["rows"]}


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


def sae_update(lm, sae, x_BD, optimizer, scheduler, grad_clip, step: int, lightning_step: bool = True) -> dict:
    """One training step of ``sae`` on ``x_BD`` (METHOD §2): loss -> backward -> decoder-parallel gradient
    removed -> clip -> Adam -> decoder rows renormalised -> scheduler. Returns ``sae.loss``'s outputs.

    ``lightning_step=False`` steps the raw optimizer: with several optimizers Lightning counts every
    wrapped ``step()`` as a global step, so a many-SAE pass wraps only its last one (the maths is the same).
    """
    out = sae.loss(x_BD)
    sync_dead_tracking(sae, out["fired_F"], x_BD.shape[0])
    loss = out["loss"]
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(
            f"loss is {float(loss.detach())} at step {step} (recon {float(out['recon']):.4g}, "
            f"aux {float(out['aux']):.4g}, "
            f"l0 {float(out['l0']):.4g}, lr {optimizer_lr(optimizer):.3g}): batch {batch_stats(x_BD)}; "
            f"training stopped before the optimizer step, {checkpoint_note(lm)}. "
            "Lower trainer.lr or check the activations."
        )
    optimizer.zero_grad(set_to_none=True)
    with fp32_region(x_BD.device):  # the SAE's precision policy covers backward too (vlmsae.sae.precision)
        lm.manual_backward(loss)
    constrain_decoder_grad_(sae)
    if grad_clip and grad_clip > 0:
        lm.clip_gradients(optimizer, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm")
    if lightning_step:
        optimizer.step()
    else:
        getattr(optimizer, "optimizer", optimizer).step()
    normalize_decoder_(sae)
    scheduler.step()
    if not weights_finite(sae):
        raise NonFiniteLossError(
            f"weights became non-finite in the optimizer step of step {step} (loss {float(loss):.4g}): "
            f"batch {batch_stats(x_BD)}; {checkpoint_note(lm)}. Lower trainer.lr."
        )
    return out


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
    with warnings.catch_warnings():  # before the threshold exists encode() uses top-k: expected here
        warnings.simplefilter("ignore", UserWarning)
        codes_BF = sae.encode(x_BD)  # inference codes, for firing frequencies
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


@torch.no_grad()
def val_update(val: ReconstructionAccumulator, sae, x_BD: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        codes_BF = sae.encode(x_BD)
    val.update(x_BD, sae.decode(codes_BF).float(), codes_BF)


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
