"""BatchTopK SAE (Bussmann et al., the paper's SAE, METHOD §2).

Training keeps the k*B largest entries of the flattened B x F batch, so samples share a budget
of k active latents on average. Inference cannot depend on the batch, so it uses one threshold:
f = ReLU(z) * 1[ReLU(z) > theta], theta = EMA (beta = cfg.threshold_beta) of the smallest
positive kept activation per training batch, updated from step ``cfg.threshold_start_step`` on.
The first update sets theta directly (no bias towards the initial value). Both selections are
exact under the fp32 and fast_exact precision policies (:mod:`vlmsae.sae.select`).
"""

from __future__ import annotations

import torch

from vlmsae.sae.base import TrainCodes
from vlmsae.sae.select import Preacts, above_threshold_exact, batch_topk_exact
from vlmsae.sae.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    """Batch top-k in training, the EMA threshold at inference (per-sample top-k until it exists)."""

    arch = "batchtopk"

    def _select(self, pre: Preacts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batch_topk_exact(pre, self.cfg.k * pre.z_BF.shape[0])

    def _infer_select(self, pre: Preacts, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if float(threshold) < 0:
            self._warn_no_threshold()
            return super()._infer_select(pre, threshold)
        # f = ReLU(z) * 1[ReLU(z) > theta] keeps exactly the z > max(theta, 0).
        return above_threshold_exact(pre, threshold.clamp_min(0))

    def _activate(self, z_BF: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        if float(threshold) < 0:
            self._warn_no_threshold()
            return super()._activate(z_BF, threshold)
        f_BF = torch.relu(z_BF)
        return f_BF * (f_BF > threshold)

    @torch.no_grad()
    def _after_train_step(self, codes: TrainCodes) -> None:
        # Tensor ops only (no host sync): the update is a no-op before the start step or when
        # nothing positive was kept.
        vals_Z = codes.vals_Z.detach().float()
        min_kept = torch.where(vals_Z > 0, vals_Z, torch.full_like(vals_Z, float("inf"))).min()
        beta = self.cfg.threshold_beta
        ema = torch.where(self.threshold < 0, min_kept, beta * self.threshold + (1 - beta) * min_kept)
        do_update = (self.n_steps >= self.cfg.threshold_start_step) & torch.isfinite(min_kept)
        self.threshold.copy_(torch.where(do_update, ema, self.threshold))
