"""A plain Adam loop for SAEs: quick fits on synthetic or cached activations (tests, demo, notebooks).

The real trainer is the Lightning module in ``vlmsae.lit`` (warmup schedule, checkpoints, DDP,
logging); both take the same step (:func:`vlmsae.sae.step.sae_step`), so an SAE trained here behaves
like one trained there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.mechanics import init_from_batches_
from vlmsae.sae.step import default_lr, make_optimizer, sae_step


def train_steps(
    sae: SAE,
    batches: Iterable[torch.Tensor],
    lr: float | None = None,
    *,
    init: bool = True,
    warmup_steps: int = 0,
    grad_clip: float | None = 1.0,
    progress: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, list[float]]:
    """Train ``sae`` in place with Adam(0.9, 0.999) on raw-activation ``batches``; returns the loss history.

    Each step is :func:`vlmsae.sae.step.sae_step`. ``init=True`` first sets the input scale and the
    geometric-median b_dec from the first batch (the Lightning trainer estimates the scale from more batches).
    ``lr`` None = :func:`default_lr`; ``warmup_steps`` ramps it linearly from 0.
    The returned dict has one float per step for "loss", "recon", "aux", "l0". The SAE is left in eval mode.
    """
    from tqdm.auto import tqdm

    lr = default_lr(sae.n_latents) if lr is None else float(lr)
    optimizer, scheduler = make_optimizer(sae.parameters(), lr, warmup_steps=warmup_steps)
    history: dict[str, list[float]] = {"loss": [], "recon": [], "aux": [], "l0": []}
    sae.train()
    for step, x_BD in enumerate(tqdm(iter(batches), desc=f"fit {sae.arch} SAE", disable=not progress)):
        if step == 0 and init:
            init_from_batches_(sae, [x_BD])
        out = sae_step(sae, x_BD, optimizer, scheduler, grad_clip=grad_clip)
        for key in history:
            history[key].append(float(out[key].detach()))
        if on_step is not None:
            on_step(step, out)
    sae.eval()
    return history
