"""SAEConfig: everything that defines one sparse autoencoder (SPEC section 2), validated on creation.

A frozen dataclass, so a built SAE's settings cannot drift during training, and so that the
checkpoint's ``config.json`` can rebuild exactly the same module. Import-light (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

ARCHS = ("relu", "topk", "batchtopk", "matryoshka")
"""Architectures :func:`vlmsae.sae.build_sae` knows."""

K_ARCHS = ("topk", "batchtopk", "matryoshka")
"""Architectures whose sparsity is set by ``k`` (ReLU-L1 uses ``l1_coeff`` instead)."""

SPARSE_KERNELS = ("auto", "sparse", "dense")

DEFAULT_GROUP_FRACTIONS = (0.0625, 0.125, 0.25, 0.5625)
"""The paper's Matryoshka groups (SPEC 2); used when ``arch="matryoshka"`` and none are given."""

_FRACTION_SUM_TOL = 1e-3  # user-typed fractions like 0.333/0.333/0.334 should pass


@dataclass(frozen=True)
class SAEConfig:
    """One sparse autoencoder: architecture, size, sparsity and the training mechanics it owns.

    Invalid combinations raise ``ValueError`` at construction, naming the value and what is expected.
    """

    arch: str
    """relu | topk | batchtopk | matryoshka (Matryoshka BatchTopK)."""
    d_in: int
    """Width of the activations the SAE reads (1024 for ViT-L residual streams)."""
    n_latents: int
    """Dictionary size F (expansion factor x d_in)."""
    k: int = 20
    """Active latents per sample (TopK) or on average per sample (BatchTopK, Matryoshka). Unused by relu."""
    l1_coeff: float = 5.0e-3
    """ReLU-L1 only: weight of sum_j f_j ||W_dec[j]||, in the scaled input space (E||x||^2 = d_in)."""
    group_fractions: tuple[float, ...] | None = None
    """Matryoshka only: nested group sizes as fractions of n_latents, summing to 1 (None = SPEC's four)."""
    aux_k_coeff: float = 1.0 / 32.0
    """Weight of the AuxK dead-latent loss (SPEC: 1/32). 0 turns AuxK off."""
    aux_k: int | None = None
    """At most this many dead latents reconstruct the residual in AuxK; None = d_in // 2."""
    dead_after_samples: int = 10_000_000
    """A latent that has not fired for this many training samples counts as dead (SPEC: 10M)."""
    threshold_beta: float = 0.999
    """BatchTopK/Matryoshka: EMA decay of the inference threshold."""
    threshold_start_step: int = 1000
    """BatchTopK/Matryoshka: the threshold EMA is updated from this training step on (SPEC: 1000)."""
    sparse_kernel: str = "auto"
    """TopK-family training compute: dense autograd, the sparse kernels of vlmsae.sae.sparse, or auto."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"SAEConfig.arch must be one of {', '.join(ARCHS)}; got {self.arch!r}.")
        for name in ("d_in", "n_latents", "k", "dead_after_samples"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive integer; got {value!r}.")
        if not _is_int(self.threshold_start_step) or self.threshold_start_step < 0:
            raise ValueError(f"SAEConfig.threshold_start_step must be an integer >= 0; got {self.threshold_start_step!r}.")
        if self.arch in K_ARCHS and self.k > self.n_latents:
            raise ValueError(
                f"SAEConfig.k={self.k} is larger than n_latents={self.n_latents}: k must be <= n_latents "
                "(lower k or raise the expansion factor)."
            )
        if self.aux_k is not None and (not _is_int(self.aux_k) or self.aux_k < 1):
            raise ValueError(f"SAEConfig.aux_k must be a positive integer or None (= d_in // 2); got {self.aux_k!r}.")
        for name in ("l1_coeff", "aux_k_coeff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
                raise ValueError(f"SAEConfig.{name} must be a finite number >= 0; got {value!r}.")
        if not isinstance(self.threshold_beta, (int, float)) or not 0.0 <= self.threshold_beta < 1.0:
            raise ValueError(f"SAEConfig.threshold_beta must be in [0, 1) (SPEC: 0.999); got {self.threshold_beta!r}.")
        if self.sparse_kernel not in SPARSE_KERNELS:
            raise ValueError(
                f"SAEConfig.sparse_kernel must be one of {', '.join(SPARSE_KERNELS)}; got {self.sparse_kernel!r}."
            )
        self._validate_groups()

    def _validate_groups(self) -> None:
        fractions = self.group_fractions
        if fractions is None:
            if self.arch == "matryoshka":
                object.__setattr__(self, "group_fractions", DEFAULT_GROUP_FRACTIONS)
            return
        if self.arch != "matryoshka":
            raise ValueError(
                f"SAEConfig.group_fractions is only used by arch=matryoshka; got {list(fractions)} with "
                f"arch={self.arch!r} (leave it None)."
            )
        if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__iter__"):
            raise ValueError(f"SAEConfig.group_fractions must be a list of numbers; got {fractions!r}.")
        fractions = tuple(float(f) for f in fractions)
        object.__setattr__(self, "group_fractions", fractions)
        if not fractions or any(not f > 0 for f in fractions):
            raise ValueError(f"SAEConfig.group_fractions must be a non-empty list of fractions > 0; got {list(fractions)}.")
        total = sum(fractions)
        if abs(total - 1.0) > _FRACTION_SUM_TOL:
            raise ValueError(
                f"SAEConfig.group_fractions must sum to 1 (within {_FRACTION_SUM_TOL}); got {list(fractions)} "
                f"which sums to {total:.6g}."
            )
        sizes = _fractions_to_sizes(fractions, self.n_latents)
        if min(sizes) < 1:
            raise ValueError(
                f"SAEConfig.group_fractions={list(fractions)} give an empty group with n_latents={self.n_latents} "
                f"(sizes {sizes}); use larger fractions or more latents."
            )

    @property
    def group_sizes(self) -> list[int]:
        """Latents per Matryoshka group, in order (one group of n_latents for other archs).

        Each group gets floor(fraction * F); the last takes the remainder. This reproduces the
        paper's iNat sizes 3/13/53/290/1177 from 0.002/0.009/0.035/0.189/0.765 of 1536.
        """
        if self.group_fractions is None:
            return [self.n_latents]
        return _fractions_to_sizes(self.group_fractions, self.n_latents)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); ``SAEConfig(**d)`` rebuilds it."""
        out = asdict(self)
        if out["group_fractions"] is not None:
            out["group_fractions"] = list(out["group_fractions"])
        return out

    @classmethod
    def from_schema(cls, node: Mapping[str, Any], d_in: int) -> SAEConfig:
        """Build from a ``conf/sae/*.yaml`` node (``vlmsae.config.schemas.SAESchema``) and the tapped width.

        ``n_latents`` comes from the node if set, else ``expansion * d_in``. Unknown keys raise.
        """
        values = {str(key): node[key] for key in node}
        expansion = values.pop("expansion", None)
        if values.get("n_latents") is None:
            if expansion is None or not _is_int(expansion) or expansion < 1:
                raise ValueError(f"sae.expansion must be a positive integer when sae.n_latents is unset; got {expansion!r}.")
            values["n_latents"] = int(expansion) * int(d_in)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown SAE config keys {unknown}; expected a subset of {sorted(known | {'expansion'})}.")
        if values.get("group_fractions") is not None:
            values["group_fractions"] = tuple(float(f) for f in values["group_fractions"])
        values["d_in"] = int(d_in)
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fractions_to_sizes(fractions: tuple[float, ...], n_latents: int) -> list[int]:
    # The 1e-6 guards float products like 0.29 * 100 = 28.999999999999996.
    sizes = [int(math.floor(f * n_latents + 1e-6)) for f in fractions[:-1]]
    sizes.append(n_latents - sum(sizes))
    return sizes
