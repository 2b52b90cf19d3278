"""Structured-config schemas (dataclasses) for the core Hydra nodes.

Import-light on purpose: only dataclasses and Hydra's ConfigStore, so ``--help`` stays instant.
Each node lives in its own module; :func:`register_configs` stores them all. Entry points call it
before ``@hydra.main`` runs, and YAML files in ``conf/<group>/`` list the schema first in their
``defaults`` so that an unknown key (``sae.kk=3``) or a wrong type (``sae.k=abc``) fails at compose
time with the key named.
"""

from __future__ import annotations

_REGISTERED = False


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    from vlmsae.config.schemas import SCHEMAS

    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=node)
    _REGISTERED = True
