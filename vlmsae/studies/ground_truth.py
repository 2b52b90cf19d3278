"""A synthetic check with a known answer: SAE latents that recover planted concepts are more
monosemantic than the raw neurons that mix them.

Each "image" has k of C planted concepts (:class:`vlmsae.data.synthetic.PlantedDictionary`): its activation
mixes the concepts' random atoms (so every neuron mixes all concepts) and its embedding sums random concept
directions. A latent firing for one concept fires on images sharing it, so its MS is high; a raw neuron's
is lower. :func:`ground_truth_check` scores the oracle SAE (the planted atoms), optionally a trained SAE,
and the raw neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.metrics.monosemanticity import monosemanticity_scores, ms_summary
from vlmsae.sae import SAEConfig, build_sae
from vlmsae.sae import train_steps as fit

EMBED_DIM, EMBED_NOISE = 48, 0.1  # the embedder's width and the noise on each image's concept sum


@dataclass
class PlantedConcepts:
    acts_ND: torch.Tensor  # [N, d] activations (the tapped layer's, synthetic)
    codes_NA: torch.Tensor  # [N, A] true concept coefficients (k nonzeros per row)
    atoms_AD: torch.Tensor  # [A, D] unit-norm concept directions in activation space
    offset_D: torch.Tensor  # [d] shared mean of the activations
    embeddings_NE: torch.Tensor  # [N, E] what the image embedder sees


def planted_concepts(n_images: int = 2000, d_in: int = 32, n_concepts: int = 48, seed: int = 0) -> PlantedConcepts:
    """Activations and embeddings of ``n_images`` images with 2 of ``n_concepts`` concepts each."""
    planted = PlantedDictionary.random(d_in=d_in, n_atoms=n_concepts, k=2, noise_std=0.02, offset_norm=2.0, seed=seed)
    x_ND, atoms_AD, codes_NA = planted.sample(n_images, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    concept_dirs_AE = torch.nn.functional.normalize(torch.randn(n_concepts, EMBED_DIM, generator=g), dim=1)
    emb_NE = codes_NA @ concept_dirs_AE + EMBED_NOISE * torch.randn(n_images, EMBED_DIM, generator=g)
    return PlantedConcepts(x_ND, codes_NA, atoms_AD, planted.offset_D, emb_NE)


def oracle_sae(atoms_AD: torch.Tensor, offset_D: torch.Tensor, k: int):
    """A TopK SAE whose encoder and decoder are the planted atoms (b_dec = the shared offset)."""
    n_concepts, d_in = atoms_AD.shape
    sae = build_sae(SAEConfig(arch="topk", d_in=d_in, n_latents=n_concepts, k=k), seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(atoms_AD)
        sae.W_enc.copy_(atoms_AD)
        sae.b_dec.copy_(offset_D)
        sae.b_enc.zero_()
    return sae.eval()


def ground_truth_check(n_images: int = 2000, seed: int = 0, train_steps: int = 0) -> dict:
    """Mean MS of the oracle SAE, of an SAE trained for ``train_steps`` (if > 0, batches of 256), of the raw
    neurons, and of the true concept codes; the gap ``margin`` = oracle SAE - neurons."""
    data = planted_concepts(n_images=n_images, seed=seed)
    k = int((data.codes_NA[0] != 0).sum())

    def ms(acts_NK: torch.Tensor) -> dict:
        return ms_summary(monosemanticity_scores(acts_NK, data.embeddings_NE), n_images)

    def sae_ms(sae) -> dict:
        with torch.no_grad():
            return ms(sae.encode(data.acts_ND, sparse=True))

    out = {"sae": sae_ms(oracle_sae(data.atoms_AD, data.offset_D, k))}
    out["neurons"], out["true_codes"] = ms(data.acts_ND), ms(data.codes_NA)
    if train_steps > 0:
        n_concepts, d_in = data.atoms_AD.shape
        trained = build_sae(SAEConfig(arch="topk", d_in=d_in, n_latents=2 * n_concepts, k=k), seed=seed)
        g = torch.Generator().manual_seed(seed + 3)
        batches = (data.acts_ND[torch.randint(0, n_images, (256,), generator=g)] for _ in range(train_steps))
        fit(trained, batches, lr=3e-3)
        out["trained_sae"] = sae_ms(trained.eval())
    out["margin"] = out["sae"]["mean"] - out["neurons"]["mean"]
    return out
