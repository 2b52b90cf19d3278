"""Top-activating images per latent, streamed over image chunks, and the ``top_images/`` index others reuse
(its files: :class:`vlmsae.formats.TopImagesIndex`).

Images where a latent is exactly zero never enter its list (the reference code's lists could
include them, which put unrelated images among a rare latent's "top" images).  Ties keep the
earlier image.  Memory is O(K * X) plus one chunk; sparse chunks touch only their nonzeros.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_NONE = -1


class TopImagesAccumulator:
    """Running top-X (value, image index) per latent; ``update`` with consecutive image chunks."""

    def __init__(self, n_latents: int, top_k: int = 16) -> None:
        if n_latents < 1 or top_k < 1:
            raise ValueError(f"n_latents and top_k must be >= 1, got {n_latents} and {top_k}.")
        self.n_latents, self.top_k = n_latents, top_k
        self.vals_KX = torch.full((n_latents, top_k), -math.inf, dtype=torch.float32)
        self.idx_KX = torch.full((n_latents, top_k), _NONE, dtype=torch.long)
        self.n_images = 0

    def update(self, acts_BK: torch.Tensor) -> None:
        """Merge the next chunk of images (dense [B, K] or torch sparse), numbered on from the previous chunk."""
        if acts_BK.dim() != 2 or acts_BK.shape[1] != self.n_latents:
            raise ValueError(f"expected a [B, {self.n_latents}] chunk, got shape {tuple(acts_BK.shape)}.")
        # each latent's top nonzero entries of the chunk (dense or sparse: only its nonzeros are read)
        acts_BK = acts_BK.detach().cpu()
        coo = (acts_BK if acts_BK.layout == torch.sparse_coo else acts_BK.to_sparse_coo()).coalesce()
        rows, cols = coo.indices()
        vals = coo.values().to(torch.float32)
        keep = (vals != 0) & ~torch.isnan(vals)
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        # Coalesced entries are in image order; sort by value (stable), then by latent (stable):
        # each latent's entries end up strongest first, earlier image first on ties.
        by_val = torch.sort(vals, descending=True, stable=True).indices
        rows, cols, vals = rows[by_val], cols[by_val], vals[by_val]
        by_col = torch.sort(cols, stable=True).indices
        rows, cols, vals = rows[by_col], cols[by_col], vals[by_col]
        count_K = torch.bincount(cols, minlength=self.n_latents)
        start_K = torch.cumsum(count_K, 0) - count_K
        rank = torch.arange(cols.numel()) - start_K[cols]
        keep = rank < self.top_k
        cand_vals = torch.full((self.n_latents, self.top_k), -math.inf, dtype=torch.float32)
        cand_idx = torch.full((self.n_latents, self.top_k), _NONE, dtype=torch.long)
        cand_vals[cols[keep], rank[keep]] = vals[keep]
        cand_idx[cols[keep], rank[keep]] = rows[keep] + self.n_images

        vals = torch.cat([self.vals_KX, cand_vals], 1)
        idx = torch.cat([self.idx_KX, cand_idx], 1)
        # Stable descending sort: on ties the running entries (earlier images) stay ahead.
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.top_k]
        self.vals_KX = vals.gather(1, order)
        self.idx_KX = idx.gather(1, order)
        self.n_images += acts_BK.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_idx [K, X] int64 with -1 padding, acts [K, X] float32 with 0 padding)."""
        acts = torch.where(self.idx_KX == _NONE, torch.zeros_like(self.vals_KX), self.vals_KX)
        return self.idx_KX.clone(), acts


def top_images(acts_NK: torch.Tensor, top_k: int = 16, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_k`` images of every latent from a whole [N, K] matrix (dense or sparse), in chunks."""
    acc = TopImagesAccumulator(acts_NK.shape[1], top_k)
    if acts_NK.layout == torch.strided:
        for i0 in range(0, acts_NK.shape[0], chunk_size):
            acc.update(acts_NK[i0 : i0 + chunk_size])
    else:
        acc.update(acts_NK)  # the sparse path only touches nonzeros: no chunking needed
    return acc.result()


@dataclass
class TopImages:
    """The top-images index (see module docstring); ``keys`` etc. are indexed by ``image_idx``."""

    image_idx: torch.Tensor  # [K, X] int64, -1 = none
    acts: torch.Tensor  # [K, X] float32, 0 where image_idx == -1
    keys: list[str]
    paths: list[str] | None = None
    labels: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other tensors kept in top.safetensors,
    # e.g. ``patch_acts`` [K, X, P] (per-patch activations the browser draws as heatmaps)

    def __post_init__(self) -> None:
        if self.image_idx.shape != self.acts.shape or self.image_idx.dim() != 2:
            raise ValueError(
                f"image_idx {tuple(self.image_idx.shape)} and acts {tuple(self.acts.shape)} must both be [K, X]."
            )
        hi = int(self.image_idx.max()) if self.image_idx.numel() else -1
        if hi >= len(self.keys):
            raise ValueError(f"image_idx refers to image {hi} but only {len(self.keys)} keys were given.")
        for name in ("paths", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.keys):
                raise ValueError(f"{name} has {len(values)} entries but keys has {len(self.keys)}; they must align.")

    @property
    def n_latents(self) -> int:
        return self.image_idx.shape[0]

    @property
    def top_k(self) -> int:
        return self.image_idx.shape[1]

    def keys_of(self, latent: int) -> list[str]:
        """Image keys of one latent, strongest first (padding dropped)."""
        return [self.keys[i] for i in self.image_idx[latent].tolist() if i != _NONE]

    def count(self) -> torch.Tensor:
        """[K] number of real (non-padded) images per latent."""
        return (self.image_idx != _NONE).sum(1)

    def save(self, dpath: str | Path) -> Path:
        """Write the index (:func:`vlmsae.formats.write_top_images`) and a ``run_info.json`` into ``dpath``."""
        from vlmsae.formats import TopImagesIndex, write_top_images
        from vlmsae.utils.provenance import write_run_info

        dpath = write_top_images(
            dpath, TopImagesIndex(self.image_idx, self.acts, self.keys, self.paths, self.labels, self.meta, self.extra)
        )
        meta = {**self.meta, "n_latents": self.n_latents, "top_k": self.top_k, "n_images": len(self.keys)}
        write_run_info(dpath, meta)
        return dpath

    @classmethod
    def load(cls, dpath: str | Path) -> TopImages:
        """Read an index (:func:`vlmsae.formats.read_top_images`); ``meta`` leaves out its format_version."""
        from vlmsae.formats import read_top_images

        index = read_top_images(dpath)
        return cls(index.image_idx, index.acts, index.keys, index.paths, index.labels, index.meta, extra=index.extra)


def top_set_jaccard(image_idx_KX: torch.Tensor) -> dict[str, Any]:
    """Overlap of the latents' top-image sets: Jaccard |A & B| / |A | B| over latent pairs.

    Intersections come from one sparse product M M^T of the [K, N] latent-image incidence matrix,
    so only pairs sharing an image cost anything.  Latents with an empty set are left out.
    Returns mean (over all pairs of non-empty latents, zeros included), max, the mean over latents
    of each one's largest overlap with another (``mean_nearest``), the number of latents whose set
    equals another's (``n_duplicates``), and ``nearest_K`` [K] (NaN for empty latents).
    """
    idx = image_idx_KX.long()
    n_latents = idx.shape[0]
    size_K = (idx != _NONE).sum(1)
    lat, slot = (idx != _NONE).nonzero(as_tuple=True)
    img = idx[lat, slot]
    n_live = int((size_K > 0).sum())
    nearest_K = torch.full((n_latents,), math.nan, dtype=torch.float64)
    nearest_K[size_K > 0] = 0.0
    if n_live < 2:
        return {"mean": math.nan, "max": math.nan, "mean_nearest": math.nan, "n_duplicates": 0, "nearest_K": nearest_K}
    n_img = int(img.max()) + 1
    pairs = torch.stack([lat, img]).unique(dim=1)  # an image listed twice for one latent counts once: sets
    ones = torch.ones(pairs.shape[1], dtype=torch.float64)
    inc = torch.sparse_coo_tensor(pairs, ones, (n_latents, n_img), check_invariants=False).coalesce()
    size_K = torch.bincount(pairs[0], minlength=n_latents).double()
    with warnings.catch_warnings():  # torch flags its sparse-sparse product as beta; it is exact here
        warnings.simplefilter("ignore", UserWarning)
        inter = torch.sparse.mm(inc, inc.t()).coalesce()
    a, b = inter.indices()
    off = a != b
    a, b, shared = a[off], b[off], inter.values()[off]
    jac = shared / (size_K[a] + size_K[b] - shared)
    total_pairs = n_live * (n_live - 1) / 2
    if jac.numel():
        nearest_K.scatter_reduce_(0, a, jac, "amax")
    return {
        "mean": float(jac.sum() / 2 / total_pairs),  # each unordered pair appears twice in M M^T
        "max": float(jac.max()) if jac.numel() else 0.0,
        "mean_nearest": float(nearest_K[size_K > 0].mean()),
        "n_duplicates": int((nearest_K >= 1.0 - 1e-12).sum()),
        "nearest_K": nearest_K,
    }
