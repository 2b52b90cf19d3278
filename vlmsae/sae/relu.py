"""ReLU-L1 SAE (the baseline, METHOD §2): f = ReLU(z), loss = recon + l1_coeff * sum_j f_j ||W_dec[j]||."""

from __future__ import annotations

import torch

from vlmsae.sae.base import SAE, TrainCodes


class ReluSAE(SAE):
    """Sparsity from an L1 penalty weighted by decoder-row norms (so shrinking rows cannot cheat it).

    No AuxK: an L1 SAE has no top-k competition for dead latents to lose.
    """

    arch = "relu"
    uses_auxk = False

    def _activate(self, z_BF: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return torch.relu(z_BF)

    def _sparsity_penalty(self, codes: TrainCodes) -> torch.Tensor:
        row_norms_F = self.W_dec.norm(dim=1)
        return (codes.codes_BF * row_norms_F).sum(dim=-1).mean()
