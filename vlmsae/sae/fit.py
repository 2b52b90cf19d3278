"""A plain Adam loop for SAEs: quick fits on synthetic or cached activations (tests, demo, notebooks).

The real trainer is the Lightning module in ``vlmsae.lit`` (warmup schedule, checkpoints, DDP,
logging); this loop applies the same per-step mechanics (METHOD §2) in the same order, so an SAE
trained here behaves like one trained there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.mechanics import (
    constrain_decoder_grad_,
    estimate_input_scale,
    init_b_dec_geometric_median_,
    normalize_decoder_,
    set_input_scale_,
)
from vlmsae.sae.precision import fp32_region


def default_lr(n_latents: int) -> float:
    """METHOD §2: lr = 2e-4 / sqrt(F / 2^14)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


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

    Per step: loss -> backward -> remove the decoder-parallel gradient -> clip -> Adam step ->
    unit-norm decoder rows. ``init=True`` first sets the input scale and the geometric-median
    b_dec from the first batch (the Lightning trainer estimates the scale from more batches).
    ``lr`` None = :func:`default_lr`; ``warmup_steps`` ramps it linearly from 0.
    The returned dict has one float per step for "loss", "recon", "aux", "l0". The SAE is left in eval mode.
    """
    from tqdm.auto import tqdm

    lr = default_lr(sae.n_latents) if lr is None else float(lr)
    # fused=True: one kernel over all parameters, ~20x faster than the loop on CPU.
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)
    history: dict[str, list[float]] = {"loss": [], "recon": [], "aux": [], "l0": []}
    sae.train()
    iterator = iter(batches)
    for step, x_BD in enumerate(tqdm(iterator, desc=f"fit {sae.arch} SAE", disable=not progress)):
        if step == 0 and init:
            set_input_scale_(sae, estimate_input_scale([x_BD], sae.d_in))
            init_b_dec_geometric_median_(sae, x_BD)
        if warmup_steps > 0:
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup_steps)
        out = sae.loss(x_BD)
        optimizer.zero_grad(set_to_none=True)
        with fp32_region(x_BD.device):  # backward at full float32 precision too (vlmsae.sae.precision)
            out["loss"].backward()
        constrain_decoder_grad_(sae)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
        optimizer.step()
        normalize_decoder_(sae)
        for key in history:
            history[key].append(float(out[key].detach()))
        if on_step is not None:
            on_step(step, out)
    sae.eval()
    return history
