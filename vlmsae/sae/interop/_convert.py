"""Shared steps of the foreign-format loaders: reading their files, and a vlmsae SAE from weights in its layout.

vlmsae encodes ``z = (x - b_dec) @ W_enc.T + b_enc`` and decodes ``x_hat = f @ W_dec + b_dec`` (W_enc, W_dec
[F, D]); each format module rewrites its library's forward into that form before calling ``sae_from_weights``.
A loaded class whose forward no vlmsae arch reproduces carries ``interop_only`` (a reason string): a writer
(save_sae, export) should refuse such a module instead of saving it as its base arch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from vlmsae.formats import read_json_object
from vlmsae.sae.base import SAE
from vlmsae.sae.build import SAE_CLASSES
from vlmsae.sae.checkpoint import copy_weights_
from vlmsae.sae.config import SAEConfig


def json_object_or_none(fpath: Path) -> dict[str, Any] | None:
    """The JSON object in ``fpath``, or None when it is absent, unreadable or not an object (for ``detect``)."""
    try:
        return read_json_object(fpath, "")
    except ValueError:
        return None


def positive_int(cfg: Mapping[str, Any], name: str, where: str) -> int:
    """``cfg[name]``, refused unless it is an integer >= 1 (booleans are not integers here)."""
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: {name} must be an integer >= 1; got {value!r}.")
    return value


def finite_positive(value: Any, name: str, where: str) -> float:
    """``value`` as a float, refused unless it is a finite number > 0 (booleans are not numbers here)."""
    ok = isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{where}: {name} must be a finite number > 0; got {value!r}.")
    return number


def matching_files(path: Path, accept: Callable[[Path], bool], pattern: str = "*") -> list[Path]:
    """``[path]`` when it is a file ``accept`` takes, else the files matching ``pattern`` in folder ``path`` that
    it takes, sorted ([] when ``path`` is neither)."""
    if path.is_file():
        return [path] if accept(path) else []
    return sorted(f for f in path.glob(pattern) if accept(f)) if path.is_dir() else []


def sae_from_weights(
    arch: str,
    W_enc_FD: torch.Tensor,
    b_enc_F: torch.Tensor,
    W_dec_FD: torch.Tensor,
    b_dec_D: torch.Tensor,
    *,
    k: int | None = None,
    threshold: float | torch.Tensor | None = None,
    cls: type[SAE] | None = None,
    trained_on: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    where: str = "sae_from_weights",
    **cfg_fields: Any,
) -> SAE:
    """An eval-mode SAE of ``arch`` (class ``cls`` if given, e.g. a format's own activation) holding these weights.

    Weights are cast to float32 (the SAE's compute dtype). ``threshold`` (BatchTopK scalar, JumpReLU [F]) is in
    code units. ``cfg_fields`` go to :class:`SAEConfig` (e.g. ``group_fractions``).
    """
    n_latents, d_in = W_enc_FD.shape
    if k is not None:
        cfg_fields["k"] = int(k)
    sae = (cls or SAE_CLASSES[arch])(SAEConfig(arch=arch, d_in=int(d_in), n_latents=int(n_latents), **cfg_fields))
    weights = {"W_enc": W_enc_FD, "b_enc": b_enc_F, "W_dec": W_dec_FD, "b_dec": b_dec_D}
    if threshold is not None:
        weights["threshold"] = torch.as_tensor(threshold)
    copy_weights_(sae, weights, where)
    sae.trained_on = dict(trained_on or {})
    return sae.to(device).eval()


def export_weights(sae: SAE) -> tuple[dict[str, torch.Tensor], str]:
    """What a writer saves of ``sae``: float32 CPU copies of W_enc, b_enc, W_dec, b_dec and threshold with the input
    scale folded, and the arch to write: a BatchTopK-family SAE whose threshold is not estimated encodes with
    per-sample top-k, so it is written as topk."""
    folded = copy.deepcopy(sae).cpu().float()
    folded.fold_input_scale_()
    weights = {name: getattr(folded, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    weights["threshold"] = folded.threshold.detach().clone()
    unset = sae.arch in ("batchtopk", "matryoshka") and float(weights["threshold"]) < 0
    return weights, "topk" if unset else sae.arch


def single_checkpoint(dpath: Path, found: list[Path], library: str, expects: str) -> Path:
    """The one checkpoint file ``found`` under ``dpath``; none or several is an error naming them."""
    if not found:
        raise FileNotFoundError(f"{str(dpath)!r} holds no {library} checkpoint; expected {expects}.")
    if len(found) > 1:
        names = ", ".join(repr(f.name) for f in found)
        raise ValueError(f"{str(dpath)!r} holds several {library} files ({names}); pass the path of one of them.")
    return found[0]
