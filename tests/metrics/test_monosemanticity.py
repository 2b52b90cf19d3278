"""The fast MS (linear-time identity, dense and sparse paths) against the plain pairwise definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmsae.metrics import monosemanticity_scores, ms_summary


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
    from vlmsae.metrics.monosemanticity import MSAccumulator

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
