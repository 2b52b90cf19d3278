"""SAE checkpoints: a folder with ``sae.safetensors`` + ``config.json``, never a pickle.

``save_sae`` folds the input scale into a *copy* of the weights (the live module keeps training
unchanged), so a saved SAE takes raw activations. ``config.json`` says what the SAE is (the full
SAEConfig, group sizes, threshold, scale), its precision policy (``precision``, see
:mod:`vlmsae.sae.precision`), what it was trained on (``source``) and by which code (vlmsae
version, git commit). ``load_sae`` rebuilds the module from those two files only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.build import build_sae
from vlmsae.sae.config import SAEConfig
from vlmsae.sae.precision import precision_record
from vlmsae.utils.io import atomic_write, atomic_write_json
from vlmsae.utils.provenance import provenance

WEIGHTS_FNAME = "sae.safetensors"
CONFIG_FNAME = "config.json"
FORMAT = "vlmsae-sae"
FORMAT_VERSION = 1
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def save_sae(
    sae: SAE, dpath: str | Path, source: dict[str, Any] | None = None, trainer_precision: str | None = None
) -> Path:
    """Write ``dpath/sae.safetensors`` and ``dpath/config.json`` atomically; returns ``dpath``.

    ``source``: what the SAE was trained on, e.g. {"model": "clip_l14_336", "pretrained": "openai",
    "layer": 22, "tokens": "cls", "data": "/data/acts"}; defaults to ``sae.source``.
    ``trainer_precision``: the trainer's precision setting, recorded under "precision" with the SAE's own
    policy (vlmsae.sae.precision); defaults to ``sae.trainer_precision`` (set by the Lightning module).
    """
    from safetensors.torch import save_file

    if not isinstance(sae, SAE):
        raise TypeError(f"save_sae needs a vlmsae SAE module; got {type(sae).__name__}.")
    dpath = Path(dpath)
    dpath.mkdir(parents=True, exist_ok=True)
    scale = float(sae.input_scale)
    folded = copy.deepcopy(sae).cpu()
    folded.fold_input_scale_()
    tensors = {name: getattr(folded, name).detach().contiguous() for name in _TENSORS}
    threshold = float(folded.threshold)
    atomic_write(dpath / WEIGHTS_FNAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    prov = provenance()
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": sae.arch,
        "d_in": sae.d_in,
        "n_latents": sae.n_latents,
        "k": sae.cfg.k,
        "group_sizes": sae.group_sizes,
        "threshold": threshold if threshold >= 0 else None,
        "input_scale": {
            "value": scale,
            "folded": True,
            "convention": "s = sqrt(d_in / E||x||^2) over the training activations; folded into b_enc, b_dec "
            "and threshold (divided by s), so the saved SAE takes raw activations and codes are in raw units",
        },
        "n_steps": int(sae.n_steps),
        "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
        "precision": precision_record(sae, sae.trainer_precision if trainer_precision is None else trainer_precision),
        "source": dict(source if source is not None else sae.source),
        "config": sae.cfg.to_dict(),
        "vlmsae_version": prov["vlmsae_version"],
        "git_commit": prov["git_commit"],
        "created": prov["created"],
    }
    atomic_write_json(dpath / CONFIG_FNAME, info)
    return dpath


def read_sae_config(dpath: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder (no weights), with clear errors."""
    dpath = Path(dpath)
    if not dpath.is_dir():
        raise FileNotFoundError(
            f"SAE checkpoint folder {str(dpath)!r} does not exist; expected a folder with {WEIGHTS_FNAME} and "
            f"{CONFIG_FNAME} written by vlmsae.sae.save_sae (a training run keeps it in <run>/sae/)."
        )
    config_fpath = dpath / CONFIG_FNAME
    if not config_fpath.is_file():
        raise FileNotFoundError(f"{str(dpath)!r} has no {CONFIG_FNAME}: not an SAE checkpoint written by save_sae.")
    try:
        info = json.loads(config_fpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(config_fpath)!r} is not valid JSON ({err}); the checkpoint is corrupt.") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("config"), dict):
        raise ValueError(
            f"{str(config_fpath)!r} is not a vlmsae SAE config (expected \"format\": {FORMAT!r} and a \"config\" object)."
        )
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{str(config_fpath)!r} has format_version {info['format_version']}, newer than this vlmsae reads "
            f"({FORMAT_VERSION}); upgrade vlmsae."
        )
    return info


def load_sae(dpath: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Rebuild an SAE from a ``save_sae`` folder (safetensors + JSON only), in eval mode on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    dpath = Path(dpath)
    info = read_sae_config(dpath)
    weights_fpath = dpath / WEIGHTS_FNAME
    if not weights_fpath.is_file():
        raise FileNotFoundError(f"{str(dpath)!r} has {CONFIG_FNAME} but no {WEIGHTS_FNAME}: the checkpoint is incomplete.")
    cfg_dict = dict(info["config"])
    if cfg_dict.get("group_fractions") is not None:
        cfg_dict["group_fractions"] = tuple(cfg_dict["group_fractions"])
    try:
        cfg = SAEConfig(**cfg_dict)
    except TypeError as err:
        raise ValueError(f"{str(dpath / CONFIG_FNAME)!r}: its \"config\" does not match SAEConfig ({err}).") from err
    try:
        tensors = load_file(str(weights_fpath), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(weights_fpath)!r} is not a readable safetensors file ({err}).") from err
    missing = [name for name in _TENSORS if name not in tensors]
    if missing:
        raise ValueError(f"{str(weights_fpath)!r} lacks tensors {missing}; expected {list(_TENSORS)}.")
    sae = build_sae(cfg)
    with torch.no_grad():
        for name in _TENSORS:
            target = getattr(sae, name)
            if tensors[name].shape != target.shape:
                raise ValueError(
                    f"{str(weights_fpath)!r}: tensor {name} has shape {tuple(tensors[name].shape)}, but config.json "
                    f"implies {tuple(target.shape)}."
                )
            target.copy_(tensors[name])
    sae.source = dict(info.get("source") or {})
    precision = info.get("precision")
    sae.trainer_precision = precision.get("trainer_precision") if isinstance(precision, dict) else None
    return sae.to(device).eval()
