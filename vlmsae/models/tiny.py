"""Tiny random encoders for tests and the demo, saved once and loaded back like real weights (docs/offline.md).

``model=tiny`` (open_clip) and ``model=tiny_hf`` (transformers ``CLIPVisionModelWithProjection``) are written in
the formats real checkpoints come in (an open_clip ``local-dir`` folder, a ``save_pretrained`` folder), so
loading them runs the code that loads real weights; ``model=tiny_llava`` is built by :mod:`vlmsae.models.llava`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlmsae.utils.io import publish_dir

# CLIP's normalisation constants (OpenAI), used by the tiny models as by the real ones.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def vlmsae_home() -> Path:
    """Root of vlmsae's local cache: ``$VLMSAE_HOME`` or ``~/.cache/vlmsae``."""
    return Path(os.environ.get("VLMSAE_HOME", "~/.cache/vlmsae")).expanduser()


def models_home() -> Path:
    """Where tiny models are materialised: ``<vlmsae_home>/models``."""
    return vlmsae_home() / "models"


def tiny_open_clip_cfg(
    image_size: int = 32, patch_size: int = 8, width: int = 64, layers: int = 4, heads: int = 4, embed_dim: int = 32
) -> dict[str, Any]:
    """An open_clip ``model_cfg`` for a tiny OpenAI-style CLIP (quick_gelu, CLS pooling, ln_pre)."""
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,  # as OpenAI CLIP, so the HF-equivalence test covers the activation
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": width // heads,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,  # open_clip's tokenizer ids must fit, in case a caller embeds text
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    }


def clip_preprocess_cfg(size: int) -> dict[str, Any]:
    """open_clip's ``preprocess_cfg`` for OpenAI-CLIP preprocessing at ``size`` px."""
    return {"size": size, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}


def build_folder(dpath: str | Path, build: Callable[[Path], None]) -> Path:
    """``build(tmp)`` into an empty temporary sibling of ``dpath``, then :func:`publish_dir` it onto ``dpath``:
    a crash never leaves a half-built folder that an existence check would take for complete."""
    dpath = Path(dpath)
    tmp_dpath = dpath.parent / f".{dpath.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dpath, ignore_errors=True)
    tmp_dpath.mkdir(parents=True)
    build(tmp_dpath)
    return publish_dir(tmp_dpath, dpath)


def write_open_clip_folder(dpath: Path, model: Any, model_cfg: dict[str, Any], seed: int, what: str) -> None:
    """An open_clip ``local-dir`` folder: ``open_clip_config.json`` (CLIP preprocessing) + safetensors weights."""
    from safetensors.torch import save_file

    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": clip_preprocess_cfg(model_cfg["vision_cfg"]["image_size"]),
        "vlmsae": {"seed": seed, "what": what},
    }
    (dpath / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(dpath / OPEN_CLIP_WEIGHTS))


def build_tiny_open_clip(dpath: str | Path, seed: int = 0, **cfg_kwargs: Any) -> Path:
    """Build a random tiny open_clip CLIP with ``seed`` and save it as a ``local-dir`` folder (idempotent)."""
    import open_clip

    dpath = Path(dpath)
    if (dpath / OPEN_CLIP_CONFIG).exists() and (dpath / OPEN_CLIP_WEIGHTS).exists():
        built = (json.loads((dpath / OPEN_CLIP_CONFIG).read_text()).get("vlmsae") or {}).get("seed", seed)
        if built != seed:  # e.g. model.local_path=<folder> model.seed=7: the folder's weights are another seed's
            raise ValueError(
                f"The tiny model folder {dpath} holds weights built with seed {built}, not model.seed={seed}: "
                f"pass model.seed={built}, or another model.local_path (or none) to build seed {seed}."
            )
        return dpath
    model_cfg = tiny_open_clip_cfg(**cfg_kwargs)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg).eval()
    what = "random tiny open_clip CLIP for tests"
    return build_folder(dpath, lambda tmp: write_open_clip_folder(tmp, model, model_cfg, seed, what))


def tiny_hf_vision_parts(image_size: int, patch_size: int, width: int, layers: int, heads: int, projection_dim: int):
    """``(CLIPVisionConfig, CLIPImageProcessor)`` of a tiny OpenAI-style CLIP tower (quick_gelu, CLIP normalisation)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return config, processor


def build_tiny_hf_clip(
    dpath: str | Path,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 4,
    heads: int = 4,
    embed_dim: int = 32,
) -> Path:
    """Build a random tiny ``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor`` and ``save_pretrained`` them."""
    from transformers import CLIPVisionModelWithProjection

    dpath = Path(dpath)
    if (dpath / "config.json").exists() and any(dpath.glob("*.safetensors")):
        return dpath
    config, processor = tiny_hf_vision_parts(image_size, patch_size, width, layers, heads, embed_dim)
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    return build_folder(dpath, lambda tmp: (model.save_pretrained(tmp), processor.save_pretrained(tmp)))


def tiny_model_dpath(name: str, seed: int = 0, local_path: str | None = None) -> Path:
    """The local folder of the tiny model ``name`` built with ``seed``: the seed is part of the cache key, so
    ``model.seed=7`` builds (and then reuses) other weights than seed 0, whose folder keeps its plain name.
    A ``local_path`` (``model.local_path``) is the folder instead."""
    if local_path:
        return Path(local_path).expanduser()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"model.seed={seed!r} must be an integer (the seed of the tiny model's random weights).")
    return models_home() / (name if seed == 0 else f"{name}-seed{seed}")
