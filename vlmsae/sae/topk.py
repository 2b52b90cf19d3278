"""TopK SAE (Gao et al., METHOD §2): keep the k largest pre-activations of each sample, through ReLU.

Training can run on two compute paths with identical losses and gradients (up to float
rounding): dense autograd over the full [B, F] codes, or the sparse kernels of
:mod:`vlmsae.sae.sparse`, which touch only the B*k selected entries after the one dense encoder
matmul. ``cfg.sparse_kernel`` picks: "dense", "sparse", or "auto" (``sparse.use_sparse_kernel``
decides per shape and device). BatchTopK and Matryoshka inherit this and only change the selection.

Selection goes through :mod:`vlmsae.sae.select` under ``cfg.precision`` (:mod:`vlmsae.sae.precision`):
the encoder matmul runs in float32 (``fp32``) or on the tensor cores (``fast_exact``, ``bf16``); the exact
policies select the same entries and hand on the same float32 values, training and inference alike.
"""

from __future__ import annotations

import torch

from vlmsae.sae.base import SAE, TrainCodes
from vlmsae.sae.precision import sae_policy
from vlmsae.sae.select import Preacts, compute_preacts, preacts_with_bound, topk_exact
from vlmsae.sae.sparse import _row_major_rows, gather_preacts, preact_buffer, use_sparse_kernel


class TopKSAE(SAE):
    """f = ReLU(z) on the k largest entries of each row, 0 elsewhere (same in training and inference)."""

    arch = "topk"

    def _activate(self, z_BF: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        top = z_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(z_BF).scatter_(-1, top.indices, top.values.relu())

    def _select(self, pre: Preacts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows_Z, cols_Z, vals_Z) of the entries that training keeps, with their float32 values (no grad)."""
        rows_Z, cols_Z, vals_Z = topk_exact(pre, self.cfg.k)
        # The cached row-major rows tensor: the sparse kernels recognise TopK's layout by its identity.
        return _row_major_rows(pre.z_BF.shape[0], self.cfg.k, rows_Z.device), cols_Z, vals_Z

    def _infer_select(self, pre: Preacts, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows_Z, cols_Z, vals_Z) that inference keeps (TopK: as in training)."""
        return topk_exact(pre, self.cfg.k)

    def use_sparse_path(self, batch_size: int) -> bool:
        """Whether a training batch of this size runs on the sparse kernels (cfg.sparse_kernel)."""
        return use_sparse_kernel(
            self.cfg.sparse_kernel, batch_size, self.n_latents, self.d_in, self.W_enc.device, k=self.cfg.k
        )

    @property
    def precision_policy(self) -> str:
        """The resolved ``cfg.precision`` on the SAE's device: fp32 | fast_exact | bf16."""
        return sae_policy(self)

    def _train_codes(self, x_cent_BD: torch.Tensor) -> TrainCodes:
        policy, batch_size = self.precision_policy, x_cent_BD.shape[0]
        sparse = self.use_sparse_path(batch_size)
        if policy == "fp32" and not sparse:  # the dense autograd reference: z with grad, exact selection
            z_BF = torch.addmm(self.b_enc, x_cent_BD, self.W_enc.T)
            pre = preacts_with_bound(z_BF, x_cent_BD, self.W_enc, self.b_enc, policy, "fp32")
            rows_Z, cols_Z, exact_Z = self._select(pre)
            vals_Z = z_BF[rows_Z, cols_Z]
            # The canonical values with z's gradient (in z's dtype: a bf16-cast SAE stays bf16 here).
            vals_Z = (vals_Z + (exact_Z.to(vals_Z.dtype) - vals_Z).detach()).relu()
            codes_BF = torch.zeros_like(z_BF).index_put((rows_Z, cols_Z), vals_Z)
            return TrainCodes(z_BF=z_BF, codes_BF=codes_BF, rows_Z=rows_Z, cols_Z=cols_Z, vals_Z=vals_Z, preacts=pre)
        out = None
        if policy == "fp32":  # into a buffer reused across steps: z is only read within this step
            out = preact_buffer(batch_size, self.n_latents, torch.float32, x_cent_BD.device)
        pre = compute_preacts(x_cent_BD, self.W_enc, self.b_enc, policy, out=out)
        rows_Z, cols_Z, exact_Z = self._select(pre)
        vals_Z = gather_preacts(x_cent_BD, self.W_enc, self.b_enc, rows_Z, cols_Z, values_Z=exact_Z).relu()
        codes_BF = (
            None if sparse else x_cent_BD.new_zeros(batch_size, self.n_latents).index_put((rows_Z, cols_Z), vals_Z)
        )
        return TrainCodes(z_BF=pre.z_BF, codes_BF=codes_BF, rows_Z=rows_Z, cols_Z=cols_Z, vals_Z=vals_Z, preacts=pre)

    def _infer_codes(self, x_cent_BD: torch.Tensor, b_enc_F: torch.Tensor, threshold: torch.Tensor) -> TrainCodes:
        if getattr(self, "interop_only", None):  # a foreign forward (its own _activate) on the float32 matmul
            return super()._infer_codes(x_cent_BD, b_enc_F, threshold)
        pre = compute_preacts(x_cent_BD, self.W_enc, b_enc_F, self.precision_policy)
        rows_Z, cols_Z, exact_Z = self._infer_select(pre, threshold)
        vals_Z = exact_Z
        if torch.is_grad_enabled() and (self.W_enc.requires_grad or x_cent_BD.requires_grad):  # e.g. eval loss
            vals_Z = gather_preacts(x_cent_BD, self.W_enc, b_enc_F, rows_Z, cols_Z, values_Z=exact_Z)
        vals_Z = vals_Z.relu()
        codes_BF = x_cent_BD.new_zeros(x_cent_BD.shape[0], self.n_latents).index_put((rows_Z, cols_Z), vals_Z)
        return TrainCodes(z_BF=pre.z_BF, codes_BF=codes_BF, preacts=pre)
