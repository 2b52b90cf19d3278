"""vlmsae's own SAE folder as an interop format: ``sae.safetensors`` + ``config.json`` ("format": "vlmsae-sae").

Written by :func:`vlmsae.sae.save_sae` (a training run keeps it in ``<run>/sae/``) and read by
:func:`vlmsae.sae.load_sae`; the ``trained_on`` recorded at training time is kept (layer = vlmsae's block index).
"""

from __future__ import annotations

from pathlib import Path

from vlmsae.formats import SAE_CONFIG_JSON, SAE_FORMAT
from vlmsae.sae.base import SAE
from vlmsae.sae.checkpoint import WEIGHTS_FNAME, load_sae, save_sae
from vlmsae.sae.interop._convert import json_object_or_none

NAME = "vlmsae"
EXPECTS = f'{WEIGHTS_FNAME} + {SAE_CONFIG_JSON} with "format": "{SAE_FORMAT}" (written by vlmsae.sae.save_sae)'
INPUT_NORMALISATION = "none: the training input scale is folded into b_enc, b_dec and threshold (raw activations in)"


def _folder(dpath: Path) -> Path:
    return dpath.parent if dpath.is_file() and dpath.name in (WEIGHTS_FNAME, SAE_CONFIG_JSON) else dpath


def detect(dpath: Path) -> bool:
    dpath = _folder(Path(dpath))
    config = json_object_or_none(dpath / SAE_CONFIG_JSON) if (dpath / WEIGHTS_FNAME).is_file() else None
    return config is not None and config.get("format") == SAE_FORMAT


def load(dpath: Path, device: str = "cpu") -> SAE:
    dpath = _folder(Path(dpath))
    sae = load_sae(dpath, device=device)
    trained_on = {"model": None, "pretrained": None, "layer": None, "tokens": None, **sae.trained_on}
    trained_on.setdefault("input_normalisation", INPUT_NORMALISATION)
    sae.trained_on = {**trained_on, "format": NAME, "original_path": str(dpath)}
    return sae


def save(sae: SAE, out_dpath: Path) -> Path:
    """vlmsae's own folder (any SAE vlmsae can hold, including one loaded from another library)."""
    return save_sae(sae, out_dpath)
