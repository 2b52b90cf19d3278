"""The SAE training step (METHOD §2): the one the plain loop, the Lightning module and the benchmark call.

    optimizer, scheduler = make_optimizer(sae.parameters(), default_lr(sae.n_latents), warmup_steps=1000)
    for x_BD in batches:
        out = sae_step(sae, x_BD, optimizer, scheduler)

One step, in this order: loss -> backward (float32, :mod:`vlmsae.sae.precision`) -> remove the
decoder-parallel gradient -> clip the gradient norm -> Adam -> unit-norm decoder rows -> warmup
scheduler. A trainer adds its own machinery through arguments instead of copying the step:
``check`` sees the loss outputs before anything changes (Lightning: the DDP dead-latent sync and the
NaN guard that keeps the last checkpoint good), ``backward`` replaces ``loss.backward()`` (Lightning's
``manual_backward``, which DDP needs), ``loss_fn`` replaces ``sae.loss`` (the benchmark's dense reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.mechanics import constrain_decoder_grad_, normalize_decoder_
from vlmsae.sae.precision import fp32_region


def default_lr(n_latents: int) -> float:
    """METHOD §2: lr = 2e-4 / sqrt(F / 2^14)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


class LinearWarmup:
    """LR multiplier rising linearly to 1 over ``warmup_steps`` then constant (picklable, unlike a lambda)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = max(0, int(warmup_steps))

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / max(self.warmup_steps, 1))


def make_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam (fused: one kernel over all parameters, ~20x faster than the loop on CPU) and its linear warmup."""
    optimizer = torch.optim.Adam(params, lr=float(lr), betas=tuple(betas), fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(warmup_steps))


def sae_step(
    sae: SAE,
    x_BD: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    grad_clip: float | None = 1.0,
    loss_fn: Callable[[SAE, torch.Tensor], dict] | None = None,
    check: Callable[[dict], None] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> dict:
    """One training step of ``sae`` on the raw batch ``x_BD`` (see the module docstring); returns the loss outputs.

    ``grad_clip`` None or 0: no clipping. ``optimizer`` must hold exactly ``sae``'s parameters.
    """
    out = sae.loss(x_BD) if loss_fn is None else loss_fn(sae, x_BD)
    if check is not None:
        check(out)
    optimizer.zero_grad(set_to_none=True)
    with fp32_region(x_BD.device):  # backward at full float32 precision too (vlmsae.sae.precision)
        (backward or torch.Tensor.backward)(out["loss"])
    constrain_decoder_grad_(sae)
    if grad_clip and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    optimizer.step()
    normalize_decoder_(sae)
    if scheduler is not None:
        scheduler.step()
    return out
