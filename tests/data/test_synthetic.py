"""Planted activations (vlmsae.data.synthetic): shapes, exact sparsity, and x = codes @ dictionary without noise."""

from __future__ import annotations

import torch

from vlmsae.data.synthetic import PlantedDictionary


def test_planted_activations_shapes_and_sparsity():
    planted = PlantedDictionary.random(d_in=16, n_atoms=20, k=4, noise_std=0.0, seed=3)
    x, dictionary, codes = planted.sample(100, seed=4)
    assert x.shape == (100, 16) and dictionary.shape == (20, 16) and codes.shape == (100, 20)
    torch.testing.assert_close(dictionary.norm(dim=1), torch.ones(20))
    assert torch.all((codes > 0).sum(1) == 4)
    torch.testing.assert_close(x, codes @ dictionary)  # noise 0, no offset, scale 1
