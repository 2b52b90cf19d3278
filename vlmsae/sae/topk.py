"""TopK SAE (Gao et al., METHOD §2): keep the k largest pre-activations of each sample, through ReLU.

Training can run on two compute paths with identical losses and gradients (up to float
rounding): dense autograd over the full [B, F] codes, or the sparse kernels of
:mod:`vlmsae.sae.sparse`, which touch only the B*k selected entries after the one dense encoder
matmul. ``cfg.sparse_kernel`` picks: "dense", "sparse", or "auto" (``sparse.use_sparse_kernel``
decides per shape and device). BatchTopK and Matryoshka inherit this and only change the selection.
"""

from __future__ import annotations

import torch

from vlmsae.sae.base import SAE, TrainCodes
from vlmsae.sae.sparse import gather_preacts, selection_preacts, topk_select, use_sparse_kernel


class TopKSAE(SAE):
    """f = ReLU(z) on the k largest entries of each row, 0 elsewhere (same in training and inference)."""

    arch = "topk"

    def _activate(self, z_BF: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        top = z_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(z_BF).scatter_(-1, top.indices, top.values.relu())

    def _select(self, z_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows_N, cols_N) of the entries that training keeps; ``z_BF`` is detached."""
        return topk_select(z_BF, self.cfg.k)

    def use_sparse_path(self, batch_size: int) -> bool:
        """Whether a training batch of this size runs on the sparse kernels (cfg.sparse_kernel)."""
        return use_sparse_kernel(
            self.cfg.sparse_kernel, batch_size, self.n_latents, self.d_in, self.W_enc.device, k=self.cfg.k
        )

    def _train_codes(self, x_cent_BD: torch.Tensor) -> TrainCodes:
        if self.use_sparse_path(x_cent_BD.shape[0]):
            with torch.no_grad():  # into a buffer reused across steps: z is only read within this step
                z_BF = selection_preacts(x_cent_BD, self.W_enc, self.b_enc)
            rows_N, cols_N = self._select(z_BF)
            vals_N = gather_preacts(x_cent_BD, self.W_enc, self.b_enc, rows_N, cols_N, preacts_BF=z_BF).relu()
            return TrainCodes(z_BF=z_BF, rows_N=rows_N, cols_N=cols_N, vals_N=vals_N)
        z_BF = torch.addmm(self.b_enc, x_cent_BD, self.W_enc.T)
        rows_N, cols_N = self._select(z_BF.detach())
        vals_N = z_BF[rows_N, cols_N].relu()
        codes_BF = torch.zeros_like(z_BF).index_put((rows_N, cols_N), vals_N)
        return TrainCodes(z_BF=z_BF, codes_BF=codes_BF, rows_N=rows_N, cols_N=cols_N, vals_N=vals_N)
