"""SAEConfig: everything that defines one sparse autoencoder (METHOD §2), validated on creation.

The class is the ``sae`` config node, defined once in :mod:`vlmsae.config.nodes` (the bottom layer, no
torch) and re-exported here, so ``conf/sae/*.yaml`` and :func:`vlmsae.sae.build_sae` share one dataclass.
A job gets it typed from ``vlmsae.config.to_typed`` (``job.sae``) and resolves it for the activations' width
with ``cfg.resolved(d_in)``, which fills ``d_in`` and ``n_latents``.
"""

from __future__ import annotations

from vlmsae.config.nodes import ARCHS, DEFAULT_GROUP_FRACTIONS, K_ARCHS, SAE_PRECISIONS, SPARSE_KERNELS, SAEConfig

__all__ = ["ARCHS", "DEFAULT_GROUP_FRACTIONS", "K_ARCHS", "SAE_PRECISIONS", "SPARSE_KERNELS", "SAEConfig"]
