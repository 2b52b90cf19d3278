"""Training mechanics shared by every SAE architecture (METHOD §2), one named function each.

A training step with these (:func:`vlmsae.sae.step.sae_step`, which every trainer calls)::

    init_from_batches_(sae, first_batches)   # once, before step 0: the input scale, then b_dec (geometric median)
    out = sae.loss(x_BD); out["loss"].backward()
    constrain_decoder_grad_(sae)      # drop the part of each W_dec row's gradient along the row
    clip_grad_norm_(...); optimizer.step()
    normalize_decoder_(sae)           # rows back to unit norm

The loss terms themselves (reconstruction, AuxK, the dead-latent count) are in :mod:`vlmsae.sae.base`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from vlmsae.sae.base import SAE


@torch.no_grad()
def normalize_decoder_(sae: SAE, eps: float = 1e-12) -> None:
    """Rescale every decoder row (latent direction) to unit norm, in place. Call after each optimiser step."""
    norms_F1 = sae.W_dec.norm(dim=1, keepdim=True).clamp_min(eps)
    sae.W_dec.div_(norms_F1)


@torch.no_grad()
def constrain_decoder_grad_(sae: SAE) -> None:
    """Remove from each W_dec row's gradient its component parallel to the row, in place.

    With unit-norm rows the loss cannot change by growing a row, so the parallel component only
    fights :func:`normalize_decoder_`; removing it keeps Adam's moments about the useful direction.
    Call after ``backward()`` and before the optimiser step (and before gradient clipping).
    """
    grad_FD = sae.W_dec.grad
    if grad_FD is None:
        return
    W_FD = sae.W_dec
    # Divide by ||w||^2 so this is an exact projection even when a row is not yet unit norm.
    # (One F x D temporary instead of three: this runs every step on the largest tensor.)
    norm_sq_F1 = torch.linalg.vector_norm(W_FD, dim=1, keepdim=True).square().clamp_min(1e-12)
    parallel_F1 = (grad_FD * W_FD).sum(dim=1, keepdim=True) / norm_sq_F1
    grad_FD.addcmul_(parallel_F1, W_FD, value=-1)


def geometric_median(x_ND: torch.Tensor, n_iter: int = 100, tol: float = 1e-6, eps: float = 1e-8) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to the rows of ``x_ND`` (Weiszfeld).

    Robust to the few huge-norm outlier tokens ViTs are known for, unlike the mean. Each
    iteration is a weighted mean with weights 1 / distance; ``eps`` keeps a row that coincides
    with the estimate from dividing by zero. Computed in float64 for stability.
    """
    if x_ND.dim() != 2 or x_ND.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, D] batch; got shape {tuple(x_ND.shape)}.")
    x = x_ND.detach().double()
    median_D = x.mean(dim=0)
    for _ in range(n_iter):
        weights_N = 1.0 / (x - median_D).norm(dim=1).clamp_min(eps)
        new_D = (weights_N[:, None] * x).sum(dim=0) / weights_N.sum()
        shift = (new_D - median_D).norm()
        median_D = new_D
        if shift <= tol * (median_D.norm() + eps):
            break
    return median_D.to(x_ND.dtype)


@torch.no_grad()
def init_b_dec_geometric_median_(sae: SAE, x_BD: torch.Tensor) -> torch.Tensor:
    """Set ``b_dec`` to the geometric median of a raw batch (METHOD §2 init). Returns the new b_dec.

    Call after :func:`set_input_scale_`: b_dec lives in the scaled space, so the batch is scaled first.
    """
    x_BD = sae.check_input(x_BD, "init_b_dec_geometric_median_", require_2d=True)
    median_D = geometric_median(x_BD * sae.input_scale)
    sae.b_dec.copy_(median_D.to(sae.b_dec.dtype))
    return sae.b_dec


@torch.no_grad()
def estimate_input_scale(batches: Iterable[torch.Tensor], d_in: int) -> float:
    """The scalar s with E||s x||^2 = d_in over ``batches`` (paper: ~100 batches).

    Convention: after scaling, a typical activation has per-dimension second moment 1, so loss
    magnitudes, the learning rate and l1_coeff transfer between layers and models whose raw
    activation norms differ by orders of magnitude.
    """
    total_sq, n_rows = 0.0, 0
    for x_BD in batches:
        x_BD = torch.as_tensor(x_BD)
        if x_BD.shape[-1] != d_in:
            raise ValueError(
                f"estimate_input_scale: expected batches of width d_in={d_in}, got shape {tuple(x_BD.shape)}."
            )
        x_BD = x_BD.reshape(-1, d_in).double()
        if not torch.isfinite(x_BD).all():
            raise ValueError("estimate_input_scale: a batch contains NaN or inf; clean the activations first.")
        total_sq += float((x_BD * x_BD).sum())
        n_rows += x_BD.shape[0]
    if n_rows == 0:
        raise ValueError("estimate_input_scale: got no rows; pass at least one non-empty batch.")
    mean_sq_norm = total_sq / n_rows
    if mean_sq_norm <= 0:
        raise ValueError("estimate_input_scale: every activation is zero; cannot scale them to E||x||^2 = d_in.")
    return float((d_in / mean_sq_norm) ** 0.5)


@torch.no_grad()
def set_input_scale_(sae: SAE, scale: float) -> None:
    """Store the input scale in the SAE's buffer; encode/decode keep taking raw activations."""
    scale = float(scale)
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"input scale must be a finite number > 0; got {scale!r}.")
    sae.input_scale.fill_(scale)


@torch.no_grad()
def init_from_batches_(sae: SAE, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Input scale from ``batches`` (paper: ~100), then b_dec = geometric median of the first batch.

    Call once before step 0 (never on resume: both live in the checkpoint). Returns the scale and the rows read.
    """
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
