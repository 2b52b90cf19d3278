"""Sparse autoencoders in pure torch (METHOD §2; interface and units in vlmsae/sae/base.py).

    from vlmsae.sae import SAEConfig, build_sae, save_sae, load_sae
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=1024, n_latents=16384, k=20))

No Lightning, no Hydra: the trainer (vlmsae.lit) and the entrypoints build on this.
"""

from __future__ import annotations

from vlmsae.sae.base import SAE, TrainCodes, auxk_loss, recon_error
from vlmsae.sae.batchtopk import BatchTopKSAE
from vlmsae.sae.build import SAE_CLASSES, build_sae
from vlmsae.sae.checkpoint import load_sae, save_sae
from vlmsae.sae.config import ARCHS, DEFAULT_GROUP_FRACTIONS, SAEConfig
from vlmsae.sae.fit import default_lr, train_steps
from vlmsae.sae.matryoshka import MatryoshkaSAE
from vlmsae.sae.mechanics import (
    constrain_decoder_grad_,
    estimate_input_scale,
    geometric_median,
    init_b_dec_geometric_median_,
    normalize_decoder_,
    set_input_scale_,
)
from vlmsae.sae.relu import ReluSAE
from vlmsae.sae.topk import TopKSAE


def load(path, sae_format: str | None = None, device="cpu") -> SAE:
    """The SAE at ``path`` (issue 2's ``vlmsae.sae.load``); ``sae_format`` None or "vlmsae" (a save_sae folder)."""
    if sae_format not in (None, "vlmsae"):
        raise ValueError(f"sae_format={sae_format!r}: format {sae_format} needs vlmsae.sae.interop (not installed).")
    return load_sae(path, device=device)


__all__ = [
    "ARCHS",
    "DEFAULT_GROUP_FRACTIONS",
    "SAE",
    "SAE_CLASSES",
    "BatchTopKSAE",
    "MatryoshkaSAE",
    "ReluSAE",
    "SAEConfig",
    "TopKSAE",
    "TrainCodes",
    "auxk_loss",
    "build_sae",
    "constrain_decoder_grad_",
    "default_lr",
    "estimate_input_scale",
    "geometric_median",
    "init_b_dec_geometric_median_",
    "load",
    "load_sae",
    "normalize_decoder_",
    "recon_error",
    "save_sae",
    "set_input_scale_",
    "train_steps",
]
