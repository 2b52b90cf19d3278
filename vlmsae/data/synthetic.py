"""Planted-feature activations: data with a known sparse dictionary, so SAE tests have an answer key.

x = offset + scale * (sum over k random atoms of c_j * atom_j + noise), with unit-norm atoms and c_j ~
U[min_coef, max_coef]; ``scale`` and ``offset_norm`` mimic real activations (large norms, a big shared mean) so
input scaling and the geometric-median b_dec init get exercised. Known answer (``tests/test_sae.py``): every
architecture at 4x (``d_in=32``, 64 atoms, ``k=3``) recovers the atoms as decoder rows (mean best cosine >= 0.9)
in 150 Adam steps of batch 256, a few seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch


class PlantedActivations(NamedTuple):
    """One sample of planted activations; unpacks as ``x, dictionary, codes``."""

    x: torch.Tensor
    """[N, D] activations."""
    dictionary: torch.Tensor
    """[A, D] the unit-norm atoms."""
    codes: torch.Tensor
    """[N, A] the nonnegative coefficients used (k nonzeros per row, before ``scale``)."""


@dataclass(frozen=True)
class PlantedDictionary:
    """A fixed random dictionary plus the recipe to sample activations from it."""

    atoms_AD: torch.Tensor
    offset_D: torch.Tensor
    k: int = 3
    noise_std: float = 0.01
    scale: float = 1.0
    min_coef: float = 0.5
    max_coef: float = 1.5

    @classmethod
    def random(
        cls,
        d_in: int = 32,
        n_atoms: int = 64,
        k: int = 3,
        noise_std: float = 0.01,
        scale: float = 1.0,
        offset_norm: float = 0.0,
        seed: int = 0,
        min_coef: float = 0.5,
        max_coef: float = 1.5,
    ) -> PlantedDictionary:
        """A dictionary of ``n_atoms`` random unit-norm atoms in ``d_in`` dims, fixed by ``seed``."""
        if not 1 <= k <= n_atoms:
            raise ValueError(f"k (atoms per sample) must be in [1, n_atoms={n_atoms}]; got {k}.")
        if d_in < 1 or n_atoms < 1:
            raise ValueError(f"d_in and n_atoms must be >= 1; got d_in={d_in}, n_atoms={n_atoms}.")
        if not 0 <= min_coef <= max_coef:
            raise ValueError(f"need 0 <= min_coef <= max_coef; got {min_coef}, {max_coef}.")
        gen = torch.Generator().manual_seed(seed)
        atoms_AD = torch.randn(n_atoms, d_in, generator=gen)
        atoms_AD /= atoms_AD.norm(dim=1, keepdim=True)
        offset_D = torch.randn(d_in, generator=gen)
        offset_D *= offset_norm / offset_D.norm()
        return cls(atoms_AD, offset_D, k, noise_std, scale, min_coef, max_coef)

    @property
    def d_in(self) -> int:
        return self.atoms_AD.shape[1]

    @property
    def n_atoms(self) -> int:
        return self.atoms_AD.shape[0]

    def sample(self, n_samples: int, seed: int = 0) -> PlantedActivations:
        """``n_samples`` activations; each uses exactly ``k`` distinct atoms chosen uniformly."""
        gen = torch.Generator().manual_seed(seed)
        chosen_NK = torch.rand(n_samples, self.n_atoms, generator=gen).topk(self.k, dim=1).indices
        coefs_NK = self.min_coef + (self.max_coef - self.min_coef) * torch.rand(n_samples, self.k, generator=gen)
        codes_NA = torch.zeros(n_samples, self.n_atoms).scatter_(1, chosen_NK, coefs_NK)
        noise_ND = self.noise_std * torch.randn(n_samples, self.d_in, generator=gen)
        x_ND = self.offset_D + self.scale * (codes_NA @ self.atoms_AD + noise_ND)
        return PlantedActivations(x_ND, self.atoms_AD, codes_NA)

    def batches(self, batch_size: int, n_batches: int, seed: int = 0) -> Iterator[torch.Tensor]:
        """``n_batches`` fresh batches of activations (a stream: no sample repeats)."""
        for i in range(n_batches):
            yield self.sample(batch_size, seed=seed * 1_000_003 + i).x
