"""Matryoshka BatchTopK SAE (Bussmann et al. / Nabeshima, METHOD §2).

Latents form nested groups (sizes from ``cfg.group_fractions``); prefix i = groups 0..i must
reconstruct x on its own, so early latents learn general features and later ones refine them.
Loss = mean over prefixes of ||x - x_hat_i||^2 (plus AuxK); the batch top-k is taken jointly
over all latents, and inference uses the BatchTopK threshold.
"""

from __future__ import annotations

import torch

from vlmsae.sae.base import TrainCodes
from vlmsae.sae.batchtopk import BatchTopKSAE


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK codes, Matryoshka loss; ``loss()`` also returns ``recon_prefix`` [G]."""

    arch = "matryoshka"

    def _recon_objective(self, x_s_BD: torch.Tensor, codes: TrainCodes) -> tuple[torch.Tensor, torch.Tensor, dict]:
        # Prefix i's reconstruction = b_dec + the cumulative sum of the group contributions up to i.
        prefix_hats_BGD = self.b_dec + codes.decode_groups(self.W_dec, self.group_sizes).cumsum(dim=1)
        # recon_error per prefix: squared error summed over dims, mean over the batch.
        errors_G = (prefix_hats_BGD.float() - x_s_BD.float()[:, None]).pow(2).sum(dim=-1).mean(dim=0)
        return errors_G.mean(), prefix_hats_BGD[:, -1], {"recon_prefix": errors_G.detach()}
