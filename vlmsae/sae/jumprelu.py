"""JumpReLU SAE (Rajamanoharan et al. 2024): a per-latent threshold theta_j [F] instead of a shared one.

Inference, exactly as SAELens (``JumpReLUSAE.encode``) and dictionary_learning (``JumpReluAutoEncoder.encode``)
compute it: ``f = relu(z) * (z > theta)`` on the pre-activations z (strict inequality). The two libraries write
it differently (SAELens masks relu(z) by z > theta, dictionary_learning takes relu(z * (z > theta))), but both are
z where z > max(theta, 0) and 0 elsewhere, which is what this module computes for any sign of theta. SAELens saves
its BatchTopK and Matryoshka SAEs this way too (theta = the batch threshold for every latent), and a gated SAE with
tied encoder weights is one (see vlmsae.sae.interop.saelens).

``threshold`` is an ``nn.Parameter`` [F] here (a buffer in the other architectures) because training learns it:
the straight-through estimator of the paper, as SAELens' ``JumpReLU``/``Step`` autograd functions implement it, with
a rectangle kernel of width ``BANDWIDTH`` in the scaled input space (E||x||^2 = d_in, like SAELens'
"expected_average_only_in" scaling). The sparsity term is the L0 penalty ``l1_coeff * mean_b sum_j 1[z_bj > theta_j]``
(``cfg.l1_coeff`` is the L0 coefficient for this architecture). No AuxK: JumpReLU training has none in the paper.
Thresholds start at ``INIT_THRESHOLD`` (SAELens' default). Decoder rows stay unit norm (the vlmsae mechanics), so the
L0 term needs no decoder-norm weighting.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmsae.sae.base import SAE, TrainCodes
from vlmsae.sae.config import SAEConfig

BANDWIDTH = 0.05
"""Width of the rectangle kernel of the threshold's straight-through gradient (SAELens' jumprelu_bandwidth)."""
INIT_THRESHOLD = 0.01
"""Initial threshold of every latent, scaled space (SAELens' jumprelu_init_threshold)."""


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _ThresholdFn(torch.autograd.Function):
    """``step=False``: f = relu(z) * 1[z > theta], d f / d z = 1[z > max(theta, 0)]. ``step=True``: H(z - theta)
    (the paper's L0 estimator), no gradient to z. d / d theta by the rectangle-kernel STE either way."""

    @staticmethod
    def forward(ctx: Any, z_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float, step: bool) -> torch.Tensor:
        ctx.save_for_backward(z_BF, theta_F)
        ctx.bandwidth, ctx.step = bandwidth, step
        return (z_BF > theta_F).to(z_BF.dtype) if step else torch.relu(z_BF) * (z_BF > theta_F)

    @staticmethod
    def backward(ctx: Any, grad_BF: torch.Tensor):
        z_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-((1.0 if ctx.step else theta_F) / eps) * _rectangle((z_BF - theta_F) / eps) * grad_BF).sum(0)
        grad_z = None if ctx.step else grad_BF * ((z_BF > theta_F) & (z_BF > 0)).to(grad_BF.dtype)
        return grad_z, grad_theta, None, None


class JumpReLUSAE(SAE):
    """f = relu(z) * (z > threshold) with a learnt per-latent ``threshold`` [F]; L0-penalised training."""

    arch = "jumprelu"
    uses_auxk = False

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed=seed)
        del self.threshold  # the base class's scalar buffer: replaced by the per-latent parameter
        self.threshold = nn.Parameter(torch.full((cfg.n_latents,), INIT_THRESHOLD))

    def _activate(self, z_BF: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return torch.relu(z_BF) * (z_BF > threshold)

    def _train_codes(self, x_cent_BD: torch.Tensor) -> TrainCodes:
        z_BF = torch.addmm(self.b_enc, x_cent_BD, self.W_enc.T)
        return TrainCodes(z_BF=z_BF, codes_BF=_ThresholdFn.apply(z_BF, self.threshold, BANDWIDTH, False))

    def _sparsity_penalty(self, codes: TrainCodes) -> torch.Tensor | None:
        if not self.training:  # eval-mode loss(): report the true L0 (no graph needed)
            return (codes.z_BF > self.threshold).sum(dim=-1).float().mean()
        return _ThresholdFn.apply(codes.z_BF, self.threshold, BANDWIDTH, True).sum(dim=-1).mean()
