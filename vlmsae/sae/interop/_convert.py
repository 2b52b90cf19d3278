"""Shared step of the foreign-format loaders: a vlmsae SAE module from weights in vlmsae's layout.

vlmsae encodes ``z = (x - b_dec) @ W_enc.T + b_enc`` and decodes ``x_hat = f @ W_dec + b_dec`` (W_enc, W_dec
[F, D]); each format module rewrites its library's forward into that form before calling ``sae_from_weights``.
Loaded SAEs are for inference: decoder rows need not be unit norm, and ``input_scale`` stays 1 (any input
scaling is already folded into the weights).
A loaded class whose forward no vlmsae arch reproduces carries ``interop_only`` (a reason string): a writer
(save_sae, export) should refuse such a module instead of saving it as its base arch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.build import SAE_CLASSES
from vlmsae.sae.config import SAEConfig


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    """Refuse a tensor whose shape is not ``shape``, naming the file and the tensor."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}; expected {tuple(shape)}.")


def sae_from_weights(
    arch: str,
    W_enc_FD: torch.Tensor,
    b_enc_F: torch.Tensor,
    W_dec_FD: torch.Tensor,
    b_dec_D: torch.Tensor,
    *,
    k: int | None = None,
    threshold: float | None = None,
    cls: type[SAE] | None = None,
    trained_on: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> SAE:
    """An eval-mode SAE of ``arch`` (class ``cls`` if given, e.g. a format's own activation) holding these weights.

    Weights are cast to float32 (the SAE's compute dtype). ``threshold`` (BatchTopK) is in code units.
    """

    n_latents, d_in = W_enc_FD.shape
    cfg_kwargs: dict[str, Any] = {"arch": arch, "d_in": int(d_in), "n_latents": int(n_latents)}
    if k is not None:
        cfg_kwargs["k"] = int(k)
    cfg = SAEConfig(**cfg_kwargs)
    sae = (cls or SAE_CLASSES[arch])(cfg)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc_FD), ("b_enc", b_enc_F), ("W_dec", W_dec_FD), ("b_dec", b_dec_D)):
            target = getattr(sae, name)
            check_shape(name, value, tuple(target.shape), "sae_from_weights")
            target.copy_(value.detach().to(torch.float32))
        if threshold is not None:
            sae.threshold.fill_(float(threshold))
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
