"""Planted concepts: latents that recover them are far more monosemantic than the raw neurons."""

from __future__ import annotations

import torch

from vlmsae.metrics import monosemanticity_scores
from vlmsae.studies.ground_truth import ground_truth_check, planted_concepts


def test_sae_beats_neurons_with_margin() -> None:
    out = ground_truth_check(n_images=1500, seed=0, train_steps=250)
    assert out["sae"]["mean"] > out["neurons"]["mean"] + 0.25, out
    assert out["trained_sae"]["mean"] > out["neurons"]["mean"] + 0.25, out
    # the oracle SAE gets close to the true concept codes, which bound what any latent can reach
    assert abs(out["sae"]["mean"] - out["true_codes"]["mean"]) < 0.1
    assert out["neurons"]["n_latents"] == 32 and out["sae"]["n_images"] == 1500


def test_shuffled_embeddings_destroy_the_signal() -> None:
    """MS measures agreement between activations and embeddings: break the pairing and it drops."""
    data = planted_concepts(n_images=1000, seed=1)
    ms_true = monosemanticity_scores(data.codes_NA, data.embeddings_NE)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    ms_shuffled = monosemanticity_scores(data.codes_NA, data.embeddings_NE[perm])
    assert ms_true.nanmean() > ms_shuffled.nanmean() + 0.25
