"""Token rows -> sparse SAE codes -> one code row per image: the pooling every MS pass shares (the studies'
:mod:`vlmsae.studies.codes` and MS while training, :mod:`vlmsae.lit.val_ms`). ``POOLS``: ``cls``; ``mean``
counts zeros; ``max`` of the nonzeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

POOLS = ("cls", "mean", "max")


def pool_rows(acts_BTD: torch.Tensor, pool: str, has_cls: bool) -> tuple[torch.Tensor, int]:
    """The rows the SAE reads for a batch: [B, D] for cls / projected embeddings, else [B*T', D]
    of the patch tokens (T' per image) for mean / max pooling."""
    if acts_BTD.dim() == 2:
        return acts_BTD, 1
    if pool == "cls":
        if not has_cls:
            raise ValueError("pool=cls: this model has no CLS token (e.g. SigLIP); use pool=mean or pool=max.")
        return acts_BTD[:, 0], 1
    patches = acts_BTD[:, 1:] if has_cls else acts_BTD
    B, T, D = patches.shape
    return patches.reshape(B * T, D), T


def pool_sparse(codes_RF: torch.Tensor, per_image: int, pool: str, n_images: int) -> torch.Tensor:
    """Pool sparse token codes [B*T, F] to per-image codes [B, F] (mean counts zeros; max of nonzeros)."""
    codes_RF = codes_RF.coalesce()
    rows, cols = codes_RF.indices()
    vals = codes_RF.values()
    n_latents = codes_RF.shape[1]
    if per_image == 1:
        return codes_RF
    image = rows // per_image
    keys, inverse = torch.unique(image * n_latents + cols, return_inverse=True)
    if pool == "mean":
        pooled = torch.zeros(keys.numel(), dtype=vals.dtype).index_add_(0, inverse, vals) / per_image
    else:
        pooled = torch.full((keys.numel(),), -math.inf, dtype=vals.dtype).scatter_reduce(0, inverse, vals, "amax")
        # a latent that is positive on one token and negative (or 0) elsewhere: max is the positive value;
        # an all-negative latent on some tokens and 0 on others has max 0, which we keep as an implicit zero.
        pooled = torch.where(pooled < 0, torch.zeros_like(pooled), pooled)
    idx = torch.stack([keys // n_latents, keys % n_latents])
    return torch.sparse_coo_tensor(idx, pooled, (n_images, n_latents), check_invariants=False).coalesce()


def sparse_rows(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], shape: tuple[int, int]) -> torch.Tensor:
    """One sparse COO tensor from (row, col, value) pieces."""
    if not parts:
        return torch.sparse_coo_tensor(torch.zeros((2, 0), dtype=torch.long), torch.zeros(0), shape).coalesce()
    rows, cols, vals = (torch.cat([p[i] for p in parts]) for i in range(3))
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals.float(), shape, check_invariants=False).coalesce()


@torch.no_grad()
def encode_rows(
    sae, rows_RD: torch.Tensor, chunk: int, on_codes: Callable[[torch.Tensor, torch.Tensor], None] | None = None
) -> torch.Tensor:
    """Sparse codes [R, F] (float32, CPU, coalesced) of ``rows_RD`` by ``sae``'s inference encoder, ``chunk``
    rows at a time (bounds the dense [chunk, F] block). ``on_codes(x_rd, codes_rf)`` sees every chunk on the
    SAE's device (e.g. to accumulate reconstruction metrics of the same pass)."""
    parts = []
    for r0 in range(0, rows_RD.shape[0], chunk):
        x_rd = rows_RD[r0 : r0 + chunk].to(sae.W_dec.device, torch.float32)
        codes_rf = sae.encode(x_rd, sparse=True)
        if on_codes is not None:
            on_codes(x_rd, codes_rf)
        c = codes_rf.cpu().coalesce()
        parts.append((c.indices()[0] + r0, c.indices()[1], c.values()))
    return sparse_rows(parts, (rows_RD.shape[0], sae.n_latents))
