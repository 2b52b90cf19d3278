"""Shared steps of the foreign-format loaders: reading their files, and a vlmsae SAE from weights in its layout.

vlmsae encodes ``z = (x - b_dec) @ W_enc.T + b_enc`` and decodes ``x_hat = f @ W_dec + b_dec`` (W_enc, W_dec
[F, D]); each format module rewrites its library's forward into that form before calling ``sae_from_weights``.
A loaded class whose forward no vlmsae arch reproduces carries ``interop_only`` (a reason string): a writer
(save_sae, export) should refuse such a module instead of saving it as its base arch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.build import SAE_CLASSES
from vlmsae.sae.checkpoint import check_shape
from vlmsae.sae.config import SAEConfig


def read_json_object(fpath: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``fpath``; unreadable JSON or another JSON type is refused, naming the file and ``what``."""
    try:
        obj = json.loads(fpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(fpath)!r} is not valid JSON ({err}); expected {what}.") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{str(fpath)!r} holds a JSON {type(obj).__name__}, expected {what}.")
    return obj


def json_object_or_none(fpath: Path) -> dict[str, Any] | None:
    """The JSON object in ``fpath``, or None when it is absent, unreadable or not an object (for ``detect``)."""
    try:
        return read_json_object(fpath, "an object")
    except ValueError:
        return None


def positive_int(cfg: Mapping[str, Any], name: str, where: str) -> int:
    """``cfg[name]``, refused unless it is an integer >= 1 (booleans are not integers here)."""
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: {name} must be an integer >= 1; got {value!r}.")
    return value


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
    with torch.no_grad():
        for name, value in weights.items():
            target = getattr(sae, name)
            check_shape(name, value, tuple(target.shape), where)
            target.copy_(value.detach().to(torch.float32))
    sae.trained_on = dict(trained_on or {})
    return sae.to(device).eval()


def single_checkpoint(dpath: Path, found: list[Path], library: str, expects: str) -> Path:
    """The one checkpoint file ``found`` under ``dpath``; none or several is an error naming them."""
    if not found:
        raise FileNotFoundError(f"{str(dpath)!r} holds no {library} checkpoint; expected {expects}.")
    if len(found) > 1:
        names = ", ".join(repr(f.name) for f in found)
        raise ValueError(f"{str(dpath)!r} holds several {library} files ({names}); pass the path of one of them.")
    return found[0]
