"""The PNG plots of the metric jobs: MS histograms, MS against firing frequency, LCA depth by Matryoshka level.

Each function draws one figure and writes it atomically; matplotlib (Agg, no display) is imported
inside them so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vlmsae.utils.io import atomic_write


def _figure(figsize: tuple[float, float]):
    """A new (figure, axes) on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def _save(fig, fpath: Path) -> None:
    """Lay out, write atomically, and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(fpath, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def plot_ms_hist(fpath: Path, ms_K: torch.Tensor, ms_raw_D: torch.Tensor | None) -> None:
    """Density histograms of the SAE latents' MS and (if given) the raw neurons' MS on shared bins (NaN left out)."""
    sae_vals = ms_K[~torch.isnan(ms_K)].numpy()
    raw_vals = ms_raw_D[~torch.isnan(ms_raw_D)].numpy() if ms_raw_D is not None else None
    fig, ax = _figure((6, 4))
    both = [v for v in (sae_vals, raw_vals) if v is not None and len(v)]
    lo = min(float(v.min()) for v in both) if both else 0.0
    hi = max(float(v.max()) for v in both) if both else 1.0
    bins = torch.linspace(min(lo, 0.0), max(hi, 1.0), 41).numpy()
    for vals, what in ((sae_vals, "SAE latents"), (raw_vals, "raw neurons")):
        if vals is not None and len(vals):
            ax.hist(vals, bins=bins, density=True, alpha=0.6, label=f"{what} (mean {vals.mean():.3f})")
    ax.set_xlabel("monosemanticity score")
    ax.set_ylabel("density")
    ax.legend()
    _save(fig, fpath)


def plot_ms_vs_freq(fpath: Path, ms_K: torch.Tensor, freq_K: torch.Tensor) -> None:
    """Scatter of each live latent's MS against its firing frequency (log x)."""
    fig, ax = _figure((6, 4))
    alive = ~torch.isnan(ms_K) & (freq_K > 0)
    ax.scatter(freq_K[alive].numpy(), ms_K[alive].numpy(), s=4, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("firing frequency (fraction of images)")
    ax.set_ylabel("monosemanticity score")
    ax.set_title("SAE latents: MS vs firing frequency")
    _save(fig, fpath)


def plot_depth(fpath: Path, groups: Sequence[dict], title: str, reference_depth: Sequence[float] | None = None) -> None:
    """Mean LCA depth (+- std over latents) against Matryoshka level (``groups``: hierarchy.json's rows),
    and ``reference_depth`` (the paper's values) dashed when it has one value per group."""
    scored = [r for r in groups if r["depth_mean"] is not None]
    g = [r["group"] for r in scored]
    d = [r["depth_mean"] for r in scored]
    s = [r["depth_std"] or 0.0 for r in scored]
    fig, ax = _figure((5, 3.5))
    ax.errorbar(g, d, yerr=s, marker="o", capsize=3, label="this SAE (mean +- std over latents)")
    if reference_depth is not None and len(groups) == len(reference_depth):
        ax.plot(range(len(groups)), list(reference_depth), "s--", color="grey", label="paper, Table 2")
    ax.set_xlabel("Matryoshka group (level)")
    ax.set_ylabel("mean LCA depth of top-16 pairs")
    ax.set_xticks([r["group"] for r in groups])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, fpath)


def plot_matched_cos_hist(fpath: Path, cos_by_pair: dict[str, torch.Tensor], threshold: float) -> None:
    """Histogram of the one-to-one matched cosines of each compared pair of seeds (NaN: unmatched, left out),
    with the "found" threshold marked."""
    fig, ax = _figure((6, 4))
    bins = torch.linspace(-1.0, 1.0, 81).numpy()
    for label, cos in cos_by_pair.items():
        vals = cos[~torch.isnan(cos)].numpy()
        if len(vals):
            ax.hist(vals, bins=bins, alpha=0.5, label=f"{label} (mean {vals.mean():.3f})")
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("matched decoder cosine")
    ax.set_ylabel("latents")
    ax.legend(fontsize="small")
    _save(fig, fpath)
