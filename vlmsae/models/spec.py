"""``ModelSpec``: which vision encoder to tap, and the registry of known models (``conf/model/*.yaml``).

``ModelSpec`` is the ``model`` config node itself, defined once in :mod:`vlmsae.config.nodes` and
re-exported here: a job's ``to_typed(cfg, <Job>)`` makes ``job.model`` one, and library code
then takes the typed spec, never a ``DictConfig``. The registry reads the same YAML files Hydra
composes, so a model is described in exactly one place.
"""

from __future__ import annotations

import difflib
from typing import Any

from vlmsae.config import to_typed
from vlmsae.config.nodes import BACKENDS, ModelSpec

__all__ = ["BACKENDS", "ModelSpec", "check_model_seed", "get_model_spec", "list_models", "seed_decides_weights"]


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

    return to_typed(OmegaConf.merge(OmegaConf.load(fpath), overrides), ModelSpec)


def seed_decides_weights(spec: ModelSpec) -> bool:
    """Whether ``spec.seed`` decides the weights: a tiny random model (its folder is keyed by the seed, see
    :func:`vlmsae.models.tiny.tiny_model_dpath`), or an open_clip architecture with no weights to load
    (``pretrained`` and ``local_path`` null: a random network drawn from the seed)."""
    if spec.tiny:
        return True
    no_weights = spec.pretrained is None and spec.local_path is None
    return spec.backend == "open_clip" and no_weights and not str(spec.arch).startswith(("hf-hub:", "local-dir:"))


def check_model_seed(spec: ModelSpec) -> None:
    """Refuse a ``model.seed`` that would be silently ignored: one set on a model whose weights are loaded."""
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
        raise ValueError(f"model.seed={spec.seed!r} must be an integer (the seed of a random model's weights).")
    if spec.seed != 0 and not seed_decides_weights(spec):
        weights = spec.local_path or spec.pretrained or spec.arch
        raise ValueError(
            f"model.seed={spec.seed} means nothing for model {spec.name!r}: its weights are loaded from {weights}. "
            "Drop model.seed, or set model.pretrained=null (open_clip) for a random network drawn from the seed."
        )
