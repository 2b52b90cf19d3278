"""Taxonomy alignment of SAE latents (METHOD §4): how deep do a latent's top images agree?

LCA depths of the 120 pairs of each latent's top-16 images, the latent's mean and mode, the per-group table
(the paper's Table 2). Vectorised over latents: paths are integer codes per rank
(:func:`vlmsae.data.taxonomy.encode_paths`), the pairs are gathered with one index, and the shared prefix is
a cumulative product of per-rank equalities. 65k latents take well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmsae.metrics.monosemanticity import finite_stats

N_TOP = 16  # METHOD §4: the top-16 images of each latent, 120 pairs
_NONE_STATS = dict.fromkeys(("mean", "std", "min", "max"))  # a group without values: JSON nulls


@dataclass
class LatentDepths:
    """Per-latent LCA depths. ``depth_mean`` is NaN and ``depth_mode`` is -1 where excluded."""

    depth_mean_K: torch.Tensor  # float64 [K]
    depth_mode_K: torch.Tensor  # int64 [K]
    valid_K: torch.Tensor  # bool [K]: the latent has n_top firing images


def _top_n(top_idx_KX: torch.Tensor, top_acts_KX: torch.Tensor, n_top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_top`` columns, sorted by activation, with empty slots (idx -1 or act <= 0) last.

    The top-images index already excludes images where the latent is 0, but a hand-made or older
    index might not: slots whose activation is not positive never count as firing images.
    """
    if top_idx_KX.shape != top_acts_KX.shape or top_idx_KX.dim() != 2:
        raise ValueError(
            f"top image index and activations must both be [K, X]; got {tuple(top_idx_KX.shape)} "
            f"and {tuple(top_acts_KX.shape)}."
        )
    if top_idx_KX.shape[1] < n_top:
        raise ValueError(
            f"The top-images index keeps {top_idx_KX.shape[1]} images per latent but the hierarchy metric needs "
            f"{n_top} (METHOD §4); recompute it with top_k >= {n_top}."
        )
    acts = top_acts_KX.float()
    firing = (top_idx_KX >= 0) & (acts > 0)
    order = torch.where(firing, acts, torch.full_like(acts, -math.inf)).argsort(dim=1, descending=True, stable=True)
    idx = torch.where(firing, top_idx_KX, -1).gather(1, order)[:, :n_top]
    acts = torch.where(firing, acts, 0.0).gather(1, order)[:, :n_top]
    return idx, acts


def lca_depths(
    top_idx_KX: torch.Tensor,
    top_acts_KX: torch.Tensor,
    image_codes_NO: torch.Tensor,
    n_top: int = N_TOP,
    chunk: int = 8192,
) -> LatentDepths:
    """Mean and mode of the LCA depth over all pairs of each latent's top-``n_top`` images.

    ``image_codes_NO``: :func:`encode_paths` codes of every image in the index (0 = no taxon at that
    rank). The mode's ties go to the smaller depth (the conservative reading).
    """
    idx_KX, acts_KX = _top_n(top_idx_KX.long(), top_acts_KX, n_top)
    K, n_ranks = idx_KX.shape[0], image_codes_NO.shape[1]
    valid_K = (idx_KX[:, n_top - 1] >= 0) & (acts_KX[:, n_top - 1] > 0)
    ii, jj = torch.triu_indices(n_top, n_top, offset=1)  # 120 pairs for n_top = 16
    depth_mean_K = torch.full((K,), math.nan, dtype=torch.float64)
    depth_mode_K = torch.full((K,), -1, dtype=torch.long)
    codes = image_codes_NO.long()
    for start in range(0, K, chunk):
        sl = slice(start, min(start + chunk, K))
        rows = valid_K[sl].nonzero().squeeze(1) + start
        if rows.numel() == 0:
            continue
        c_KXO = codes[idx_KX[rows]]  # every index is >= 0 on valid rows
        a_KJO, b_KJO = c_KXO[:, ii], c_KXO[:, jj]
        same_KJO = (a_KJO == b_KJO) & (a_KJO > 0)
        depth_KJ = same_KJO.long().cumprod(dim=2).sum(dim=2)  # shared-prefix length, 0..n_ranks
        depth_mean_K[rows] = depth_KJ.double().mean(dim=1)
        counts_KO1 = torch.nn.functional.one_hot(depth_KJ, n_ranks + 1).sum(dim=1)
        depth_mode_K[rows] = counts_KO1.argmax(dim=1)  # first maximum = smallest depth among ties
    return LatentDepths(depth_mean_K, depth_mode_K, valid_K)


def majority_taxa(
    top_idx_KX: torch.Tensor, top_acts_KX: torch.Tensor, image_codes_NO: torch.Tensor, n_top: int = N_TOP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per latent and rank, the most frequent taxon among its firing top images.

    Returns ``code_KO`` (0 = none), ``frac_KO`` (its share of the latent's firing top images) and
    ``n_images_K``. Ties go to the taxon of the higher-activating image. Latents with fewer than
    ``n_top`` firing images still get a label from the images they have.
    """
    idx_KX, _ = _top_n(top_idx_KX.long(), top_acts_KX, n_top)
    K, n_ranks = idx_KX.shape[0], image_codes_NO.shape[1]
    code_KO = torch.zeros(K, n_ranks, dtype=torch.long)
    frac_KO = torch.zeros(K, n_ranks, dtype=torch.float64)
    n_images_K = (idx_KX >= 0).sum(dim=1)
    codes = torch.cat([torch.zeros(1, n_ranks, dtype=torch.long), image_codes_NO.long()])  # row 0: empty slot
    for start in range(0, K, 4096):  # [4096, X, X, O] booleans per chunk
        sl = slice(start, start + 4096)
        c_KXO = codes[idx_KX[sl] + 1]
        # count_KXO[k, t, r]: how many top images share image t's taxon at rank r
        same_KXXO = (c_KXO[:, :, None, :] == c_KXO[:, None, :, :]) & (c_KXO[:, None, :, :] > 0)
        count_KXO = same_KXXO.sum(dim=2)
        best_KO = count_KXO.argmax(dim=1)  # first maximum = highest-activating image
        code_KO[sl] = c_KXO.gather(1, best_KO[:, None, :]).squeeze(1)
        n = n_images_K[sl].clamp(min=1).double()[:, None]
        frac_KO[sl] = count_KXO.gather(1, best_KO[:, None, :]).squeeze(1).double() / n
    return code_KO, frac_KO, n_images_K


def deepest_majority_rank(code_KO: torch.Tensor, frac_KO: torch.Tensor, min_frac: float = 0.5) -> torch.Tensor:
    """Index of the deepest rank whose majority taxon holds more than ``min_frac`` of the images; -1 if none."""
    clear_KO = (frac_KO > min_frac) & (code_KO > 0)
    ranks_O = torch.arange(clear_KO.shape[1]).expand_as(clear_KO)
    return torch.where(clear_KO, ranks_O, -1).max(dim=1).values


def group_table(
    depths: LatentDepths,
    group_of_latent_K: torch.Tensor,
    ms_K: torch.Tensor | None = None,
    n_groups: int | None = None,
) -> list[dict]:
    """Table 2 rows, one per Matryoshka group: mean LCA depth over scored latents, and MS mean/max/min.

    MS statistics cover every latent of the group with a finite MS (the MS study's own exclusion,
    dead latents), not only the depth-scored ones, as the paper reports them side by side.
    """
    group_K = group_of_latent_K.long()
    n_groups = int(group_K.max()) + 1 if n_groups is None else n_groups
    rows = []
    for g in range(n_groups):
        in_g = group_K == g
        depth_G = depths.depth_mean_K[in_g & depths.valid_K]
        n_scored = int((~torch.isnan(depth_G)).sum())
        d = finite_stats(depth_G) or _NONE_STATS
        mode = depths.depth_mode_K[in_g & depths.valid_K].double()
        row = {
            "group": g,
            "n_latents": int(in_g.sum()),
            "n_scored": n_scored,
            "n_excluded": int(in_g.sum()) - n_scored,
            "depth_mean": d["mean"],
            "depth_std": d["std"],
            "depth_mode_mean": float(mode.mean()) if mode.numel() else None,
        }
        ms_G = ms_K.double()[in_g] if ms_K is not None else torch.empty(0)  # no MS: None and n_ms 0
        m = finite_stats(ms_G) or _NONE_STATS
        row.update(ms_mean=m["mean"], ms_max=m["max"], ms_min=m["min"], ms_std=m["std"])
        row["n_ms"] = int((~torch.isnan(ms_G)).sum())
        rows.append(row)
    return rows


def table_markdown(rows: Sequence[dict], reference: dict[str, Sequence[float]] | None = None) -> str:
    """The paper's Table 2 layout: one column per group, rows depth / MS mean / max / min."""

    def fmt(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

    header = "| | " + " | ".join(f"group {r['group']}" for r in rows) + " |"
    lines = [header, "|---" * (len(rows) + 1) + "|"]
    lines.append("| latents (scored / all) | " + " | ".join(f"{r['n_scored']} / {r['n_latents']}" for r in rows) + " |")
    lines.append("| LCA depth (mean) | " + " | ".join(fmt(r["depth_mean"]) for r in rows) + " |")
    lines.append("| LCA depth (mean of modes) | " + " | ".join(fmt(r["depth_mode_mean"]) for r in rows) + " |")
    for key, name in (("ms_mean", "MS mean"), ("ms_max", "MS max"), ("ms_min", "MS min")):
        lines.append(f"| {name} | " + " | ".join(fmt(r[key]) for r in rows) + " |")
    for name, values in (reference or {}).items():
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in values) + " |")
    return "\n".join(lines) + "\n"
