"""``build_sae``: the SAE module for a config's ``arch`` (one class per architecture)."""

from __future__ import annotations

from vlmsae.sae.base import SAE
from vlmsae.sae.batchtopk import BatchTopKSAE
from vlmsae.sae.config import SAEConfig
from vlmsae.sae.jumprelu import JumpReLUSAE
from vlmsae.sae.matryoshka import MatryoshkaSAE
from vlmsae.sae.relu import ReluSAE
from vlmsae.sae.topk import TopKSAE

SAE_CLASSES: dict[str, type[SAE]] = {
    "relu": ReluSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka": MatryoshkaSAE,
    "jumprelu": JumpReLUSAE,
}


def build_sae(cfg: SAEConfig, seed: int | None = None, device: str | None = None) -> SAE:
    """The SAE module for ``cfg.arch``, freshly initialised (``seed`` fixes the init; None = torch's RNG)."""
    if not isinstance(cfg, SAEConfig):
        raise TypeError(
            f"build_sae needs an SAEConfig; got {type(cfg).__name__} "
            "(from a Hydra node: vlmsae.config.to_typed(node, SAEConfig).resolved(d_in))."
        )
    sae = SAE_CLASSES[cfg.arch](cfg, seed=seed)
    return sae.to(device) if device is not None else sae
