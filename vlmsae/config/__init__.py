"""Structured-config schemas (dataclasses) for the core Hydra nodes.

Import-light on purpose: only dataclasses and Hydra's ConfigStore, so ``--help`` stays instant.
Each core node is one dataclass in :mod:`vlmsae.config.nodes` (also the library's typed argument);
:func:`register_configs` stores them all. Entry points call it before ``@hydra.main`` runs, and YAML
files in ``conf/<group>/`` list the schema first in their ``defaults`` so that an unknown key
(``sae.kk=3``) or a wrong type (``sae.k=abc``) fails at compose time with the key named.
:func:`conf_dir` says where that YAML tree is, for Hydra and every reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_REGISTERED = False


def conf_dir() -> Path:
    """The Hydra config tree (``conf/``); the only place that knows where it lives.

    It is always ``<vlmsae package>/conf``: in a checkout (plain, ``PYTHONPATH`` or editable install)
    that is the symlink ``vlmsae/conf -> ../conf``, so the tree stays at the repo root and edits show
    at once; a wheel (``pip install .``) holds a real copy, since setuptools follows the symlink when it
    builds. The repo-root ``conf/`` is the fallback for a checkout without symlinks (git on Windows
    with ``core.symlinks=false`` writes the link as a small text file).
    """
    package_dpath = Path(__file__).resolve().parents[1]
    candidates = (package_dpath / "conf", package_dpath.parent / "conf")
    for dpath in candidates:
        if (dpath / "train.yaml").is_file():
            return dpath.resolve()
    raise FileNotFoundError(
        f"vlmsae's config tree was not found: looked for train.yaml in {[str(d) for d in candidates]}. "
        "Reinstall vlmsae (`pip install .` ships conf/ inside the package), or in a checkout restore the "
        "symlink with `ln -s ../conf vlmsae/conf`."
    )


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    from vlmsae.config.jobs import (
        browse,
        export,
        extract,
        hierarchy,
        inspect,
        monosemanticity,
        names,
        splice_eval,
        stability,
        steer,
        steer_eval,
        train,
    )
    from vlmsae.config.schemas import SCHEMAS, store_node

    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=store_node(node))
    for job in (
        extract,
        train,
        monosemanticity,
        hierarchy,
        steer,
        steer_eval,
        splice_eval,
        browse,
        export,
        names,
        stability,
        inspect,
    ):  # one schema per job: <job>_schema
        job.register()
    _REGISTERED = True


def node_dict(cfg: Any, key: str) -> dict[str, Any]:
    """The node ``cfg[key]`` as a plain, resolved dict: ``{}`` when the key is absent or null.

    The one conversion jobs use to hand a config node to library code (which never takes a DictConfig).
    A ``defaults`` entry (a group YAML's own list, present when a node was loaded by hand) is dropped.
    """
    from omegaconf import DictConfig, OmegaConf

    value = cfg.get(key) if isinstance(cfg, (DictConfig, dict)) else getattr(cfg, key, None)
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    value = dict(value or {})
    value.pop("defaults", None)
    return value
