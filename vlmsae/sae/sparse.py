"""Sparse training compute for TopK / BatchTopK SAEs: touch only the k selected latents per sample.

A TopK SAE keeps k of F latents per sample, yet dense training pays for six B x F x D matmuls per step. Only
the encoder forward that *selects* is needed in full; after selection everything involves Z = B*k entries.
Two autograd primitives make the rest cost O(Z * D):

``gather_preacts``  z[rows, cols], whose backward writes dW_enc / db_enc / dx_cent only through the selected
                    latents;
``sparse_decode``   x_hat[rows[n]] += vals[n] * W_dec[cols[n]] (no bias), with dvals and dW_dec at selected rows.

Each "sum over selected entries grouped by a key" product is one ``F.embedding_bag(mode="sum",
per_sample_weights=...)`` (a [B, k] bag matrix for TopK's row-major layout, offsets after grouping otherwise:
BatchTopK, Matryoshka groups, AuxK); the dot products dvals are one ``torch.sparse.sampled_addmm`` on CPU. No
Z x D or B x F temporary is built. The grouping (a sort, CSR row pointers) is a ``_Plan`` computed once per
selection. Weight gradients are ordinary dense [F, D] tensors (zero off the selected rows), so the optimiser,
clipping and the decoder projection work unchanged. Timings: ``prefer_sparse`` and docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F

from vlmsae.sae.sampled_dots import csr_sampled_dots

__all__ = [
    "batch_topk_select",
    "gather_preacts",
    "preact_buffer",
    "prefer_sparse",
    "release_selection_buffers",
    "selection_preacts",
    "sparse_decode",
    "use_sparse_kernel",
]

# Entries per chunk when gathering both operands of a dot product (non-CPU devices only):
# bounds the [chunk, D] temporaries without launching thousands of small kernels.
_GATHER_CHUNK_ENTRIES = 1 << 16


def _check_index_pair(rows_Z: torch.Tensor, cols_Z: torch.Tensor) -> None:
    if rows_Z.dim() != 1 or cols_Z.dim() != 1 or rows_Z.shape != cols_Z.shape:
        raise ValueError(
            f"rows_Z and cols_Z must be 1-D and of equal length, got shapes {tuple(rows_Z.shape)} and "
            f"{tuple(cols_Z.shape)}; flatten [B, k] top-k indices with .reshape(-1)."
        )
    if rows_Z.dtype != torch.long or cols_Z.dtype != torch.long:
        raise ValueError(
            f"rows_Z and cols_Z must be int64 (torch.long), got {rows_Z.dtype} and {cols_Z.dtype}; "
            "convert with .long()."
        )


# Grouping plans: every product groups the Z entries by row (decode, dx) or by column (dW_enc, dW_dec); that
# costs a sort and small ops (slow on a busy CPU), so a plan is computed once per selection and reused by the
# forward, both backwards and every Matryoshka prefix decode.

_ROW_MAJOR_ROWS: dict[tuple[int, int, str], torch.Tensor] = {}
_DX_SUM_SHORTCUT = True  # see _grad_feeds_only_a_bias; a switch for A/B timing and tests


@contextlib.contextmanager
def _single_threaded(device: torch.device):
    """Run the small O(Z) index ops (sorts, counts, permutations) on one thread: each multi-threaded op ends
    in a barrier, and on a busy shared CPU a descheduled peer turned a 1 ms argsort into 300 ms (6 ms on one
    thread, 2-core build machine under load ~8). The heavy kernels keep all threads."""
    n_threads = torch.get_num_threads()
    if n_threads == 1 or device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def _row_major_rows(n_rows: int, k: int, device: torch.device) -> torch.Tensor:
    """[0]*k + [1]*k + ... + [n_rows-1]*k, cached: TopK selections hand out this very tensor so
    the kernels recognise TopK's layout by identity, with no check on the data."""
    key = (n_rows, k, str(device))
    rows_Z = _ROW_MAJOR_ROWS.get(key)
    if rows_Z is None or rows_Z._version != 0:
        if len(_ROW_MAJOR_ROWS) > 16:
            _ROW_MAJOR_ROWS.clear()
        rows_Z = torch.arange(n_rows, device=device).repeat_interleave(k)
        _ROW_MAJOR_ROWS[key] = rows_Z
    return rows_Z


class _Plan:
    """How to group one selection's entries (rows_Z, cols_Z) by row and by column; lazily built."""

    def __init__(self, rows_Z: torch.Tensor, cols_Z: torch.Tensor, n_rows: int) -> None:
        self.rows_Z, self.cols_Z, self.n_rows = rows_Z, cols_Z, n_rows
        self.n_entries = rows_Z.numel()
        with _single_threaded(rows_Z.device):
            self.k = self._detect_row_major_k()
        self._by_col: dict[int, tuple] = {}

    def _detect_row_major_k(self) -> int:
        n_rows, n_entries = self.n_rows, self.n_entries
        if n_rows == 0 or n_entries == 0 or n_entries % n_rows:
            return 0
        k = n_entries // n_rows
        expected = _row_major_rows(n_rows, k, self.rows_Z.device)  # the cached tensor, unless it was modified
        return k if self.rows_Z is expected or torch.equal(self.rows_Z, expected) else 0

    @functools.cached_property
    def by_row(self):
        """(order_Z or None, cols in row order, bag offsets [n_rows], CSR row pointers [n_rows + 1])."""
        rows_Z, cols_Z = self.rows_Z, self.cols_Z
        with _single_threaded(rows_Z.device):
            sorted_ = self.n_entries < 2 or bool((rows_Z[1:] >= rows_Z[:-1]).all())
            order_Z = None if sorted_ else torch.argsort(rows_Z, stable=True)
            if order_Z is not None:
                rows_Z, cols_Z = rows_Z[order_Z], cols_Z[order_Z]
            counts = torch.bincount(rows_Z, minlength=self.n_rows)
            if counts.numel() > self.n_rows:
                raise ValueError(f"a row index is >= {self.n_rows} (the batch size / number of bags); check rows_Z.")
            crow = torch.zeros(self.n_rows + 1, dtype=torch.long, device=rows_Z.device)
            torch.cumsum(counts, 0, out=crow[1:])
            return order_Z, cols_Z, crow[:-1], crow

    def by_col(self, n_latents: int):
        """(order_Z, rows in column order, bag offsets [n_latents]) for the dW products."""
        if n_latents not in self._by_col:
            with _single_threaded(self.rows_Z.device):
                order_Z = torch.argsort(self.cols_Z, stable=True)
                rows_by_col_Z = torch.div(order_Z, self.k, rounding_mode="floor") if self.k else self.rows_Z[order_Z]
                counts = torch.bincount(self.cols_Z, minlength=n_latents)
                if counts.numel() > n_latents:
                    raise ValueError(f"a column index is >= n_latents={n_latents}; check cols_Z.")
                self._by_col[n_latents] = (order_Z, rows_by_col_Z, torch.cumsum(counts, 0) - counts)
        return self._by_col[n_latents]


_PLANS: list[tuple] = []  # (weakref rows, weakref cols, versions, n_rows, plan), most recent first


def _plan_for(rows_Z: torch.Tensor, cols_Z: torch.Tensor, n_rows: int) -> _Plan:
    versions = (rows_Z._version, cols_Z._version)
    for rows_ref, cols_ref, vers, rows_count, plan in _PLANS:
        if rows_ref() is rows_Z and cols_ref() is cols_Z and vers == versions and rows_count == n_rows:
            return plan
    plan = _Plan(rows_Z, cols_Z, n_rows)
    _PLANS.insert(0, (weakref.ref(rows_Z), weakref.ref(cols_Z), versions, n_rows, plan))
    del _PLANS[4:]
    return plan


def _bag_by_row(plan: _Plan, weight_Z: torch.Tensor, table_FD: torch.Tensor) -> torch.Tensor:
    """out[b] = sum over n with rows[n] == b of weight[n] * table[cols[n]]  -> [n_rows, D]."""
    if plan.n_entries == 0:
        return table_FD.new_zeros(plan.n_rows, table_FD.shape[1])
    weight_Z = weight_Z.to(table_FD.dtype)
    if plan.k:  # TopK: a [B, k] bag matrix, no offsets
        return F.embedding_bag(
            plan.cols_Z.reshape(plan.n_rows, plan.k),
            table_FD,
            mode="sum",
            per_sample_weights=weight_Z.reshape(plan.n_rows, plan.k),
        )
    order_Z, cols_by_row_Z, offsets, _ = plan.by_row
    if order_Z is not None:
        with _single_threaded(weight_Z.device):
            weight_Z = weight_Z[order_Z]
    return F.embedding_bag(cols_by_row_Z, table_FD, offsets, mode="sum", per_sample_weights=weight_Z.contiguous())


def _bag_by_col(plan: _Plan, weight_Z: torch.Tensor, table_BD: torch.Tensor, n_latents: int) -> torch.Tensor:
    """out[f] = sum over n with cols[n] == f of weight[n] * table[rows[n]]  -> [n_latents, D]."""
    if plan.n_entries == 0:
        return table_BD.new_zeros(n_latents, table_BD.shape[1])
    order_Z, rows_by_col_Z, offsets = plan.by_col(n_latents)
    with _single_threaded(weight_Z.device):
        weight_Z = weight_Z.to(table_BD.dtype)[order_Z]
    return F.embedding_bag(rows_by_col_Z, table_BD, offsets, mode="sum", per_sample_weights=weight_Z)


def _sampled_dots(plan: _Plan, a_BD: torch.Tensor, b_FD: torch.Tensor) -> torch.Tensor:
    """out[n] = <a[rows[n]], b[cols[n]]> -> [Z] (an SDDMM). CPU: ``csr_sampled_dots`` on the plan's pattern (no
    [Z, D] temporary); other devices: gathers (batched matrix-vector products for TopK's layout)."""
    dtype = torch.promote_types(a_BD.dtype, b_FD.dtype)
    a_BD, b_FD = a_BD.to(dtype), b_FD.to(dtype)
    if plan.n_entries == 0:
        return a_BD.new_zeros(0)
    if a_BD.device.type == "cpu":
        order_Z, cols_by_row_Z, _, crow = plan.by_row
        vals_Z = csr_sampled_dots(crow, cols_by_row_Z, a_BD, b_FD)
        if order_Z is None:
            return vals_Z
        with _single_threaded(vals_Z.device):
            return torch.empty_like(vals_Z).index_copy_(0, order_Z, vals_Z)
    if plan.k:
        return torch.bmm(b_FD[plan.cols_Z].view(plan.n_rows, plan.k, -1), a_BD.unsqueeze(2)).reshape(-1)
    out_Z = torch.empty(plan.n_entries, dtype=dtype, device=a_BD.device)
    for start in range(0, plan.n_entries, _GATHER_CHUNK_ENTRIES):
        stop = min(plan.n_entries, start + _GATHER_CHUNK_ENTRIES)
        out_Z[start:stop] = (a_BD[plan.rows_Z[start:stop]] * b_FD[plan.cols_Z[start:stop]]).sum(1)
    return out_Z


def _no_autocast(device: torch.device):
    """The primitives compute in the weights' dtype: under bf16 autocast a gathered dot product
    would otherwise silently drop to bf16."""
    return torch.autocast(device_type=device.type, enabled=False)


def _grad_feeds_only_a_bias(x_cent_BD: torch.Tensor) -> bool:
    """True if x_cent's gradient can only reach a [D] bias through ``x - b_dec`` (x without grad): then only
    the batch sum of dx_cent matters, db_enc @ W_enc, instead of a [Z] gather of W_enc rows (~10 ms of a ~350 ms
    step at F = 8,192 on the build CPU). Hooks or retain_grad on x_cent (they see per-row values) disable it."""
    grad_fn = x_cent_BD.grad_fn
    if grad_fn is None or grad_fn.name() != "SubBackward0" or x_cent_BD.retains_grad or x_cent_BD._backward_hooks:
        return False
    (x_fn, _), (bias_fn, _) = grad_fn.next_functions
    return (
        x_fn is None
        and bias_fn is not None
        and bias_fn.name() == "torch::autograd::AccumulateGrad"
        and bias_fn.variable.dim() == 1
    )


class _GatherPreacts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_cent_BD, W_enc_FD, b_enc_F, rows_Z, cols_Z, preacts_BF, values_Z):
        plan = _plan_for(rows_Z, cols_Z, x_cent_BD.shape[0])
        with _no_autocast(W_enc_FD.device):
            if values_Z is not None:  # the exact selection's float32 values (vlmsae.sae.select)
                vals_Z = values_Z.detach().to(W_enc_FD.dtype).clone()
            elif preacts_BF is not None:
                # The no-grad forward used for selection already holds these numbers: reading
                # them is free and keeps the values identical to what selection saw.
                with _single_threaded(rows_Z.device):
                    vals_Z = preacts_BF.detach()[rows_Z, cols_Z].to(W_enc_FD.dtype)
            else:
                vals_Z = _sampled_dots(plan, x_cent_BD, W_enc_FD).to(W_enc_FD.dtype) + b_enc_F[cols_Z]
        ctx.save_for_backward(x_cent_BD, W_enc_FD, rows_Z, cols_Z)
        ctx.plan = plan
        ctx.b_enc_meta = (b_enc_F.shape, b_enc_F.dtype)
        ctx.dx_sum_only = _DX_SUM_SHORTCUT and _grad_feeds_only_a_bias(x_cent_BD)
        return vals_Z

    @staticmethod
    def backward(ctx, dvals_Z):
        x_cent_BD, W_enc_FD, _rows_Z, cols_Z = ctx.saved_tensors
        plan = ctx.plan
        dx_BD = dW_FD = db_F = None
        with _no_autocast(dvals_Z.device):
            dvals_Z = dvals_Z.contiguous()
            with _single_threaded(dvals_Z.device):  # sum of dvals per latent: db_enc
                dvals_F = torch.zeros(W_enc_FD.shape[0], dtype=dvals_Z.dtype, device=dvals_Z.device)
                dvals_F.index_add_(0, cols_Z, dvals_Z)
            if ctx.needs_input_grad[0]:
                if ctx.dx_sum_only:
                    # Rows equal to mean_b dx[b]: the batch sum, all the bias gradient sees, is exact.
                    batch_size = x_cent_BD.shape[0]
                    dx_mean_D = (dvals_F.to(W_enc_FD.dtype) @ W_enc_FD) / max(batch_size, 1)
                    dx_BD = dx_mean_D.to(x_cent_BD.dtype).expand(batch_size, -1)
                else:
                    dx_BD = _bag_by_row(plan, dvals_Z, W_enc_FD).to(x_cent_BD.dtype)
            if ctx.needs_input_grad[1]:
                dW_FD = _bag_by_col(plan, dvals_Z, x_cent_BD, W_enc_FD.shape[0]).to(W_enc_FD.dtype)
            if ctx.needs_input_grad[2]:
                shape, dtype = ctx.b_enc_meta
                db_F = dvals_F.to(dtype).reshape(shape)
        return dx_BD, dW_FD, db_F, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_Z, cols_Z, vals_Z, W_dec_FD, batch_size):
        plan = _plan_for(rows_Z, cols_Z, batch_size)
        with _no_autocast(W_dec_FD.device):
            x_hat_BD = _bag_by_row(plan, vals_Z, W_dec_FD)
        ctx.save_for_backward(rows_Z, cols_Z, vals_Z, W_dec_FD)
        ctx.plan = plan
        return x_hat_BD

    @staticmethod
    def backward(ctx, dx_hat_BD):
        _rows_Z, _cols_Z, vals_Z, W_dec_FD = ctx.saved_tensors
        plan = ctx.plan
        dvals_Z = dW_FD = None
        with _no_autocast(dx_hat_BD.device):
            dx_hat_BD = dx_hat_BD.contiguous()
            if ctx.needs_input_grad[2]:
                dvals_Z = _sampled_dots(plan, dx_hat_BD, W_dec_FD).to(vals_Z.dtype)
            if ctx.needs_input_grad[3]:
                dW_FD = _bag_by_col(plan, vals_Z, dx_hat_BD, W_dec_FD.shape[0]).to(W_dec_FD.dtype)
        return None, None, dvals_Z, dW_FD, None


def gather_preacts(
    x_cent_BD: torch.Tensor,
    W_enc_FD: torch.Tensor,
    b_enc_F: torch.Tensor,
    rows_Z: torch.Tensor,
    cols_Z: torch.Tensor,
    preacts_BF: torch.Tensor | None = None,
    values_Z: torch.Tensor | None = None,
) -> torch.Tensor:
    """The selected pre-activations vals[n] = x_cent[rows[n]] . W_enc[cols[n]] + b_enc[cols[n]], differentiable
    in x_cent, W_enc and b_enc without a dense B x F gradient. ``preacts_BF`` (the selection's no-grad z) or
    ``values_Z`` (an exact selection's values, :mod:`vlmsae.sae.select`) supply the values instead of
    recomputing them. Columns may repeat; rows may hold any number of entries or none."""
    _check_index_pair(rows_Z, cols_Z)
    if values_Z is not None and values_Z.shape != rows_Z.shape:
        raise ValueError(f"values_Z must have the shape of rows_Z {tuple(rows_Z.shape)}, got {tuple(values_Z.shape)}.")
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
    return _GatherPreacts.apply(x_cent_BD, W_enc_FD, b_enc_F, rows_Z, cols_Z, preacts_BF, values_Z)


def sparse_decode(
    rows_Z: torch.Tensor, cols_Z: torch.Tensor, vals_Z: torch.Tensor, W_dec_FD: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """x_hat[b] = sum over n with rows[n] == b of vals[n] * W_dec[cols[n]] -> [batch_size, D], no bias.

    Differentiable in ``vals_Z`` and ``W_dec_FD`` (dW_dec only at the selected latents); empty rows decode to
    zero. Entries need not be sorted (row-major input, as from the select functions, skips a sort)."""
    _check_index_pair(rows_Z, cols_Z)
    if vals_Z.shape != rows_Z.shape:
        raise ValueError(f"vals_Z must have the shape of rows_Z {tuple(rows_Z.shape)}, got {tuple(vals_Z.shape)}.")
    if W_dec_FD.dim() != 2:
        raise ValueError(f"W_dec_FD must be [F, D] (latents as rows), got shape {tuple(W_dec_FD.shape)}.")
    if int(batch_size) < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}.")
    return _SparseDecode.apply(rows_Z, cols_Z, vals_Z, W_dec_FD, int(batch_size))


_PREACT_BUFFERS: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def selection_preacts(x_cent_BD: torch.Tensor, W_enc_FD: torch.Tensor, b_enc_F: torch.Tensor) -> torch.Tensor:
    """The no-grad pre-activations z = x_cent @ W_enc.T + b_enc to select from, in the operands' dtype (autocast
    ignored), written on CPU into a [B, F] buffer reused per shape (:func:`preact_buffer`).

    Why: a fresh [4096, 8192] float32 tensor (128 MB) is mmap'ed and page-faulted in every step; reuse measured
    374 -> 353 ms per TopK step on the 2-core build CPU. The next call with that shape overwrites the result.
    """
    device = x_cent_BD.device
    dtype = torch.promote_types(x_cent_BD.dtype, W_enc_FD.dtype)
    with _no_autocast(device):
        out_BF = preact_buffer(x_cent_BD.shape[0], W_enc_FD.shape[0], dtype, device)
        if out_BF is None:
            return torch.addmm(b_enc_F.to(dtype), x_cent_BD.to(dtype), W_enc_FD.to(dtype).T)
        return torch.addmm(b_enc_F.to(dtype), x_cent_BD.to(dtype), W_enc_FD.to(dtype).T, out=out_BF)


def preact_buffer(n_rows: int, n_latents: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The reused [n_rows, n_latents] buffer of :func:`selection_preacts` on CPU; None elsewhere (see there)."""
    if torch.device(device).type != "cpu":
        return None
    key = (n_rows, n_latents, dtype, str(device))
    out_BF = _PREACT_BUFFERS.get(key)
    if out_BF is None:
        out_BF = _PREACT_BUFFERS[key] = torch.empty(key[:2], dtype=dtype, device=device)
    return out_BF


def release_selection_buffers() -> None:
    """Free the buffers held by :func:`selection_preacts`."""
    _PREACT_BUFFERS.clear()


def batch_topk_select(z_BF: torch.Tensor, k_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_Z, cols_Z) of the ``k_total`` largest entries of the whole B x F batch, sorted by row.

    The set of ``z_BF.flatten().topk(k_total)`` (up to ties), cheaper: the global top-k of each row's top m
    (4x the mean count), accepted when no row had all m selected (none can hide a missed entry); else m doubles.
    """
    batch_size, n_latents = z_BF.shape
    n_total = batch_size * n_latents
    if not 0 < k_total <= n_total:
        raise ValueError(f"k_total must be in [1, B*F={n_total}], got {k_total}.")
    per_row = -(-k_total // batch_size)
    m = min(n_latents, 4 * per_row)
    while m < n_latents and m * 8 <= n_latents:
        cand_vals_BM, cand_cols_BM = z_BF.topk(m, dim=1, sorted=False)
        flat_Z = cand_vals_BM.reshape(-1).topk(k_total, sorted=False).indices
        with _single_threaded(z_BF.device):
            if int(torch.bincount(flat_Z // m, minlength=batch_size).max()) < m:
                flat_Z, _ = torch.sort(flat_Z)
                return flat_Z // m, cand_cols_BM.reshape(-1)[flat_Z]
        m *= 2
    flat_Z = z_BF.reshape(-1).topk(k_total, sorted=False).indices
    with _single_threaded(z_BF.device):
        flat_Z, _ = torch.sort(flat_Z)
        return flat_Z // n_latents, flat_Z % n_latents


# CPU crossover, measured with vlmsae.bench.sae_step.measure_step_seconds on the 2-core build
# machine (d = 1024, B = 4096, k = 20, fp32, 2 threads, shared with other jobs at load ~7),
# sparse / dense tokens/s of the TopKSAE step:  F = 64: 0.86   128: 1.05   256: 1.17
# 512: 1.33   1024: 1.47   2048: 1.90   8192: ~3.5.  Sparse wins from F ~ 6k on, i.e. F >= 8k here.
_CPU_MIN_LATENTS_PER_K = 8
# GPUs: dense matmuls run on tensor cores while the sparse path is memory-bound and launches small kernels, so
# the crossover is at a much larger F. An estimate from bandwidth and FLOP rates, NOT measured (re-measure with
# `python -m vlmsae.bench`; float32 dense matmuls, the precision policy, move it lower still).
_GPU_MIN_LATENTS_PER_K = 512


def prefer_sparse(batch_size: int, n_latents: int, d_in: int, device: torch.device | str, k: int = 20) -> bool:
    """The ``sparse_kernel="auto"`` rule: is the sparse path faster for this shape on this device?

    Dense costs ~6 B*F*D multiply-adds, sparse 1 B*F*D plus O(B*k*D) gathers and a fixed overhead, so sparse
    wins once F is large relative to k (constants above). Tiny batches (< 64 rows) stay dense."""
    if batch_size < 64 or d_in < 1 or k < 1:
        return False
    device_type = torch.device(device).type
    min_ratio = _CPU_MIN_LATENTS_PER_K if device_type == "cpu" else _GPU_MIN_LATENTS_PER_K
    return n_latents >= min_ratio * k


def use_sparse_kernel(
    kernel: str, batch_size: int, n_latents: int, d_in: int, device: torch.device | str, k: int = 20
) -> bool:
    """Resolve the config's ``sae.sparse_kernel`` (auto | sparse | dense) to a yes/no for this step."""
    if kernel not in ("auto", "sparse", "dense"):
        raise ValueError(f"sparse_kernel must be 'auto', 'sparse' or 'dense', got {kernel!r}.")
    return kernel == "sparse" or (kernel == "auto" and prefer_sparse(batch_size, n_latents, d_in, device, k=k))
