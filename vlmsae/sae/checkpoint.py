"""SAE checkpoints: a folder with ``sae.safetensors`` + ``config.json``, never a pickle.

``save_sae`` folds the input scale into a *copy* of the weights (the live module keeps training
unchanged), so a saved SAE takes raw activations. ``config.json`` says what the SAE is (the full
SAEConfig, group sizes, threshold, scale), its precision policy (``precision``, see
:mod:`vlmsae.sae.precision`), what it was trained on (``trained_on``) and by which code (vlmsae
version, git commit). ``load_sae`` rebuilds the module from those two files only. The ``config.json``
format is :class:`vlmsae.formats.SAECheckpointConfig` (read it alone with :func:`vlmsae.formats.read_sae_config`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from vlmsae.formats import SAE_CONFIG_JSON, SAE_FORMAT, SAECheckpointConfig, read_sae_config, write_sae_config
from vlmsae.sae.base import SAE
from vlmsae.sae.build import build_sae
from vlmsae.sae.config import SAEConfig
from vlmsae.sae.precision import precision_record
from vlmsae.utils.io import atomic_write
from vlmsae.utils.provenance import provenance

WEIGHTS_FNAME = "sae.safetensors"
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def require_keys(found: Mapping[str, Any], names: Iterable[str], where: str, what: str = "") -> None:
    """Refuse ``found`` (a state dict) when it lacks any of ``names``, listing what it has."""
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"{where} lacks {missing}{what}; expected {list(names)} (found {sorted(found)}).")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    """Refuse a tensor whose shape is not ``shape``, naming the file and the tensor."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}; expected {tuple(shape)}.")


def copy_weights_(sae: SAE, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into the same-named tensors of ``sae`` (cast to their dtype), refusing any other shape."""
    with torch.no_grad():
        for name, value in tensors.items():
            target = getattr(sae, name)
            check_shape(name, value, tuple(target.shape), where)
            target.copy_(value)


def read_safetensors(fpath: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU; an unreadable file is refused naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(fpath), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(fpath)!r} is not a readable safetensors file ({err}).") from err


def refuse_interop_only(sae: SAE, action: str) -> None:
    """A loaded foreign SAE whose forward no vlmsae arch reproduces (``interop_only``: why) cannot be written as
    its base arch: that would silently change its codes. Use it in memory, or keep the original files."""
    reason = getattr(sae, "interop_only", None)
    if reason:
        raise ValueError(
            f"{action}: this {type(sae).__name__} (loaded from {sae.trained_on.get('format')}) cannot be written: "
            f"{reason}. Written as its base architecture it would give other codes; keep using the original files."
        )


def save_sae(
    sae: SAE, dpath: str | Path, trained_on: dict[str, Any] | None = None, trainer_precision: str | None = None
) -> Path:
    """Write ``dpath/sae.safetensors`` and ``dpath/config.json`` atomically; returns ``dpath``.

    ``trained_on``: what the SAE was trained on, e.g. {"model": "clip_l14_336", "pretrained": "openai",
    "layer": 22, "tokens": "cls", "data": "/data/acts"}; defaults to ``sae.trained_on``.
    ``trainer_precision``: the trainer's precision setting, recorded under "precision" with the SAE's own
    policy (vlmsae.sae.precision); defaults to ``sae.trainer_precision`` (set by the Lightning module).
    """
    from safetensors.torch import save_file

    if not isinstance(sae, SAE):
        raise TypeError(f"save_sae needs a vlmsae SAE module; got {type(sae).__name__}.")
    refuse_interop_only(sae, "save_sae")
    dpath = Path(dpath)
    dpath.mkdir(parents=True, exist_ok=True)
    scale = float(sae.input_scale)
    folded = copy.deepcopy(sae).cpu()
    folded.fold_input_scale_()
    tensors = {name: getattr(folded, name).detach().contiguous() for name in _TENSORS}
    # config.json "threshold": the scalar inference threshold (< 0 = not estimated -> null). A per-latent one
    # (jumprelu, [F] in sae.safetensors, which load_sae reads) is written as a number only when all latents
    # share it (e.g. a BatchTopK SAE saved as JumpReLU by SAELens), else null: the tensor file is authoritative.
    threshold_F = folded.threshold.detach().reshape(-1)
    unset = folded.threshold.dim() == 0 and float(threshold_F[0]) < 0
    threshold = float(threshold_F[0]) if bool((threshold_F == threshold_F[0]).all()) and not unset else None
    atomic_write(dpath / WEIGHTS_FNAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": SAE_FORMAT}))
    prov = provenance()
    info = SAECheckpointConfig(
        arch=sae.arch,
        d_in=sae.d_in,
        n_latents=sae.n_latents,
        k=sae.cfg.k,
        group_sizes=sae.group_sizes,
        threshold=threshold,
        input_scale={
            "value": scale,
            "folded": True,
            "convention": "s = sqrt(d_in / E||x||^2) over the training activations; folded into b_enc, b_dec "
            "and threshold (divided by s), so the saved SAE takes raw activations and codes are in raw units",
        },
        n_steps=int(sae.n_steps),
        dtype=str(sae.W_dec.dtype).removeprefix("torch."),
        precision=precision_record(sae, sae.trainer_precision if trainer_precision is None else trainer_precision),
        trained_on=dict(trained_on if trained_on is not None else sae.trained_on),
        config=sae.cfg.to_dict(),
        vlmsae_version=prov["vlmsae_version"],
        git_commit=prov["git_commit"],
        created=prov["created"],
    )
    write_sae_config(dpath, info)
    return dpath


def load_sae(dpath: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Rebuild an SAE from a ``save_sae`` folder (safetensors + JSON only), in eval mode on ``device``."""
    dpath = Path(dpath)
    info = read_sae_config(dpath)
    weights_fpath = dpath / WEIGHTS_FNAME
    if not weights_fpath.is_file():
        raise FileNotFoundError(
            f"{str(dpath)!r} has {SAE_CONFIG_JSON} but no {WEIGHTS_FNAME}: the checkpoint is incomplete."
        )
    try:
        cfg = SAEConfig(**info.config)  # (it makes a JSON list of group_fractions a tuple itself)
    except TypeError as err:
        raise ValueError(f'{str(dpath / SAE_CONFIG_JSON)!r}: its "config" does not match SAEConfig ({err}).') from err
    tensors = read_safetensors(weights_fpath)
    require_keys(tensors, _TENSORS, repr(str(weights_fpath)))
    sae = build_sae(cfg)
    copy_weights_(sae, {name: tensors[name] for name in _TENSORS}, f"{str(weights_fpath)!r} (shapes per config.json)")
    sae.trained_on = dict(info.trained_on)
    sae.trainer_precision = (info.precision or {}).get("trainer_precision")
    return sae.to(device).eval()
