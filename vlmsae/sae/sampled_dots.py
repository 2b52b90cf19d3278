"""Canonical sampled dot products for exact selection: out[n] = sum_i x[rows[n], i] * W[cols[n], i] + b[cols[n]].

The canonical values of :mod:`vlmsae.sae.select` (METHOD §2 "Precision"). Every entry goes through the same
reduction, so its value depends on its operands alone (and on the device), never on how many entries are
computed with it or where they sit:

* CUDA: a Triton kernel that reads the rows in place (no [Z, D] temporaries: the recomputation costs about one
  read of each candidate's encoder row); float32 products, a float64 sum, one rounding to float32;
* CPU: one ``torch.sparse.sampled_addmm`` on the entries' CSR pattern (each entry one float32 dot product of
  the two rows, computed in place; about 20x cheaper than gathering the rows), plus the bias in float32;
* other devices, or no Triton: float32 products of gathered rows summed in float64, in chunks of one shape.

``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (tests/sae/test_select.py compares it with the others).
"""

from __future__ import annotations

import os
import warnings

import torch

try:  # Triton ships with torch's CUDA wheels; without it the torch path serves every device
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_CHUNK = 8192  # entries per gathered chunk on the torch path: one fixed shape
_BLOCK_N = 32  # entries per Triton program
_BLOCK_D = 128  # input dims per Triton step


if triton is not None:

    @triton.jit
    def _dots_kernel(
        x_ptr, w_ptr, b_ptr, rows_ptr, cols_ptr, out_ptr, n_entries, d_in, stride_x, stride_w,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_entries
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0)
        cols = tl.load(cols_ptr + offs_n, mask=mask_n, other=0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float64)
        for d0 in range(0, d_in, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_n[:, None] & (offs_d < d_in)[None, :]
            xv = tl.load(x_ptr + rows[:, None] * stride_x + offs_d[None, :], mask=mask, other=0.0)
            wv = tl.load(w_ptr + cols[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0)
            acc += tl.sum((xv * wv).to(tl.float64), axis=1)  # float32 products, a float64 sum
        bias = tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float64)
        tl.store(out_ptr + offs_n, (acc + bias).to(tl.float32), mask=mask_n)


def _triton_dots(x_BD, W_FD, b_F, rows_Z, cols_Z, out_Z) -> None:
    n_entries = rows_Z.numel()
    grid = (triton.cdiv(n_entries, _BLOCK_N),)
    _dots_kernel[grid](
        x_BD, W_FD, b_F, rows_Z, cols_Z, out_Z, n_entries, x_BD.shape[1], x_BD.stride(0), W_FD.stride(0),
        BLOCK_N=_BLOCK_N, BLOCK_D=_BLOCK_D,
    )  # fmt: skip


def _torch_dots(x_BD, W_FD, b_F, rows_Z, cols_Z, out_Z) -> None:
    n_entries = rows_Z.numel()
    for start in range(0, n_entries, _CHUNK):
        stop = min(n_entries, start + _CHUNK)
        rows, cols = rows_Z[start:stop], cols_Z[start:stop]
        pad = _CHUNK - (stop - start)
        if pad:
            rows = torch.cat([rows, rows[:1].expand(pad)])
            cols = torch.cat([cols, cols[:1].expand(pad)])
        # float32 products, then a float64 sum (the cast before the sum: far faster on CPU than sum(dtype=))
        dots = (x_BD.index_select(0, rows) * W_FD.index_select(0, cols)).double().sum(dim=1)
        dots += b_F.index_select(0, cols).double()
        out_Z[start:stop] = dots[: stop - start].float()


def csr_sampled_dots(crow: torch.Tensor, cols: torch.Tensor, a_BD: torch.Tensor, b_FD: torch.Tensor) -> torch.Tensor:
    """<a[row], b[col]> of each entry of a CSR pattern (row pointers ``crow``, ``cols`` in row order), in place by
    one ``torch.sparse.sampled_addmm`` (CPU; about 20x cheaper than gathering the rows)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow,
            cols,
            torch.zeros(cols.numel(), dtype=a_BD.dtype),
            size=(a_BD.shape[0], b_FD.shape[0]),
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(pattern, a_BD, b_FD.T, beta=0.0).values()


def _cpu_dots(x_BD, W_FD, b_F, rows_Z, cols_Z, out_Z) -> None:
    n_latents = W_FD.shape[0]
    # CSR wants row-major order and no repeated entry: unique sorts and merges repeats.
    flat_U, inverse_Z = torch.unique(rows_Z * n_latents + cols_Z, return_inverse=True)
    rows_U, cols_U = flat_U // n_latents, flat_U % n_latents
    crow = torch.zeros(x_BD.shape[0] + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(rows_U, minlength=x_BD.shape[0]), 0, out=crow[1:])
    out_Z.copy_((csr_sampled_dots(crow, cols_U, x_BD, W_FD) + b_F[cols_U])[inverse_Z])


@torch.no_grad()
def sampled_dots(
    x_BD: torch.Tensor,
    W_FD: torch.Tensor,
    b_F: torch.Tensor,
    rows_Z: torch.Tensor,
    cols_Z: torch.Tensor,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """The canonical float32 value of each (rows[n], cols[n]) entry (float32 operands, int64 indices) -> [Z].

    ``use_triton``: None = the device's kernel (above); True = Triton; False = the gathered float64 path.
    """
    x_BD, W_FD, b_F = x_BD.float().contiguous(), W_FD.float().contiguous(), b_F.float().contiguous()
    out_Z = torch.empty(rows_Z.numel(), dtype=torch.float32, device=x_BD.device)
    if rows_Z.numel() == 0:
        return out_Z
    auto = use_triton is None
    if auto:
        use_triton = triton is not None and (x_BD.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if use_triton:
        _triton_dots(x_BD, W_FD, b_F, rows_Z.contiguous(), cols_Z.contiguous(), out_Z)
    elif x_BD.device.type == "cpu" and auto:
        _cpu_dots(x_BD, W_FD, b_F, rows_Z, cols_Z, out_Z)
    else:
        _torch_dots(x_BD, W_FD, b_F, rows_Z, cols_Z, out_Z)
    return out_Z
