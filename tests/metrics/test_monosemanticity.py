"""The fast MS (linear-time identity, dense and sparse paths) against the plain pairwise definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmsae.metrics import monosemanticity_scores, ms_summary
from vlmsae.metrics.monosemanticity import _coo_entries, _is_sparse, _ratio, dead_and_range, unit_embeddings


def pairwise_ms(acts_NK: np.ndarray, emb_NE: np.ndarray) -> np.ndarray:
    """METHOD §3 written out: min-max normalise, then sum over pairs n < m of r_nm s_nm / sum of r_nm."""
    n_images, n_latents = acts_NK.shape
    out = np.full(n_latents, np.nan)
    for k in range(n_latents):
        a = acts_NK[:, k].astype(np.float64)
        lo, hi = a.min(), a.max()
        if hi == lo:
            continue
        a_norm = (a - lo) / (hi - lo)
        num = den = 0.0
        for n in range(n_images):
            for m in range(n + 1, n_images):
                s = emb_NE[n] @ emb_NE[m] / (np.linalg.norm(emb_NE[n]) * np.linalg.norm(emb_NE[m]))
                r = a_norm[n] * a_norm[m]
                num += r * s
                den += r
        out[k] = num / den if den > 0 else np.nan
    return out


def make_acts(n_images: int, seed: int) -> torch.Tensor:
    """Columns of every kind: sparse ReLU-like, dense, dead (all zero), constant, positive minimum,
    negative values, a latent on one image only, a latent on two images."""
    g = torch.Generator().manual_seed(seed)
    cols = [
        torch.relu(torch.randn(n_images, generator=g) - 1.0),  # sparse, nonnegative
        torch.relu(torch.randn(n_images, generator=g) - 1.5) * 7.0,
        torch.rand(n_images, generator=g),  # dense
        torch.zeros(n_images),  # dead
        torch.full((n_images,), 3.25),  # constant > 0: dead too
        1.0 + torch.rand(n_images, generator=g),  # positive minimum: a~ dense
        torch.randn(n_images, generator=g),  # signed (raw neuron)
        torch.where(torch.rand(n_images, generator=g) < 0.3, -torch.rand(n_images, generator=g), torch.zeros(n_images)),
        torch.zeros(n_images).index_fill_(0, torch.tensor([4]), 2.0),  # one image: 0/0 -> NaN
        torch.zeros(n_images).index_fill_(0, torch.tensor([1]), 2.0).index_fill_(0, torch.tensor([7]), 0.5),
    ]
    return torch.stack(cols, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_matches_pairwise(seed: int) -> None:
    acts = make_acts(23, seed)
    emb = torch.randn(23, 6, generator=torch.Generator().manual_seed(100 + seed)) + 0.5
    ref = pairwise_ms(acts.numpy(), emb.numpy())
    fast = monosemanticity_scores(acts, emb, chunk_size=5, latent_block=3).numpy()
    assert np.array_equal(np.isnan(ref), np.isnan(fast)), (ref, fast)
    np.testing.assert_allclose(fast[~np.isnan(ref)], ref[~np.isnan(ref)], atol=1e-6, rtol=0)
    assert np.isnan(fast[3]) and np.isnan(fast[4]) and np.isnan(fast[8])
    # the two-image latent's MS is exactly the cosine of those two images
    cos = torch.nn.functional.cosine_similarity(emb[1].double(), emb[7].double(), dim=0).item()
    assert fast[9] == pytest.approx(cos, abs=1e-9)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
def test_sparse_matches_pairwise_and_dense(layout) -> None:
    acts = make_acts(29, seed=3)
    emb = torch.randn(29, 5, generator=torch.Generator().manual_seed(7))
    ref = pairwise_ms(acts.numpy(), emb.numpy())
    sparse = acts.to_sparse_coo() if layout == torch.sparse_coo else acts.to_sparse_csr()
    fast = monosemanticity_scores(sparse, emb, latent_block=4).numpy()
    assert np.array_equal(np.isnan(ref), np.isnan(fast)), (ref, fast)
    np.testing.assert_allclose(fast[~np.isnan(ref)], ref[~np.isnan(ref)], atol=1e-6, rtol=0)
    dense = monosemanticity_scores(acts, emb).numpy()
    np.testing.assert_allclose(fast, dense, atol=1e-9, rtol=0, equal_nan=True)


def test_random_sparse_codes_many_latents() -> None:
    """TopK-like codes (k of K per image) with uncoalesced, unsorted COO input and explicit zeros."""
    g = torch.Generator().manual_seed(11)
    n_images, n_latents, k = 40, 64, 5
    idx = torch.stack([torch.randperm(n_latents, generator=g)[:k] for _ in range(n_images)])
    vals = torch.rand(n_images, k, generator=g) + 0.1
    vals[0, 0] = 0.0  # an explicitly stored zero is still a zero
    dense = torch.zeros(n_images, n_latents).scatter_(1, idx, vals)
    rows = torch.arange(n_images).repeat_interleave(k)
    perm = torch.randperm(rows.numel(), generator=g)
    coo = torch.sparse_coo_tensor(
        torch.stack([rows, idx.flatten()])[:, perm], vals.flatten()[perm], (n_images, n_latents), check_invariants=True
    )
    emb = torch.randn(n_images, 8, generator=g)
    ref = pairwise_ms(dense.numpy(), emb.numpy())
    fast = monosemanticity_scores(coo, emb, latent_block=16).numpy()
    assert np.array_equal(np.isnan(ref), np.isnan(fast))
    np.testing.assert_allclose(fast[~np.isnan(ref)], ref[~np.isnan(ref)], atol=1e-6, rtol=0)


def test_known_values() -> None:
    """Identical embeddings give MS = 1 for every live latent; orthogonal ones give 0."""
    acts = torch.tensor([[1.0, 0.0], [2.0, 3.0], [0.5, 1.0]])
    same = torch.ones(3, 4)
    assert torch.allclose(monosemanticity_scores(acts, same), torch.ones(2, dtype=torch.float64))
    ortho = torch.eye(3)
    assert torch.allclose(monosemanticity_scores(acts, ortho), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    # scaling embeddings or activations (positively) changes nothing
    emb = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    base = monosemanticity_scores(acts, emb)
    assert torch.allclose(monosemanticity_scores(acts * 5 + 2, emb * torch.tensor([[1.0], [3.0], [0.1]])), base)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="same images"):
        monosemanticity_scores(torch.rand(4, 3), torch.rand(5, 2))
    with pytest.raises(ValueError, match="all-zero"):
        monosemanticity_scores(torch.rand(3, 3), torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        monosemanticity_scores(torch.rand(1, 3), torch.rand(1, 2))
    with pytest.raises(ValueError, match="NaN"):
        monosemanticity_scores(torch.tensor([[math.nan], [1.0]]), torch.rand(2, 2))


def test_summary_excludes_nan() -> None:
    ms = torch.tensor([0.5, math.nan, 0.7, math.nan], dtype=torch.float64)
    s = ms_summary(ms, n_images=10, dead_K=torch.tensor([False, True, False, False]))
    assert s["mean"] == pytest.approx(0.6) and s["dead"] == 1 and s["undefined"] == 1
    assert s["n_latents"] == 4 and s["n_images"] == 10 and s["min"] == 0.5 and s["max"] == 0.7


@pytest.mark.parametrize("sparse", [False, True])
def test_streaming_accumulator_matches_two_pass(sparse: bool) -> None:
    acts = make_acts(41, seed=5)
    acts[:, 6] += 1000.0  # a raw neuron with a large offset: the shifted sums must not cancel
    emb = torch.randn(41, 7, generator=torch.Generator().manual_seed(9))
    acc = MSAccumulator(acts.shape[1], 7)
    for i0 in range(0, 41, 6):
        block = acts[i0 : i0 + 6]
        acc.update(block.to_sparse() if sparse else block, emb[i0 : i0 + 6])
    streamed = acc.result().numpy()
    ref = pairwise_ms(acts.numpy(), emb.numpy())
    assert np.array_equal(np.isnan(ref), np.isnan(streamed)), (ref, streamed)
    np.testing.assert_allclose(streamed[~np.isnan(ref)], ref[~np.isnan(ref)], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="chunks"):
        acc.update(acts[:2] if sparse else acts[:2].to_sparse(), emb[:2])


class MSAccumulator:
    """MS from a stream of image chunks, one pass: ``update(acts_chunk, emb_chunk)`` then ``result()``.

    For activations that never sit in memory together (e.g. codes computed on the fly over a large
    image set).  Keeps per-latent sufficient statistics: the nonzero count, min and max, and, after a
    per-latent shift c, S1 = sum (a - c), S2 = sum (a - c)^2 and A = sum (a - c) e_n ([K, d] float64:
    400 MB at K = 65,536, d = 768), plus sum_n e_n.  At the end, with delta = min a - c:
    sum a~ R = S1 - N delta, sum a~^2 R^2 = S2 - 2 delta S1 + N delta^2, v R = A - delta sum_n e_n.
    c = 0 for sparse chunks (their implicit zeros pin the minimum at or below 0) and the first dense
    chunk's minimum otherwise, so delta stays of the order of the latent's range and the expansions do
    not cancel away precision for raw neurons with a large offset.  Mixing dense and sparse chunks for
    one accumulator is refused.  The two-pass :func:`monosemanticity_scores` is the reference and is
    several times faster when everything fits in memory (it never holds or scatters into [K, d] sums).
    """

    def __init__(self, n_latents: int, dim: int) -> None:
        self.n_latents, self.dim = n_latents, dim
        self.n_images = 0
        self.count_K = torch.zeros(n_latents, dtype=torch.long)
        self.lo_K = torch.full((n_latents,), math.inf, dtype=torch.float64)
        self.hi_K = torch.full((n_latents,), -math.inf, dtype=torch.float64)
        self.shift_K: torch.Tensor | None = None
        self.s1_K = torch.zeros(n_latents, dtype=torch.float64)
        self.s2_K = torch.zeros(n_latents, dtype=torch.float64)
        self.v_KE = torch.zeros(n_latents, dim, dtype=torch.float64)
        self.emb_sum_E = torch.zeros(dim, dtype=torch.float64)
        self.layout: str | None = None

    def update(self, acts_BK: torch.Tensor, embeddings_BE: torch.Tensor) -> None:
        if (
            acts_BK.dim() != 2
            or acts_BK.shape[1] != self.n_latents
            or embeddings_BE.shape != (acts_BK.shape[0], self.dim)
        ):
            raise ValueError(
                f"expected acts [B, {self.n_latents}] and embeddings [B, {self.dim}] for the same B images, got "
                f"{tuple(acts_BK.shape)} and {tuple(embeddings_BE.shape)}."
            )
        layout = "sparse" if _is_sparse(acts_BK) else "dense"
        if self.layout not in (None, layout):
            raise ValueError(f"this accumulator got {self.layout} chunks before; feed all chunks as {self.layout}.")
        self.layout = layout
        emb_BE = unit_embeddings(embeddings_BE)
        n_b = acts_BK.shape[0]
        self.emb_sum_E += emb_BE.sum(0)
        if layout == "sparse":
            rows_Z, cols_Z, vals_Z = _coo_entries(acts_BK)
            if not torch.isfinite(vals_Z).all():
                raise ValueError("acts contain NaN or inf; MS is undefined for them.")
            self.shift_K = torch.zeros(self.n_latents, dtype=torch.float64)
            self.count_K += torch.bincount(cols_Z, minlength=self.n_latents)
            self.lo_K.scatter_reduce_(0, cols_Z, vals_Z, "amin")
            self.hi_K.scatter_reduce_(0, cols_Z, vals_Z, "amax")
            self.s1_K.index_add_(0, cols_Z, vals_Z)
            self.s2_K.index_add_(0, cols_Z, vals_Z * vals_Z)
            # Group the chunk's entries by latent (one embedding_bag, no [entries, d] temporary), then
            # add each touched latent's row once.
            order_Z = torch.argsort(cols_Z, stable=True)
            touched_U, per_U = torch.unique_consecutive(cols_Z[order_Z], return_counts=True)
            offsets_U = torch.zeros_like(per_U)
            offsets_U[1:] = per_U.cumsum(0)[:-1]
            bag_UE = F.embedding_bag(rows_Z[order_Z], emb_BE, offsets_U, mode="sum", per_sample_weights=vals_Z[order_Z])
            self.v_KE[touched_U] += bag_UE
        else:
            a_BK = acts_BK.detach().to("cpu", torch.float64)
            if not torch.isfinite(a_BK).all():
                raise ValueError("acts contain NaN or inf; MS is undefined for them.")
            if self.shift_K is None:
                self.shift_K = a_BK.amin(0)
            self.count_K += n_b
            self.lo_K = torch.minimum(self.lo_K, a_BK.amin(0))
            self.hi_K = torch.maximum(self.hi_K, a_BK.amax(0))
            shifted_BK = a_BK - self.shift_K
            self.s1_K += shifted_BK.sum(0)
            self.s2_K += (shifted_BK * shifted_BK).sum(0)
            self.v_KE.addmm_(shifted_BK.T, emb_BE)
        self.n_images += n_b

    def result(self) -> torch.Tensor:
        """[K] float64 MS, NaN where undefined (as :func:`monosemanticity_scores`)."""
        n = self.n_images
        if n < 2:
            raise ValueError(f"MS needs at least 2 images (pairs), got N={n}.")
        has_zero_K = self.count_K < n
        lo_K = torch.where(has_zero_K, self.lo_K.clamp(max=0.0), self.lo_K)
        hi_K = torch.where(has_zero_K, self.hi_K.clamp(min=0.0), self.hi_K)
        dead_K, safe_range_K = dead_and_range(lo_K, hi_K)
        delta_K = lo_K - self.shift_K
        sum_K = (self.s1_K - n * delta_K) / safe_range_K
        sum_sq_K = (self.s2_K - 2 * delta_K * self.s1_K + n * delta_K * delta_K) / (safe_range_K * safe_range_K)
        v_KE = (self.v_KE - delta_K[:, None] * self.emb_sum_E[None, :]) / safe_range_K[:, None]
        return _ratio(v_KE.pow(2).sum(1), sum_K, sum_sq_K, dead_K)
