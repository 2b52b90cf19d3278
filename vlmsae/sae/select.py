"""Exact latent selection from a fast encoder matmul (the ``fast_exact`` precision policy, METHOD §2 "Precision").

Selection (top-k, batch top-k, the threshold) needs all of z = x_cent @ W_enc.T + b_enc only to decide which few
entries are kept. z comes from a fast matmul (bf16 inputs, or TF32 on CUDA) with a bound on each value's
error, and only entries whose interval [z - e, z + e] reaches the selection boundary are recomputed by one
canonical float32 kernel (:mod:`vlmsae.sae.sampled_dots`, a function of the entry's operands alone). Order:
larger canonical value first, ties -> lower latent index (TopK) or flat index b * F + f (BatchTopK); the
threshold keeps values strictly above it. So ``fp32`` (float32 matmul) and ``fast_exact`` select the same
entries and hand on the same values; ``bf16`` selects from the fast values without a bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmsae.sae.sampled_dots import sampled_dots
from vlmsae.sae.sparse import _single_threaded, batch_topk_select

POLICIES = ("fp32", "fast_exact", "bf16")
"""Resolved precision policies (``SAEConfig.precision`` also accepts ``auto``, see :func:`resolve_policy`)."""

FAST_MATMUL = {"cuda": "tf32"}
"""The fast matmul per device type (others: ``bf16``): TF32 keeps float32 output and a 6x tighter bound than
bf16 on tensor cores; CPUs have no TF32, so bf16 inputs (and a bf16 output) stand in for it there."""

_U32 = 2.0**-24
_TINY32 = 2.0**-126  # smallest normal float32: covers flushing subnormal inputs/products to zero
# Unit roundoff of the input rounding and of the output (None: the matmul returns float32). TF32 is given
# 2^-10, not 2^-11: the hardware may truncate instead of rounding to nearest.
_INPUT_U = {"fp32": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-8}
_OUTPUT_U = {"fp32": 0.0, "tf32": 0.0, "bf16": 2.0**-8}
_SAFETY = 2.0  # on top of a rigorous bound: covers the rounding of the bound's own float32 arithmetic


def resolve_policy(policy: str, device: torch.device | str) -> str:
    """``auto`` -> the fastest exact policy on ``device`` (``fast_exact`` on CUDA, ``fp32`` elsewhere: CPUs
    without bf16 matrix units run bf16 matmuls no faster than float32); others pass through, checked."""
    if policy == "auto":
        return "fast_exact" if torch.device(device).type == "cuda" else "fp32"
    if policy not in POLICIES:
        raise ValueError(f"precision policy must be 'auto' or one of {list(POLICIES)}; got {policy!r}.")
    return policy


def fast_matmul_kind(device: torch.device | str) -> str:
    """``tf32`` or ``bf16``: what the fast policies' encoder matmul runs in on ``device``."""
    return FAST_MATMUL.get(torch.device(device).type, "bf16")


def _gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term recursive sum."""
    return n * u / (1.0 - n * u)


def relative_bound(d_in: int, kind: str) -> float:
    """c such that |z_fast - z_canonical| <= c * (||x|| ||w|| + |b|) + absolute underflow term (METHOD §2)."""
    u_in, u_out = _INPUT_U[kind], _OUTPUT_U[kind]
    # Accumulation in float32 with a unit of 2^-23 (tensor cores need not round to nearest), D + 1 terms (bias).
    dot = (2 * u_in + u_in**2) + _gamma(d_in + 1, 2 * _U32) * (1 + u_in) ** 2
    fast = dot * (1 + u_out) + u_out  # the fast result, rounded to its output type
    # float32 products (one rounding each) summed in float64 (CUDA) or float32 (CPU), the bias, a final rounding
    canonical = 2 * _U32 + _gamma(d_in + 1, _U32)
    bias_add = 2 * _U32  # the bias added in float32 after a bf16 output
    return _SAFETY * (fast + canonical + bias_add)


@dataclass
class Preacts:
    """Pre-activations ``z_BF`` (float32) from a matmul of known precision and what recomputes them exactly.

    ``err_B`` bounds |z_BF[b, f] - canonical(b, f)| for every f of row b (None: no bound, policy ``bf16``).
    ``x_BD``, ``W_FD``, ``b_F`` are the float32 operands (detached).
    """

    z_BF: torch.Tensor
    x_BD: torch.Tensor
    W_FD: torch.Tensor
    b_F: torch.Tensor
    policy: str
    err_B: torch.Tensor | None

    @property
    def exact(self) -> bool:
        return self.err_B is not None

    def canonical(self, rows_Z: torch.Tensor, cols_Z: torch.Tensor) -> torch.Tensor:
        """The canonical float32 values x[row] . W[col] + b[col] (:mod:`vlmsae.sae.sampled_dots`)."""
        return sampled_dots(self.x_BD, self.W_FD, self.b_F, rows_Z, cols_Z)


@torch.no_grad()
def compute_preacts(
    x_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, policy: str, out: torch.Tensor | None = None
) -> Preacts:
    """z = x @ W.T + b under ``policy`` (resolved: fp32 | fast_exact | bf16), with its error bound per row.

    ``out``: a float32 [B, F] buffer for the fp32 matmul (the sparse path's reused buffer). Autocast is ignored.
    """
    if policy not in POLICIES:
        raise ValueError(f"compute_preacts: policy must be one of {list(POLICIES)} (resolved); got {policy!r}.")
    x_BD, W_FD, b_F = x_BD.detach().float(), W_FD.detach().float(), b_F.detach().float()
    device = x_BD.device
    kind = "fp32" if policy == "fp32" else fast_matmul_kind(device)
    with torch.autocast(device_type=device.type, enabled=False):
        if kind == "fp32":
            z_BF = torch.addmm(b_F, x_BD, W_FD.T, out=out) if out is not None else torch.addmm(b_F, x_BD, W_FD.T)
        elif kind == "tf32":
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")  # TF32 tensor cores for this one matmul
            try:
                z_BF = torch.addmm(b_F, x_BD, W_FD.T)
            finally:
                torch.set_float32_matmul_precision(previous)
        elif device.type == "cuda":  # bf16 inputs, float32 accumulation and output
            z_BF = torch.mm(x_BD.bfloat16(), W_FD.bfloat16().T, out_dtype=torch.float32).add_(b_F)
        else:
            z_BF = torch.mm(x_BD.bfloat16(), W_FD.bfloat16().T).float().add_(b_F)
    return preacts_with_bound(z_BF, x_BD, W_FD, b_F, policy, kind)


def preacts_with_bound(
    z_BF: torch.Tensor, x_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, policy: str, kind: str
) -> Preacts:
    """:class:`Preacts` for ``z_BF`` computed by a ``kind`` (fp32 | tf32 | bf16) matmul of these operands."""
    z_BF, x_BD, W_FD, b_F = z_BF.detach(), x_BD.detach().float(), W_FD.detach().float(), b_F.detach().float()
    if policy == "bf16":
        return Preacts(z_BF, x_BD, W_FD, b_F, policy, None)
    w_max = W_FD.norm(dim=1).max() if W_FD.shape[0] else W_FD.new_zeros(())
    b_max = b_F.abs().max() if b_F.numel() else b_F.new_zeros(())
    x_norm_B = x_BD.norm(dim=1)
    d_in = x_BD.shape[1]
    tiny_B = _SAFETY * _TINY32 * (d_in + 1) * (2 + x_norm_B + w_max)
    err_B = relative_bound(d_in, kind) * (x_norm_B * w_max + b_max) + tiny_B
    # Rows with inf/NaN bounds (overflowing norms) recompute everything: nothing is proven out.
    err_B = torch.where(torch.isfinite(err_B), err_B, torch.full_like(err_B, float("inf")))
    return Preacts(z_BF, x_BD, W_FD, b_F, policy, err_B)


def _rank_candidates(keys_Z: torch.Tensor, vals_Z: torch.Tensor) -> torch.Tensor:
    """Order of candidates by (key ascending, value descending, position ascending): stable sorts only."""
    order_Z = torch.sort(vals_Z, descending=True, stable=True).indices
    return order_Z[torch.sort(keys_Z[order_Z], stable=True).indices]


@torch.no_grad()
def topk_exact(pre: Preacts, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows_Z, cols_Z, vals_Z) of the k largest entries of each row, row-major with columns ascending.

    Exact policies: the k largest canonical values (ties -> lower column), values canonical float32.
    ``bf16``: torch's top-k of the fast values (ties as torch breaks them), those values.
    """
    z_BF = pre.z_BF
    batch_size, n_latents = z_BF.shape
    if not 0 < k <= n_latents:
        raise ValueError(f"k must be in [1, n_latents={n_latents}], got {k}.")
    if not pre.exact:
        cols_BK = torch.sort(z_BF.topk(k, dim=1, sorted=False).indices, dim=1).values
        rows_Z = torch.arange(batch_size, device=z_BF.device).repeat_interleave(k)
        cols_Z = cols_BK.reshape(-1)
        return rows_Z, cols_Z, z_BF[rows_Z, cols_Z]
    # The k-th largest lower end z - e of a row is a floor under its k-th canonical value; an entry is out only
    # if its upper end z + e is below that floor, i.e. z < kth(z) - 2e.
    err2_B1 = 2 * pre.err_B[:, None]

    def cut(vals_BM: torch.Tensor) -> torch.Tensor:
        return vals_BM.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values - err2_B1

    # First look at a few more than k per row for the float32 bound, 4k for the fast ones (doubled on demand).
    first_m = min(n_latents, k + max(8, k // 2) if pre.policy == "fp32" else 4 * k)
    rows_M, cols_M = _row_candidates(z_BF, cut, first_m)
    with _single_threaded(z_BF.device):  # small ops on the candidates (see vlmsae.sae.sparse)
        vals_M = pre.canonical(rows_M, cols_M)
        order_M = _rank_candidates(rows_M, _orderable(vals_M))
        rows_M, cols_M, vals_M = rows_M[order_M], cols_M[order_M], vals_M[order_M]
        counts_B = torch.bincount(rows_M, minlength=batch_size)
        starts_B = torch.cumsum(counts_B, 0) - counts_B
        keep_M = torch.arange(rows_M.numel(), device=rows_M.device) - starts_B[rows_M] < k  # rank in its row < k
        rows_Z, cols_Z, vals_Z = rows_M[keep_M], cols_M[keep_M], vals_M[keep_M]
        order_Z = torch.sort(rows_Z * n_latents + cols_Z).indices  # row-major, columns ascending
        return rows_Z[order_Z], cols_Z[order_Z], vals_Z[order_Z]


@torch.no_grad()
def batch_topk_exact(pre: Preacts, k_total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows_Z, cols_Z, vals_Z) of the ``k_total`` largest entries of the whole batch, in flat-index order.

    Exact policies: the largest canonical values, ties -> lower flat index b * F + f. ``bf16``: fast values.
    """
    z_BF = pre.z_BF
    if not pre.exact:
        rows_Z, cols_Z = batch_topk_select(z_BF, k_total)
        return rows_Z, cols_Z, z_BF[rows_Z, cols_Z]
    if not 0 < k_total <= z_BF.numel():
        raise ValueError(f"k_total must be in [1, B*F={z_BF.numel()}], got {k_total}.")
    err_B1 = pre.err_B[:, None]

    def cut(vals_BM: torch.Tensor) -> torch.Tensor:
        # The batch's k_total-th largest lower end z - e (over the rows' top m: exact once every row's m-th
        # value is below the cut, which _row_candidates checks) is a floor under the k_total-th canonical value.
        lower_Z = (vals_BM - err_B1).reshape(-1)
        floor = lower_Z.topk(min(k_total, lower_Z.numel()), sorted=False).values.min()
        return floor - err_B1

    # Rows hold k_total / B entries on average but hard samples many more: start at 4x (8x for a fast matmul).
    per_row = -(-k_total // z_BF.shape[0])
    first_m = min(z_BF.shape[1], (4 if pre.policy == "fp32" else 8) * per_row)
    rows_M, cols_M = _row_candidates(z_BF, cut, first_m)  # flat-index order
    with _single_threaded(z_BF.device):
        vals_M = pre.canonical(rows_M, cols_M)
        order_M = torch.sort(_orderable(vals_M), descending=True, stable=True).indices[:k_total]
        order_M = torch.sort(order_M).values  # back to flat-index order
        return rows_M[order_M], cols_M[order_M], vals_M[order_M]


@torch.no_grad()
def above_threshold_exact(pre: Preacts, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows_Z, cols_Z, vals_Z) of the entries strictly above ``threshold`` (a scalar), in flat-index order."""
    z_BF = pre.z_BF
    if not pre.exact:
        rows_Z, cols_Z = (z_BF > threshold).nonzero(as_tuple=True)
        return rows_Z, cols_Z, z_BF[rows_Z, cols_Z]
    # Candidates z >= threshold - e; the cut is rounded down one float32 step so its rounding never drops an
    # entry, and NaN (false under every comparison) is kept by ~(z < cut).
    cut_B1 = torch.nextafter(threshold - pre.err_B[:, None], torch.tensor(float("-inf"), device=z_BF.device))
    rows_M, cols_M = (~(z_BF < cut_B1)).nonzero(as_tuple=True)
    with _single_threaded(z_BF.device):
        vals_M = pre.canonical(rows_M, cols_M)
        keep_M = vals_M > threshold
        return rows_M[keep_M], cols_M[keep_M], vals_M[keep_M]


@torch.no_grad()
def masked_topk_exact(pre: Preacts, keep_F: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols_Z, vals_Z), row-major with k per row: the k largest entries of each row among the latents in
    ``keep_F`` (AuxK's dead latents; needs k <= keep_F.sum()), selected as :func:`topk_exact` selects."""
    b_F = pre.b_F.masked_fill(~keep_F, float("-inf")) if pre.exact else pre.b_F  # a masked latent stays out
    masked = Preacts(pre.z_BF.masked_fill(~keep_F, float("-inf")), pre.x_BD, pre.W_FD, b_F, pre.policy, pre.err_B)
    _, cols_Z, vals_Z = topk_exact(masked, k)
    return cols_Z, vals_Z


def _row_candidates(z_BF: torch.Tensor, cut_of, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) in flat-index order of the entries with z >= cut (per row, ``cut_of(top-m values)``, the
    values in no particular order).

    Looks only at each row's m largest entries, which hold every candidate once each row's m-th value is
    below its cut; otherwise m doubles (up to F: the whole row). The cut is rounded down one float32 step so
    its own rounding never drops an entry; NaN (compares false) counts as a candidate, as torch.topk ranks it
    first.
    """
    batch_size, n_latents = z_BF.shape
    while True:
        vals_BM, cols_BM = z_BF.topk(m, dim=1, sorted=False)  # unsorted: about half the cost on CPU
        cut_B1 = torch.nextafter(cut_of(vals_BM), torch.tensor(float("-inf"), device=z_BF.device))
        if m == n_latents or bool((vals_BM.min(dim=1, keepdim=True).values < cut_B1).all()):
            break
        m = min(n_latents, 2 * m)
    with _single_threaded(z_BF.device):
        keep_BM = ~(vals_BM < cut_B1)
        flat_M = torch.sort((torch.arange(batch_size, device=z_BF.device)[:, None] * n_latents + cols_BM)[keep_BM])
        flat_M = flat_M.values
        return flat_M // n_latents, flat_M % n_latents


def _orderable(vals_Z: torch.Tensor) -> torch.Tensor:
    """NaN sorts first (largest), as torch.topk treats it; -0.0 equals 0.0 under sorting already."""
    return torch.where(torch.isnan(vals_Z), torch.full_like(vals_Z, float("inf")), vals_Z)
