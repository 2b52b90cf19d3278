"""Seed stability (vlmsae.metrics.seed_matching): matching decoders of SAEs trained with different seeds on planted
atoms, the chance level of unrelated decoders, the Hungarian matching, the t-interval and the summary aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.metrics.seed_matching import (
    match_latents,
    max_cosine,
    mean_ci,
    seed_stability,
    summaries_mean_ci,
    unit_rows,
)
from vlmsae.sae import SAEConfig, build_sae, train_steps


# Nothing in vlmsae needs the simulated chance level: only this file checks against it.
def chance_max_cosine(d: int, n: int, n_trials: int = 2000, seed: int = 0) -> float:
    """Expected best cosine between a random unit vector and ``n`` random unit vectors in ``d`` dims (simulated):
    what a matching finds between unrelated decoders."""
    gen = torch.Generator().manual_seed(seed)
    a = unit_rows(torch.randn(n_trials, d, generator=gen))
    b = unit_rows(torch.randn(n, d, generator=gen))
    return float((a @ b.T).max(dim=1).values.mean())


D_IN, N_ATOMS, K, N_LATENTS = 32, 32, 3, 64


@pytest.fixture(scope="module")
def planted() -> PlantedDictionary:
    return PlantedDictionary.random(d_in=D_IN, n_atoms=N_ATOMS, k=K, noise_std=0.01, scale=5.0, offset_norm=3.0, seed=0)


@pytest.fixture(scope="module")
def two_seeds(planted):
    """Two TopK SAEs (2 latents per atom, as in tests/sae/test_base.py) differing only in the seed (init, data)."""
    saes, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster than contended threads
    for seed in (0, 1):
        sae = build_sae(SAEConfig(arch="topk", d_in=D_IN, n_latents=N_LATENTS, k=K, dead_after_samples=4000), seed=seed)
        train_steps(sae, planted.batches(256, 150, seed=10 + seed), lr=3e-3)
        saes.append(sae)
    torch.set_num_threads(threads)
    return saes


def test_two_seeds_recover_the_atoms_and_match_each_other(two_seeds, planted):
    for sae in two_seeds:
        assert float(max_cosine(planted.atoms_AD, sae.W_dec)[0].mean()) >= 0.9
    result = seed_stability([s.W_dec for s in two_seeds], threshold=0.7)
    # The latent that carries each atom in seed 0 is matched to the one that carries it in seed 1.
    atoms_AD = torch.nn.functional.normalize(planted.atoms_AD, dim=1)
    lat0_A, lat1_A = ((atoms_AD @ unit_rows(s.W_dec).T).argmax(dim=1) for s in two_seeds)
    assert float((result.match_FS[lat0_A, 1] == lat1_A).float().mean()) >= 0.9
    assert float(result.mean_cos_F[lat0_A].mean()) >= 0.9
    assert float((result.found_in_F[lat0_A] == 2).float().mean()) >= 0.9
    # Column 0 is the reference itself; column 1 a one-to-one map onto the other SAE's latents.
    assert torch.equal(result.match_FS[:, 0], torch.arange(N_LATENTS))
    assert sorted(result.match_FS[:, 1].tolist()) == list(range(N_LATENTS))


def test_a_random_decoder_matches_at_chance(two_seeds):
    random_FD = torch.randn(N_LATENTS, D_IN, generator=torch.Generator().manual_seed(5))
    best_F, _ = max_cosine(two_seeds[0].W_dec, random_FD)
    # The chance level, simulated here independently: E[max_j cos(u, v_j)] over N_LATENTS random unit v_j.
    gen = torch.Generator().manual_seed(7)
    u = torch.nn.functional.normalize(torch.randn(4000, D_IN, generator=gen), dim=1)
    v = torch.nn.functional.normalize(torch.randn(N_LATENTS, D_IN, generator=gen), dim=1)
    chance = float((u @ v.T).max(dim=1).values.mean())
    assert 0.3 < chance < 0.6  # d = 32, 48 candidates
    assert abs(float(best_F.mean()) - chance) < 0.08, (float(best_F.mean()), chance)
    assert abs(chance_max_cosine(D_IN, N_LATENTS) - chance) < 0.02
    # One-to-one it can only be worse; nothing is "found" at 0.7.
    result = seed_stability([two_seeds[0].W_dec, random_FD], threshold=0.7)
    assert result.summary()["mean_matched_cos"] < chance + 0.05
    assert result.summary()["frac_found_in_all"] < 0.05


def test_hungarian_recovers_a_permutation_where_greedy_max_would_collide():
    gen = torch.Generator().manual_seed(0)
    a_FD = torch.randn(6, 5, generator=gen)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b_FD = torch.empty_like(a_FD)
    b_FD[perm] = a_FD * torch.rand(6, 1, generator=gen).add(0.5)  # scaled copies: cosine 1 with the partner
    match_F, cos_F = match_latents(a_FD, b_FD)
    assert match_F.tolist() == perm.tolist() and torch.allclose(cos_F, torch.ones(6), atol=1e-6)
    # Two rows whose best partner is the same: max cosine picks it twice, the assignment gives it to one.
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert max_cosine(a, b)[1].tolist() == [0, 0]
    assert match_latents(a, b)[0].tolist() == [0, 1]
    # The greedy path (exact_max=0) finds the same permutation on the clear-cut case.
    assert match_latents(a_FD, b_FD, exact_max=0)[0].tolist() == perm.tolist()


def test_found_in_counts_seeds_at_the_threshold():
    ref = torch.eye(4)
    near = torch.eye(4)
    near[3] = torch.tensor([0.0, 0.0, 0.8, 0.6])  # latent 3's partner: cosine 0.6 after the matching
    result = seed_stability([ref, torch.eye(4)[[1, 0, 3, 2]], near], threshold=0.7)
    assert result.found_in_F.tolist() == [3, 3, 3, 2]
    assert result.match_FS[:, 1].tolist() == [1, 0, 3, 2]
    assert result.mean_cos_F[3].item() == pytest.approx(0.8)  # (1 + 0.6) / 2
    assert result.summary()["found_in_counts"] == {"1": 0, "2": 1, "3": 3}
    assert [(p["a"], p["b"]) for p in result.summary()["pairs"]] == [(0, 1), (0, 2)]
    all_pairs = seed_stability([ref, torch.eye(4)[[1, 0, 3, 2]], near], all_pairs=True)
    assert [(p.a, p.b) for p in all_pairs.pairs] == [(0, 1), (0, 2), (1, 2)]


def test_mean_ci_is_the_t_interval():
    # values 1, 2, 3, 6: mean 3, s^2 = (4 + 1 + 0 + 9) / 3 = 14/3, t_{0.975, 3} = 3.182446305
    out = mean_ci([1.0, 2.0, 3.0, 6.0])
    assert out["mean"] == 3.0 and out["n"] == 4 and out["std"] == pytest.approx(math.sqrt(14 / 3))
    assert out["ci95"] == pytest.approx(3.182446305 * math.sqrt(14 / 3) / 2, rel=1e-8)
    two = mean_ci([0.5, 0.7])  # t_{0.975, 1} = 12.7062047
    assert two["ci95"] == pytest.approx(12.7062047 * math.sqrt(0.02) / math.sqrt(2), rel=1e-6)
    assert math.isnan(mean_ci([0.4])["ci95"]) and mean_ci([0.4])["mean"] == 0.4
    assert mean_ci([1.0, float("nan"), 3.0])["n"] == 2  # a NaN seed (no latent scored) is left out


def test_summaries_mean_ci_keeps_the_nesting_of_numeric_fields():
    a = {"mean": 0.5, "dead": 2, "model": "m", "baseline": {"mean": 0.3}, "groups": [{"group": 0, "depth": 1.0}]}
    b = {"mean": 0.7, "dead": 4, "model": "m", "baseline": {"mean": 0.5}, "groups": [{"group": 0, "depth": 3.0}]}
    out = summaries_mean_ci([a, b])
    assert set(out) == {"mean", "dead", "baseline", "groups"}  # strings left out
    assert out["mean"]["mean"] == pytest.approx(0.6) and out["dead"]["mean"] == 3.0
    assert out["baseline"]["mean"]["mean"] == pytest.approx(0.4)
    assert out["groups"][0]["depth"]["mean"] == 2.0 and out["groups"][0]["depth"]["ci95"] > 0
    assert summaries_mean_ci([{"x": 1}, {"y": 2}]) is None  # nothing shared


def test_decoders_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="at least two"):
        seed_stability([torch.eye(3)])
    with pytest.raises(ValueError, match=r"differ in shape.*\(3, 3\), \(4, 3\)"):
        seed_stability([torch.eye(3), torch.ones(4, 3)])
    with pytest.raises(ValueError, match="d_in=3 and d_in=4"):
        max_cosine(torch.eye(3), torch.eye(4))
