"""``ModelSpec``: which vision encoder to tap, and the registry of known models (``conf/model/*.yaml``).

``ModelSpec`` is the ``model`` config node itself, defined once in :mod:`vlmsae.config.nodes` and
re-exported here: a composed ``cfg.model`` converts with :meth:`ModelSpec.from_cfg`, and library code
then takes the typed spec, never a ``DictConfig``. The registry reads the same YAML files Hydra
composes, so a model is described in exactly one place.
"""

from __future__ import annotations

import difflib
from typing import Any

from vlmsae.config.nodes import BACKENDS, ModelSpec

__all__ = ["BACKENDS", "ModelSpec", "get_model_spec", "list_models"]


def list_models() -> list[str]:
    """Names of the known models: one per ``conf/model/*.yaml``."""
    from vlmsae.config import conf_dir

    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def get_model_spec(name: str, **overrides: Any) -> ModelSpec:
    """The registered spec ``conf/model/<name>.yaml`` (plus overrides); unknown names list the valid ones."""
    from vlmsae.config import conf_dir

    fpath = conf_dir() / "model" / f"{name}.yaml"
    if not fpath.exists():
        choices = list_models()
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"Unknown model {name!r}: valid choices are {choices}.{hint}")
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(fpath), resolve=True)
    raw.pop("defaults", None)
    raw.update(overrides)
    return ModelSpec.from_cfg(raw)
