"""dictionary_learning's ``JumpReluAutoEncoder`` (state dict of ``ae.pt`` + ``config.json``) as a vlmsae JumpReLU SAE.

Called by the dictionary_learning format module for ``trainer.dict_class == "JumpReluAutoEncoder"``; it reads the
files (safely), this converts. Keys (dictionary.py ``JumpReluAutoEncoder``): ``W_enc`` [d, F], ``b_enc`` [F],
``W_dec`` [F, d], ``b_dec`` [d], ``threshold`` [F] (raw, an nn.Parameter; not a log). Forward as the library's
``load_dictionary`` leaves it (``apply_b_dec_to_input = False``, a plain attribute that is not saved):
pre = x W_enc + b_enc; f = relu(pre * (pre > threshold)); x^ = f W_dec + b_dec. vlmsae subtracts b_dec before
encoding, so b_enc becomes b_enc + b_dec W_enc; the pre-activations, hence the threshold comparison, are unchanged,
and relu(pre * (pre > t)) = relu(pre) * (pre > t) is vlmsae's JumpReLU rule. A trainer that normalised activations
has folded its norm factor into b_enc, b_dec and threshold before saving (``scale_biases``): the file takes raw
activations, nothing to undo here. Layer: ``trainer.layer`` is the output of block L (dictionary_learning hooks
``model.layers[L]``) = vlmsae layer L. ``trainer.lm_name`` names the model.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmsae.sae.base import SAE

DICT_CLASS = "JumpReluAutoEncoder"
KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def load_dictionary_learning_jumprelu(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> SAE:
    """A ``JumpReluAutoEncoder`` state dict + its ``config.json`` dict -> JumpReLU SAE (cpu, eval, ``source`` set).

    ``source`` gets model (when ``trainer.lm_name`` is a known id), layer (``trainer.layer``), tokens None,
    input_normalisation "none (norm factor folded by dictionary_learning)", format "dictionary_learning"; the caller
    sets ``original_path``.
    """
    from vlmsae.sae.build import build_sae
    from vlmsae.sae.config import SAEConfig
    from vlmsae.sae.interop.saelens import _model_from_name

    if not isinstance(state_dict, dict):
        raise TypeError(f"load_dictionary_learning_jumprelu needs a state dict; got {type(state_dict).__name__}.")
    trainer = (config or {}).get("trainer") or {}
    missing = [key for key in KEYS if key not in state_dict]
    extra = sorted(set(state_dict) - set(KEYS))
    if missing or extra:
        raise ValueError(
            f"A dictionary_learning {DICT_CLASS} state dict has exactly {list(KEYS)}; this one lacks {missing} and "
            f"has unexpected {extra}. Is trainer.dict_class right?"
        )
    W_enc_DF = state_dict["W_enc"].float()
    if W_enc_DF.dim() != 2:
        raise ValueError(f"{DICT_CLASS}: W_enc must be [activation_dim, dict_size]; got {tuple(W_enc_DF.shape)}.")
    d_in, n_latents = W_enc_DF.shape
    shapes = {"b_enc": (n_latents,), "W_dec": (n_latents, d_in), "b_dec": (d_in,), "threshold": (n_latents,)}
    for key, shape in shapes.items():
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(
                f"{DICT_CLASS}: {key} has shape {tuple(state_dict[key].shape)}, but W_enc {tuple(W_enc_DF.shape)} "
                f"implies {shape}."
            )
    for key, value in (("activation_dim", d_in), ("dict_size", n_latents)):
        if trainer.get(key) is not None and trainer[key] != value:
            raise ValueError(
                f"{DICT_CLASS}: config.json trainer.{key}={trainer[key]!r} contradicts the weights ({key} = {value} "
                "from W_enc's shape); the config and ae.pt belong to different SAEs."
            )
    b_dec_D = state_dict["b_dec"].float()
    b_enc_F = state_dict["b_enc"].float() + (b_dec_D.double() @ W_enc_DF.double()).float()
    sae = build_sae(SAEConfig(arch="jumprelu", d_in=d_in, n_latents=n_latents))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc_DF.T)
        sae.b_enc.copy_(b_enc_F)
        sae.W_dec.copy_(state_dict["W_dec"].float())
        sae.b_dec.copy_(b_dec_D)
        sae.threshold.copy_(state_dict["threshold"].float())
    model, pretrained = _model_from_name(trainer.get("lm_name"))
    layer = trainer.get("layer")
    sae.source = {
        "model": model,
        "pretrained": pretrained,
        "layer": layer if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 else None,
        "tokens": None,
        "input_normalisation": "none (norm factor folded by dictionary_learning)",
        "format": "dictionary_learning",
        "original_path": None,
    }
    return sae.eval()
