"""``ModelSpec``: which vision encoder to tap, and the registry of known models (``conf/model/*.yaml``).

The dataclass mirrors :class:`vlmsae.config.schemas.ModelSchema` field for field, so a composed
``cfg.model`` converts losslessly with :meth:`ModelSpec.from_cfg`; library code then takes the
typed spec, never a ``DictConfig``. The registry reads the same YAML files Hydra composes, so a
model is described in exactly one place.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

BACKENDS = ("open_clip", "hf_clip", "hf_llava")


@dataclass
class ModelSpec:
    """A vision encoder to tap (SPEC 1). Field meanings: ``vlmsae.config.schemas.ModelSchema``."""

    name: str
    backend: str  # open_clip | hf_clip | hf_llava
    arch: str  # open_clip model name (ViT-L-14-336, hf-hub:org/repo) or a transformers class hint
    pretrained: Optional[str] = None  # open_clip tag (openai, webli), HF id, or a local file/folder
    local_path: Optional[str] = None  # local weights (file or folder) that take precedence over `pretrained`
    pretrained_tag: Optional[str] = None  # open_clip: registered config (preprocessing, activation) of file weights
    cache_dir: Optional[str] = None  # where downloaded weights are cached
    image_size: int = 224
    n_layers: int = 24
    width: int = 1024
    embed_dim: Optional[int] = None
    has_cls: bool = True
    dtype: str = "float32"
    device: str = "auto"
    tiny: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown model backend {self.backend!r} (model {self.name!r}): use one of {list(BACKENDS)}.")

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ModelSpec":
        """Build from a composed ``cfg.model`` (DictConfig) or a plain dict; unknown keys are an error."""
        if not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = dict(cfg)
        cfg.pop("defaults", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"Unknown model field(s) {unknown}: valid fields are {sorted(names)}.")
        cfg["extra"] = dict(cfg.get("extra") or {})
        return cls(**cfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
