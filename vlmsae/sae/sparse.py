"""Sparse training compute for TopK / BatchTopK SAEs: touch only the k selected latents per sample.

Why: a TopK SAE keeps k (= 20) of F (8,192 .. 65,536) latents per sample, yet the dense
reference trainer pays for six B x F x D matmuls per step (encoder forward, decoder forward,
and four in backward).  Only the encoder forward ``z = x_cent @ W_enc.T`` is needed in full, to
*select*; everything after selection involves N = B*k entries.  This module provides the two
autograd primitives that make the rest cost O(N * D):

``gather_preacts``  z[rows, cols] with a backward that writes dW_enc / db_enc only at the selected
                    latents and dx_cent only through the selected rows of W_enc;
``sparse_decode``   x_hat = sum_n vals[n] * W_dec[cols[n]] into row rows[n] (no bias), by
                    ``embedding_bag`` with per-sample weights; its backward gives
                    dvals[n] = <dx_hat[rows[n]], W_dec[cols[n]]> and dW_dec at selected rows only.

Every "sum over selected entries grouped by a key" (the decoder forward, dx_cent, dW_enc,
dW_dec) is one ``_bag_sum``: sort the entries by key, then one ``F.embedding_bag(mode="sum",
per_sample_weights=...)`` with offsets; this handles exactly-k rows (TopK) and any count per row,
repeated columns and empty rows (BatchTopK) alike, and never builds an N x D temporary.
The gradients of the weights are returned as ordinary dense [F, D] tensors (zero off the
selected rows), so any optimiser, gradient clipping and the decoder-norm projection work
unchanged and the step is the same as the dense one up to float rounding.

Usage in a TopK training step (what ``vlmsae.sae`` does when the sparse kernel is chosen)::

    x_cent_BD = x_BD - b_dec
    with torch.no_grad():
        z_BF = torch.addmm(b_enc, x_cent_BD, W_enc.T)      # the one dense matmul
    rows_N, cols_N = topk_select(z_BF, k)                  # or batch_topk_select(z_BF, k * B)
    vals_N = gather_preacts(x_cent_BD, W_enc, b_enc, rows_N, cols_N, preacts_BF=z_BF).relu()
    x_hat_BD = sparse_decode(rows_N, cols_N, vals_N, W_dec, B) + b_dec

Measured on the 2-core CPU of the build machine (fp32, d = 1024, B = 4096, k = 20): see
``prefer_sparse`` and ``outputs/bench/results.md`` (``python -m vlmsae.bench``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "gather_preacts",
    "sparse_decode",
    "prefer_sparse",
    "use_sparse_kernel",
    "topk_select",
    "batch_topk_select",
]

# Entries per chunk in _rowwise_dot: the gathered [chunk, D] blocks (about 5 MB at D = 1024)
# stay in cache; one unchunked gather of all B*k rows is 3-4x slower on the CPU.
_DOT_CHUNK_ENTRIES = 1280


def _check_index_pair(rows_N: torch.Tensor, cols_N: torch.Tensor) -> None:
    if rows_N.dim() != 1 or cols_N.dim() != 1 or rows_N.shape != cols_N.shape:
        raise ValueError(
            f"rows_N and cols_N must be 1-D and of equal length, got shapes {tuple(rows_N.shape)} and "
            f"{tuple(cols_N.shape)}; flatten [B, k] top-k indices with .reshape(-1)."
        )
    if rows_N.dtype != torch.long or cols_N.dtype != torch.long:
        raise ValueError(
            f"rows_N and cols_N must be int64 (torch.long), got {rows_N.dtype} and {cols_N.dtype}; "
            "convert with .long()."
        )


def _is_sorted(keys_N: torch.Tensor) -> bool:
    return keys_N.numel() < 2 or bool((keys_N[1:] >= keys_N[:-1]).all())


def _bag_sum(
    bag_N: torch.Tensor, item_N: torch.Tensor, weight_N: torch.Tensor, table_MD: torch.Tensor, n_bags: int
) -> torch.Tensor:
    """out[b] = sum over n with bag_N[n] == b of weight_N[n] * table_MD[item_N[n]]  -> [n_bags, D].

    Empty bags give zero rows.  One sort of the N keys (skipped when already sorted, e.g. the
    row-major output of top-k) and one embedding_bag: O(N * D) work and no N x D temporary.
    """
    out_dtype = table_MD.dtype
    if bag_N.numel() == 0:
        return table_MD.new_zeros(n_bags, table_MD.shape[1])
    if not _is_sorted(bag_N):
        order_N = torch.argsort(bag_N, stable=True)
        bag_N, item_N, weight_N = bag_N[order_N], item_N[order_N], weight_N[order_N]
    counts_G = torch.bincount(bag_N, minlength=n_bags)
    if counts_G.numel() > n_bags:
        raise ValueError(f"an index is >= {n_bags} (the number of rows it indexes into); check rows_N / cols_N.")
    offsets_G = torch.cumsum(counts_G, 0) - counts_G
    return F.embedding_bag(
        item_N, table_MD.contiguous(), offsets_G, mode="sum", per_sample_weights=weight_N.to(out_dtype).contiguous()
    )


def _row_major_k(rows_N: torch.Tensor, n_rows: int) -> int:
    """k if ``rows_N`` is exactly [0]*k + [1]*k + ... + [n_rows-1]*k (TopK's layout), else 0."""
    n_entries = rows_N.numel()
    if n_rows == 0 or n_entries == 0 or n_entries % n_rows:
        return 0
    k = n_entries // n_rows
    expected_N = torch.arange(n_rows, device=rows_N.device).repeat_interleave(k)
    return k if torch.equal(rows_N, expected_N) else 0


def _rowwise_dot(a_MD: torch.Tensor, ia_N: torch.Tensor, b_KD: torch.Tensor, ib_N: torch.Tensor) -> torch.Tensor:
    """out[n] = <a_MD[ia_N[n]], b_KD[ib_N[n]]>, a chunk at a time so the gathered rows stay in cache.

    With TopK's layout (ia_N = each row of ``a`` k times) it is one batched matrix-vector
    product per chunk, [c, k, D] @ [c, D, 1], gathering only ``b``: 3-4x faster on the CPU than
    gathering both sides and multiplying elementwise (the general path, for BatchTopK).
    """
    dtype = torch.promote_types(a_MD.dtype, b_KD.dtype)
    n_total = ia_N.numel()
    k = _row_major_k(ia_N, a_MD.shape[0])
    if k:
        out_Mk = torch.empty(a_MD.shape[0], k, dtype=dtype, device=a_MD.device)
        rows_per_chunk = max(1, _DOT_CHUNK_ENTRIES // k)
        for start in range(0, a_MD.shape[0], rows_per_chunk):
            stop = min(a_MD.shape[0], start + rows_per_chunk)
            b_ckD = b_KD.index_select(0, ib_N[start * k : stop * k]).to(dtype).view(stop - start, k, -1)
            a_cD1 = a_MD[start:stop].to(dtype).unsqueeze(2)
            torch.bmm(b_ckD, a_cD1, out=out_Mk[start:stop].unsqueeze(2))
        return out_Mk.view(-1)
    out_N = torch.empty(n_total, dtype=dtype, device=a_MD.device)
    for start in range(0, n_total, _DOT_CHUNK_ENTRIES):
        stop = min(n_total, start + _DOT_CHUNK_ENTRIES)
        a_cD = a_MD.index_select(0, ia_N[start:stop]).to(dtype)
        b_cD = b_KD.index_select(0, ib_N[start:stop]).to(dtype)
        out_N[start:stop] = (a_cD * b_cD).sum(1)
    return out_N


def _no_autocast(device: torch.device):
    """The primitives compute in the weights' dtype: under bf16 autocast a gathered dot product
    would otherwise silently drop to bf16 (and out= buffers would mismatch)."""
    return torch.autocast(device_type=device.type, enabled=False)


class _GatherPreacts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_cent_BD, W_enc_FD, b_enc_F, rows_N, cols_N, preacts_BF):
        with _no_autocast(W_enc_FD.device):
            return _GatherPreacts._forward(ctx, x_cent_BD, W_enc_FD, b_enc_F, rows_N, cols_N, preacts_BF)

    @staticmethod
    def _forward(ctx, x_cent_BD, W_enc_FD, b_enc_F, rows_N, cols_N, preacts_BF):
        if preacts_BF is not None:
            # The dense no-grad forward already holds these numbers: reading them is free and
            # keeps the selected values bit-identical to what selection saw.
            vals_N = preacts_BF.detach()[rows_N, cols_N].to(W_enc_FD.dtype)
        else:
            vals_N = _rowwise_dot(x_cent_BD, rows_N, W_enc_FD, cols_N).to(W_enc_FD.dtype) + b_enc_F[cols_N]
        ctx.save_for_backward(x_cent_BD, W_enc_FD, rows_N, cols_N)
        ctx.b_enc_meta = (b_enc_F.shape, b_enc_F.dtype)
        return vals_N

    @staticmethod
    def backward(ctx, dvals_N):
        with _no_autocast(dvals_N.device):
            return _GatherPreacts._backward(ctx, dvals_N)

    @staticmethod
    def _backward(ctx, dvals_N):
        x_cent_BD, W_enc_FD, rows_N, cols_N = ctx.saved_tensors
        n_latents, batch_size = W_enc_FD.shape[0], x_cent_BD.shape[0]
        dvals_N = dvals_N.contiguous()
        dx_BD = dW_FD = db_F = None
        if ctx.needs_input_grad[0]:
            dx_BD = _bag_sum(rows_N, cols_N, dvals_N, W_enc_FD, batch_size).to(x_cent_BD.dtype)
        if ctx.needs_input_grad[1]:
            dW_FD = _bag_sum(cols_N, rows_N, dvals_N, x_cent_BD, n_latents).to(W_enc_FD.dtype)
        if ctx.needs_input_grad[2]:
            shape, dtype = ctx.b_enc_meta
            db_F = torch.zeros(shape, dtype=dtype, device=dvals_N.device).index_add_(0, cols_N, dvals_N.to(dtype))
        return dx_BD, dW_FD, db_F, None, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_N, cols_N, vals_N, W_dec_FD, batch_size):
        with _no_autocast(W_dec_FD.device):
            x_hat_BD = _bag_sum(rows_N, cols_N, vals_N, W_dec_FD, batch_size)
        ctx.save_for_backward(rows_N, cols_N, vals_N, W_dec_FD)
        return x_hat_BD

    @staticmethod
    def backward(ctx, dx_hat_BD):
        with _no_autocast(dx_hat_BD.device):
            return _SparseDecode._backward(ctx, dx_hat_BD)

    @staticmethod
    def _backward(ctx, dx_hat_BD):
        rows_N, cols_N, vals_N, W_dec_FD = ctx.saved_tensors
        dx_hat_BD = dx_hat_BD.contiguous()
        dvals_N = dW_FD = None
        if ctx.needs_input_grad[2]:
            dvals_N = _rowwise_dot(dx_hat_BD, rows_N, W_dec_FD, cols_N).to(vals_N.dtype)
        if ctx.needs_input_grad[3]:
            dW_FD = _bag_sum(cols_N, rows_N, vals_N, dx_hat_BD, W_dec_FD.shape[0]).to(W_dec_FD.dtype)
        return None, None, dvals_N, dW_FD, None


def gather_preacts(
    x_cent_BD: torch.Tensor,
    W_enc_FD: torch.Tensor,
    b_enc_F: torch.Tensor,
    rows_N: torch.Tensor,
    cols_N: torch.Tensor,
    preacts_BF: torch.Tensor | None = None,
) -> torch.Tensor:
    """The selected pre-activations vals[n] = x_cent[rows[n]] . W_enc[cols[n]] + b_enc[cols[n]].

    Differentiable in ``x_cent_BD``, ``W_enc_FD`` and ``b_enc_F``; the backward never forms a
    dense B x F gradient (dW_enc is nonzero only at the selected latents).  Pass
    ``preacts_BF`` (the no-grad ``z`` used for selection) to read the values instead of
    recomputing them; the backward is the same either way.  Entries may repeat a column, rows
    may hold any number of entries (BatchTopK) or none.
    """
    _check_index_pair(rows_N, cols_N)
    if x_cent_BD.dim() != 2 or W_enc_FD.dim() != 2 or x_cent_BD.shape[1] != W_enc_FD.shape[1]:
        raise ValueError(
            f"x_cent_BD [B, D] and W_enc_FD [F, D] must share D; got {tuple(x_cent_BD.shape)} and "
            f"{tuple(W_enc_FD.shape)} (W_enc is stored with latents as rows, see docs/ARCHITECTURE.md)."
        )
    if b_enc_F.shape != (W_enc_FD.shape[0],):
        raise ValueError(f"b_enc_F must have shape ({W_enc_FD.shape[0]},), got {tuple(b_enc_F.shape)}.")
    if preacts_BF is not None and preacts_BF.shape != (x_cent_BD.shape[0], W_enc_FD.shape[0]):
        raise ValueError(
            f"preacts_BF must be the [B, F] = {(x_cent_BD.shape[0], W_enc_FD.shape[0])} pre-activations, "
            f"got {tuple(preacts_BF.shape)}."
        )
    return _GatherPreacts.apply(x_cent_BD, W_enc_FD, b_enc_F, rows_N, cols_N, preacts_BF)


def sparse_decode(
    rows_N: torch.Tensor, cols_N: torch.Tensor, vals_N: torch.Tensor, W_dec_FD: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """x_hat[b] = sum over n with rows[n] == b of vals[n] * W_dec[cols[n]]  -> [batch_size, D], no bias.

    Differentiable in ``vals_N`` and ``W_dec_FD``; dW_dec is nonzero only at the selected latents.
    Rows without entries decode to zero.  Entries need not be sorted (row-major input, as from
    ``topk_select`` / ``batch_topk_select``, skips a sort).
    """
    _check_index_pair(rows_N, cols_N)
    if vals_N.shape != rows_N.shape:
        raise ValueError(f"vals_N must have the shape of rows_N {tuple(rows_N.shape)}, got {tuple(vals_N.shape)}.")
    if W_dec_FD.dim() != 2:
        raise ValueError(f"W_dec_FD must be [F, D] (latents as rows), got shape {tuple(W_dec_FD.shape)}.")
    if int(batch_size) < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}.")
    return _SparseDecode.apply(rows_N, cols_N, vals_N, W_dec_FD, int(batch_size))


def topk_select(z_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_N, cols_N) of the k largest entries of each row of ``z_BF``, row-major, N = B * k."""
    batch_size, n_latents = z_BF.shape
    if not 0 < k <= n_latents:
        raise ValueError(f"k must be in [1, n_latents={n_latents}], got {k}.")
    cols_N = z_BF.topk(k, dim=1, sorted=False).indices.reshape(-1)
    rows_N = torch.arange(batch_size, device=z_BF.device).repeat_interleave(k)
    return rows_N, cols_N


def batch_topk_select(z_BF: torch.Tensor, k_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_N, cols_N) of the ``k_total`` largest entries of the whole B x F batch, sorted by row.

    Exact (same set as ``z_BF.flatten().topk(k_total)`` up to ties) but much cheaper: a
    flattened top-k over 33M entries costs about as much as the encoder matmul on CPU.  Take
    each row's top m candidates (m = 4x the mean count per row), select the global top-k_total
    among the B*m candidates, and accept if no row had all m of its candidates selected (then no
    row can hold a missed entry); otherwise double m and retry, ending in the exact flat top-k.
    """
    batch_size, n_latents = z_BF.shape
    n_total = batch_size * n_latents
    if not 0 < k_total <= n_total:
        raise ValueError(f"k_total must be in [1, B*F={n_total}], got {k_total}.")
    per_row = -(-k_total // batch_size)
    m = min(n_latents, 4 * per_row)
    while m < n_latents and m * 8 <= n_latents:
        cand_vals_BM, cand_cols_BM = z_BF.topk(m, dim=1, sorted=False)
        flat_N = cand_vals_BM.reshape(-1).topk(k_total, sorted=False).indices
        rows_N = flat_N // m
        if int(torch.bincount(rows_N, minlength=batch_size).max()) < m:
            flat_N, _ = torch.sort(flat_N)
            return flat_N // m, cand_cols_BM.reshape(-1)[flat_N]
        m *= 2
    flat_N, _ = torch.sort(z_BF.reshape(-1).topk(k_total, sorted=False).indices)
    return flat_N // n_latents, flat_N % n_latents


# Measured crossover (see prefer_sparse): on CPU the sparse step's extra gathers cost about as
# much as 1 dense B x F x D matmul when F ~ 8k, so sparse wins from about F >= 16k.
_CPU_MIN_LATENTS_PER_K = 16
# On GPUs the dense matmuls run on tensor cores while the sparse gathers are memory-bound and
# launch several small kernels: an estimate (not measured here, no GPU on the build machine).
_GPU_MIN_LATENTS_PER_K = 256


def prefer_sparse(batch_size: int, n_latents: int, d_in: int, device: torch.device | str, k: int = 20) -> bool:
    """The ``sparse_kernel="auto"`` rule: is the sparse path faster for this shape on this device?

    Dense training costs about 6 B*F*D multiply-adds; the sparse path 1 B*F*D (the selecting
    encoder forward) plus O(B*k*D) gathers with a larger constant and a fixed per-step overhead
    (sorts, small kernels), so it wins once F is large relative to k.  The thresholds come from
    ``python -m vlmsae.bench`` on the build machine (2-core CPU, d = 1024, B = 4096, k = 20): see
    ``_CPU_MIN_LATENTS_PER_K`` and the figures in outputs/bench/results.md.  Tiny batches (< 64
    rows) stay dense: there the fixed overhead dominates and both are fast anyway.
    """
    if batch_size < 64 or d_in < 1 or k < 1:
        return False
    device_type = torch.device(device).type
    min_ratio = _CPU_MIN_LATENTS_PER_K if device_type == "cpu" else _GPU_MIN_LATENTS_PER_K
    return n_latents >= min_ratio * k


def use_sparse_kernel(
    kernel: str, batch_size: int, n_latents: int, d_in: int, device: torch.device | str, k: int = 20
) -> bool:
    """Resolve the config's ``sae.sparse_kernel`` (auto | sparse | dense) to a yes/no for this step."""
    if kernel == "sparse":
        return True
    if kernel == "dense":
        return False
    if kernel == "auto":
        return prefer_sparse(batch_size, n_latents, d_in, device, k=k)
    raise ValueError(f"sparse_kernel must be 'auto', 'sparse' or 'dense', got {kernel!r}.")
