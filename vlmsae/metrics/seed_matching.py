"""Seed stability: which latents of SAEs trained with different seeds are the same feature (issue 16).

Two latents are "the same" when their decoder directions agree (cosine of L2-normalised W_dec rows).
:func:`match_latents` is one-to-one (Hungarian, exact, up to ``exact_max`` latents; greedy above), unlike
:func:`max_cosine`; :func:`seed_stability` counts per reference latent the seeds it is found in.
Pure functions on tensors and dicts; reading the runs is the ``stability`` job's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

_BLOCK = 1024  # reference rows per block of the [block, F] cosine matrix (float32: 256 MB at F = 65,536)
EXACT_MAX = 8192  # the Hungarian matrix at 8,192 latents is 512 MB of float64 and takes about a minute
_CANDIDATES = 8  # best partners per latent that the greedy matching considers


def unit_rows(W_FD: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (float32, CPU); an all-zero row stays zero (it matches nothing)."""
    if W_FD.dim() != 2:
        raise ValueError(f"a decoder must be [n_latents, d_in], got shape {tuple(W_FD.shape)}.")
    return torch.nn.functional.normalize(W_FD.detach().to("cpu", torch.float32), dim=1)


def _unit_pair(a_FD: torch.Tensor, b_GD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a_FD.shape[1] != b_GD.shape[1]:
        raise ValueError(
            f"decoders read different input widths: d_in={a_FD.shape[1]} and d_in={b_GD.shape[1]}; "
            "compare SAEs trained on the same layer of the same model."
        )
    return unit_rows(a_FD), unit_rows(b_GD)


def _by_block(a_FD: torch.Tensor, b_GD: torch.Tensor, pick) -> tuple[torch.Tensor, torch.Tensor]:
    """``pick`` (values, indices per row) of the cosines [block, G], ``_BLOCK`` rows of ``a`` at a time."""
    parts = [pick(a_FD[start : start + _BLOCK] @ b_GD.T) for start in range(0, a_FD.shape[0], _BLOCK)]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def max_cosine(a_FD: torch.Tensor, b_GD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best cosine [F], index of that latent of b [F]) for each row of ``a``, rows normalised here; blocked."""
    return _by_block(*_unit_pair(a_FD, b_GD), lambda cos: cos.max(dim=1))


def match_latents(
    a_FD: torch.Tensor, b_GD: torch.Tensor, exact_max: int = EXACT_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one matching of the rows of ``a`` to rows of ``b`` maximising the summed cosine.

    Returns (matched index into b [F], its cosine [F]); a row with no partner (only when b has fewer rows,
    or the greedy matching ran out of candidates) has index -1 and cosine NaN. Exact (Hungarian) when
    max(F, G) <= ``exact_max``, else greedy (each latent's best candidates, strongest pairs first).
    """
    a_FD, b_GD = _unit_pair(a_FD, b_GD)
    match_F = torch.full((a_FD.shape[0],), -1, dtype=torch.long)
    if max(a_FD.shape[0], b_GD.shape[0]) <= exact_max:
        from scipy.optimize import linear_sum_assignment

        cos_FG = (a_FD.double() @ b_GD.double().T).numpy()
        rows, cols = linear_sum_assignment(cos_FG, maximize=True)
        match_F[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    else:  # greedy: by descending cosine over each row's best candidates; rows left over keep -1
        k = min(_CANDIDATES, b_GD.shape[0])
        vals_FM, cols_FM = _by_block(a_FD, b_GD, lambda cos: cos.topk(k, dim=1))
        rows_FM = torch.arange(a_FD.shape[0])[:, None].expand_as(cols_FM)
        order = vals_FM.flatten().argsort(descending=True)
        taken = torch.zeros(b_GD.shape[0], dtype=torch.bool)
        for r, c in zip(rows_FM.flatten()[order].tolist(), cols_FM.flatten()[order].tolist()):
            if match_F[r] < 0 and not taken[c]:
                match_F[r], taken[c] = c, True
    cos_F = torch.full((a_FD.shape[0],), math.nan)
    found = match_F >= 0
    cos_F[found] = (a_FD[found] * b_GD[match_F[found]]).sum(dim=1)
    return match_F, cos_F


@dataclass
class PairMatch:
    """The matching of one SAE's latents (``a``) to another's (``b``)."""

    a: int  # run index
    b: int
    match_F: torch.Tensor  # one-to-one partner in b (-1: none)
    cos_F: torch.Tensor  # cosine with that partner (NaN: none)
    max_cos_F: torch.Tensor  # best cosine with any latent of b

    def summary(self, threshold: float) -> dict[str, Any]:
        found = torch.nan_to_num(self.cos_F, nan=-1.0) >= threshold
        return {
            "a": self.a,
            "b": self.b,
            "mean_matched_cos": _nanmean(self.cos_F),
            "median_matched_cos": float(self.cos_F.nanmedian()),
            "mean_max_cos": float(self.max_cos_F.mean()),
            "frac_matched": float(found.float().mean()),
        }


@dataclass
class StabilityResult:
    """Per reference latent: ``found_in_F`` (seeds, reference included, whose matched cosine >= threshold),
    ``mean_cos_F`` (mean matched cosine over the other seeds), ``match_FS`` (partner per seed; column 0 is the
    reference itself); ``pairs``: every computed :class:`PairMatch`."""

    n_seeds: int
    threshold: float
    found_in_F: torch.Tensor
    mean_cos_F: torch.Tensor
    match_FS: torch.Tensor
    pairs: list[PairMatch] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        counts = torch.bincount(self.found_in_F, minlength=self.n_seeds + 1)[1:].tolist()
        return {
            "n_seeds": self.n_seeds,
            "n_latents": int(self.found_in_F.numel()),
            "threshold": self.threshold,
            "mean_matched_cos": _nanmean(self.mean_cos_F),
            "frac_found_in_all": float((self.found_in_F == self.n_seeds).float().mean()),
            "mean_found_in": float(self.found_in_F.float().mean()),
            "found_in_counts": {str(m): c for m, c in enumerate(counts, start=1)},  # m seeds -> latents
            "pairs": [p.summary(self.threshold) for p in self.pairs],
        }


def seed_stability(
    decoders: list[torch.Tensor], threshold: float = 0.7, all_pairs: bool = False, exact_max: int = EXACT_MAX
) -> StabilityResult:
    """Match every decoder [F, D] to the first (and, with ``all_pairs``, every pair) and count per latent of
    the first in how many seeds it is found (matched cosine >= ``threshold``)."""
    if len(decoders) < 2:
        raise ValueError(f"seed stability needs at least two SAEs, got {len(decoders)}.")
    shapes = [tuple(d.shape) for d in decoders]
    if len(set(shapes)) != 1:
        raise ValueError(f"the decoders differ in shape ([n_latents, d_in]): {shapes}; compare SAEs of one size.")
    pairs = [
        PairMatch(a, b, *match_latents(decoders[a], decoders[b], exact_max), max_cosine(decoders[a], decoders[b])[0])
        for a in range(len(decoders))
        for b in range(a + 1, len(decoders))
        if all_pairs or a == 0
    ]
    ref = [p for p in pairs if p.a == 0]
    cos_FS = torch.stack([p.cos_F for p in ref], dim=1)
    found_FS = torch.nan_to_num(cos_FS, nan=-1.0) >= threshold
    n_latents = decoders[0].shape[0]
    match_FS = torch.stack([torch.arange(n_latents), *(p.match_F for p in ref)], dim=1)
    return StabilityResult(
        n_seeds=len(decoders),
        threshold=float(threshold),
        found_in_F=1 + found_FS.sum(dim=1),
        mean_cos_F=cos_FS.nanmean(dim=1),
        match_FS=match_FS,
        pairs=pairs,
    )


def _nanmean(x: torch.Tensor) -> float:
    return float(x.nanmean()) if x.numel() else math.nan


def mean_ci(values: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and the half-width of its ``level`` t-interval over the finite ``values``:
    ``ci = t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation (n - 1).
    With one value the interval is undefined (NaN)."""
    from scipy.stats import t

    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return {"mean": math.nan, "ci95": math.nan, "std": math.nan, "n": 0}
    mean = sum(finite) / n
    if n == 1:
        return {"mean": mean, "ci95": math.nan, "std": math.nan, "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return {"mean": mean, "ci95": float(t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n), "std": std, "n": n}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def summaries_mean_ci(summaries: list[Any]) -> Any:
    """Mean ± 95% interval of every numeric field that all ``summaries`` share, keeping their nesting.

    Dicts recurse over their common keys, lists of one length recurse element by element (hierarchy.json's
    ``groups``), numbers become :func:`mean_ci`'s dict; anything else (strings, mismatched lists) is left
    out. Returns None when nothing numeric is shared.
    """
    if all(isinstance(s, dict) for s in summaries):
        common = [k for k in summaries[0] if all(k in s for s in summaries[1:])]
        out = {k: summaries_mean_ci([s[k] for s in summaries]) for k in common}
        out = {k: v for k, v in out.items() if v is not None}
        return out or None
    if all(isinstance(s, list) for s in summaries) and len({len(s) for s in summaries}) == 1:
        out = [summaries_mean_ci([s[i] for s in summaries]) for i in range(len(summaries[0]))]
        return out if any(v is not None for v in out) else None
    if all(_is_number(s) or s is None for s in summaries) and any(_is_number(s) for s in summaries):
        return mean_ci(summaries)
    return None
