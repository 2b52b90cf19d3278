"""MSAE checkpoints (WolodjaZ/MSAE, Matryoshka SAEs on CLIP embeddings) as vlmsae SAEs.

File: ``<n_latents>_<n_inputs>_<activation>[_<k>][_RW|_UW]_<tied>_<normalize>_<latent_soft_cap>_<dataset>.pth`` =
``torch.save({"model": state_dict, "mean_center", "scaling_factor", "target_norm"})``; the configuration is only
in the file name, parsed as MSAE's ``load_model`` does. Read with ``weights_only=True`` plus numpy's scalar globals
(``target_norm`` is an np.float64). State dict: ``pre_bias`` [d], ``encoder`` [d, F], ``latent_bias`` [F],
``decoder`` [F, d] (absent when tied: ``encoder.T``).

Forward reproduced: MSAE's inference ``SAE.forward(x)`` (topk=-1): x~ = (x - mean_center) * s, dense codes
ReLU((x~ - pre_bias) @ encoder + latent_bias) over all latents, x_hat = (codes @ decoder + pre_bias) / s +
mean_center. Folded exactly into a ReLU SAE: W_enc = s * encoder.T, b_enc = latent_bias, W_dec = decoder / s,
b_dec = mean_center + pre_bias / s. ``latent_soft_cap`` c > 0 gives c * tanh(ReLU(pre) / c)
(:class:`SoftCapReluSAE`). Refused: ``normalize=True`` and activations whose dense path is not a ReLU.

Input: the OpenAI ``clip`` package's projected image embedding (vlmsae layer ``"last"``, CLS); the dataset part of
the name (``<dataset>_<ViT-B~16>_<split>_<image|text>_<N>_<d>``) gives the CLIP model. Text SAEs get layer None.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.checkpoint import check_shape, require_keys
from vlmsae.sae.interop._convert import finite_positive, matching_files, sae_from_weights, single_checkpoint
from vlmsae.sae.interop.torchfile import read_torch_file
from vlmsae.sae.relu import ReluSAE

NAME = "msae"
EXPECTS = (
    "one MSAE file named <n_latents>_<n_inputs>_<activation>[_<k>][_RW|_UW]_<tied>_<normalize>_<soft_cap>_<dataset>"
    ".pth holding {model: {pre_bias, encoder, latent_bias, decoder}, mean_center, scaling_factor, target_norm}"
)
_NAME_RE = re.compile(
    r"^(?P<n_latents>\d+)_(?P<n_inputs>\d+)_(?P<act>[A-Za-z]+)(?:_(?P<arg>\d+))?(?:_(?P<weighting>RW|UW))?"
    r"_(?P<tied>True|False)_(?P<normalize>True|False)_(?P<soft_cap>[-+0-9.eE]+)_(?P<dataset>.+)\.pth?$"
)
_DENSE_RELU_ACTS = ("ReLU", "TopKReLU", "BatchTopKReLU")
# OpenAI CLIP names in MSAE's activation files ("/" written as "~") -> vlmsae model configs (conf/model).
_CLIP_MODELS = {"ViT-B/32": "clip_b32", "ViT-L/14": "clip_l14", "ViT-L/14@336px": "clip_l14_336"}
_DATASET_RE = re.compile(r"^(?P<data>.+?)_(?P<clip>(?:ViT|RN)[^_]*)_(?P<split>[^_]+)_(?P<modality>image|text)_\d+_\d+$")


class SoftCapReluSAE(ReluSAE):
    """MSAE with ``latent_soft_cap`` c > 0: codes c * tanh(ReLU(z) / c). Inference only."""

    interop_only = "MSAE soft-capped codes c * tanh(ReLU(z) / c); no vlmsae arch has them"

    soft_cap: float = 0.0

    def _activate(self, z_BF: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return self.soft_cap * torch.tanh(torch.relu(z_BF) / self.soft_cap)


def parse_name(fname: str) -> dict[str, Any] | None:
    """The configuration encoded in an MSAE file name, or None when the name is not MSAE's."""
    match = _NAME_RE.match(fname)
    if match is None:
        return None
    info: dict[str, Any] = match.groupdict()
    info["n_latents"], info["n_inputs"] = int(info["n_latents"]), int(info["n_inputs"])
    info["tied"], info["normalize"] = info["tied"] == "True", info["normalize"] == "True"
    try:
        info["soft_cap"] = float(info["soft_cap"])
    except ValueError:
        return None
    data = _DATASET_RE.match(info["dataset"])
    info["clip"] = data["clip"].replace("~", "/") if data else None
    info["modality"] = data["modality"] if data else None
    return info


def _candidates(dpath: Path) -> list[Path]:
    return matching_files(dpath, lambda f: f.suffix in (".pt", ".pth") and parse_name(f.name) is not None)


def detect(dpath: Path) -> bool:
    """True for an MSAE-named ``.pth`` file, or a folder holding one (file names only)."""
    return bool(_candidates(Path(dpath)))


def load(dpath: Path, device: str = "cpu") -> SAE:
    """An MSAE file (or a folder with exactly one) as an eval-mode vlmsae SAE on raw CLIP embeddings."""
    dpath = Path(dpath)
    fpath = single_checkpoint(dpath, _candidates(dpath), "MSAE", EXPECTS)
    where = repr(str(fpath))
    info = parse_name(fpath.name)
    act = info["act"]
    if act not in _DENSE_RELU_ACTS:
        raise ValueError(
            f"{where}: MSAE activation {act!r} is not supported: vlmsae reproduces MSAE's dense inference codes only "
            f"when they are ReLU(pre) ({', '.join(_DENSE_RELU_ACTS)})."
        )
    if info["normalize"]:
        raise ValueError(
            f"{where}: normalize=True (a per-row standardisation of each input) is not supported: MSAE's own SAE "
            "wrapper cannot decode it, and it is not a fixed affine map vlmsae could fold."
        )

    blob = read_torch_file(fpath, allow_numpy_scalars=True)  # target_norm is an np.float64
    if not (isinstance(blob, dict) and isinstance(blob.get("model"), dict)):
        raise ValueError(f"{where}: expected a dict with a 'model' state dict; expected {EXPECTS}.")
    state = blob["model"]
    names = ("pre_bias", "encoder", "latent_bias") + (() if info["tied"] else ("decoder",))
    require_keys(state, names, f"{where}: the model state dict")
    d_in, n_latents = info["n_inputs"], info["n_latents"]
    check_shape("encoder", state["encoder"], (d_in, n_latents), where + " (per its file name)")
    check_shape("pre_bias", state["pre_bias"], (d_in,), where)  # latent_bias and decoder: by sae_from_weights
    encoder_DF = state["encoder"].double()
    decoder_FD = encoder_DF.T if info["tied"] else state["decoder"].double()

    mean_D = torch.as_tensor(blob.get("mean_center", 0.0), dtype=torch.float64)
    mean_D = mean_D.expand(d_in).clone() if mean_D.dim() == 0 else mean_D.reshape(-1)
    check_shape("mean_center", mean_D, (d_in,), where)
    scale = finite_positive(blob.get("scaling_factor", 1.0), "scaling_factor", where)

    # (x~ - p) E + lb with x~ = (x - m) s  ==  (x - (m + p/s)) (s E) + lb;  x_hat = f (D/s) + (m + p/s)
    pre_bias_D = state["pre_bias"].double()
    b_dec_D = mean_D + pre_bias_D / scale
    trained_on = {
        "model": _CLIP_MODELS.get(info["clip"]) if info["clip"] else None,
        "pretrained": "openai" if info["clip"] else None,
        "layer": "last" if info["modality"] == "image" else None,
        "tokens": "cls" if info["modality"] == "image" else None,
        "input_normalisation": f"(x - mean_center) * {scale:.6g}, folded into the weights",
        "format": NAME,
        "original_path": str(fpath),
        "library": {
            "activation": act + (f"_{info['arg']}" if info["arg"] else ""),
            "matryoshka_weighting": info["weighting"],
            "tied": info["tied"],
            "latent_soft_cap": info["soft_cap"],
            "dataset": info["dataset"],
            "clip_model": info["clip"],
            "modality": info["modality"],
            "target_norm": float(blob["target_norm"]) if blob.get("target_norm") is not None else None,
            "inference": "dense ReLU codes over all latents (MSAE SAE.forward with topk=-1)",
        },
    }
    sae = sae_from_weights(
        "relu",
        scale * encoder_DF.T,
        state["latent_bias"].double(),
        decoder_FD / scale,
        b_dec_D,
        cls=SoftCapReluSAE if info["soft_cap"] > 0 else None,
        trained_on=trained_on,
        device=device,
        where=where,
    )
    if info["soft_cap"] > 0:
        sae.soft_cap = info["soft_cap"]
    return sae
