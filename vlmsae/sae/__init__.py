"""Sparse autoencoders in pure torch (METHOD §2; interface and units in vlmsae/sae/base.py).

    from vlmsae.sae import SAEConfig, build_sae, save_sae, load_sae
    sae = load("hf://org/repo/folder")       # any supported format (vlmsae.sae.interop)
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=1024, n_latents=16384, k=20))

No Lightning, no Hydra: the trainer (vlmsae.lit) and the entrypoints build on this.
"""

from __future__ import annotations

from vlmsae.sae.base import SAE, TrainCodes, auxk_loss, recon_error
from vlmsae.sae.batchtopk import BatchTopKSAE
from vlmsae.sae.build import SAE_CLASSES, build_sae
from vlmsae.sae.checkpoint import load_sae, save_sae
from vlmsae.sae.config import ARCHS, DEFAULT_GROUP_FRACTIONS, SAEConfig
from vlmsae.sae.fit import train_steps
from vlmsae.sae.interop import FORMAT_NAMES, detect_format, load_any
from vlmsae.sae.jumprelu import JumpReLUSAE
from vlmsae.sae.matryoshka import MatryoshkaSAE
from vlmsae.sae.mechanics import (
    constrain_decoder_grad_,
    estimate_input_scale,
    geometric_median,
    init_b_dec_geometric_median_,
    init_from_batches_,
    normalize_decoder_,
    set_input_scale_,
)
from vlmsae.sae.relu import ReluSAE
from vlmsae.sae.step import LinearWarmup, default_lr, make_optimizer, sae_step
from vlmsae.sae.topk import TopKSAE

load = load_any  # vlmsae.sae.load(path, sae_format=None): any supported format or hf:// path; load_sae = vlmsae's own


__all__ = [
    "ARCHS",
    "DEFAULT_GROUP_FRACTIONS",
    "FORMAT_NAMES",
    "SAE",
    "SAE_CLASSES",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "LinearWarmup",
    "MatryoshkaSAE",
    "ReluSAE",
    "SAEConfig",
    "TopKSAE",
    "TrainCodes",
    "auxk_loss",
    "build_sae",
    "constrain_decoder_grad_",
    "default_lr",
    "detect_format",
    "estimate_input_scale",
    "geometric_median",
    "init_b_dec_geometric_median_",
    "init_from_batches_",
    "load",
    "load_any",
    "load_sae",
    "make_optimizer",
    "normalize_decoder_",
    "recon_error",
    "sae_step",
    "save_sae",
    "set_input_scale_",
    "train_steps",
]
