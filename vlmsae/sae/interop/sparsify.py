"""EleutherAI sparsify (and its predecessor ``EleutherAI/sae``) hookpoint folders: ``cfg.json`` + ``sae.safetensors``.

Layout (sparsify ``SparseCoder.save_to_disk`` / ``load_from_disk``): weights ``encoder.weight`` [F, d],
``encoder.bias`` [F], ``W_dec`` [F, d] (one row per latent, no transpose), ``b_dec`` [d], and ``W_skip`` [d, d] iff
``skip_connection``. cfg.json: ``d_in``, ``k``, ``num_latents`` (0 = d_in * ``expansion_factor``), ``activation``
(topk | groupmax; absent in old files = topk), ``normalize_decoder``, ``multi_topk``, ``skip_connection``,
``transcode``, and, in mid-2024 files only, ``signed``.

Forward (an SAE, not a transcoder): p = relu((x - b_dec) encoder.weight^T + encoder.bias); keep the top-k of p per
sample; x^ = sum values * W_dec[indices] + b_dec. That is vlmsae's ``topk`` exactly (vlmsae takes the top-k of the
pre-activations and then the ReLU: the kept positive entries are the same, and entries below zero are 0 either way).
``multi_topk`` only adds a training loss (inference uses k); ``normalize_decoder`` only constrains training.
Refused, with a message: ``activation="groupmax"`` (a per-group argmax, not a top-k), ``skip_connection`` (x^ adds
x W_skip^T, a term that is no SAE decode), ``transcode`` (predicts another layer's output), ``signed`` (top-k of
|pre| with signed values). There is no input normalisation in sparsify.

Layer convention: the folder name is the hookpoint. With ``layers`` sparsify names it ``<layers_name>.<L>`` (e.g.
``layers.6``, ``vision_model.encoder.layers.6``) and records that module's OUTPUT: block L's output = vlmsae layer L
(HF ``hidden_states[L+1]``); open_clip's ``transformer.resblocks.L`` likewise. Other hookpoints give layer None.
The run folder above (``../config.json``, sparsify's TrainConfig) names the model (``model``), mapped to a vlmsae
model name when it is a known HF id. Token selection is unknown (None).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.build import build_sae
from vlmsae.sae.config import SAEConfig
from vlmsae.sae.interop.names import model_from_name

NAME = "sparsify"
EXPECTS = "cfg.json (sparsify SparseCoderConfig: d_in, k, ...) + sae.safetensors (encoder.weight, W_dec, b_dec)"
CFG_FNAME = "cfg.json"
WEIGHTS_FNAME = "sae.safetensors"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|resblocks|h|blocks)\.(\d+)$")


def detect(dpath: Path) -> bool:
    dpath = Path(dpath)
    return (dpath / CFG_FNAME).is_file() and (dpath / WEIGHTS_FNAME).is_file()


def layer_from_hookpoint(hookpoint: str) -> int | None:
    """vlmsae layer of a sparsify hookpoint name (a module whose output was recorded); None when not a block."""
    match = _LAYER_RE.search(hookpoint)
    return int(match.group(1)) if match else None


def _int_field(cfg: dict[str, Any], name: str, fpath: Path, minimum: int) -> int:
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{str(fpath)!r}: {name} must be an integer >= {minimum}; got {value!r}.")
    return value


def load(dpath: Path, device: str = "cpu") -> SAE:
    """A sparsify hookpoint folder as a vlmsae ``topk`` SAE (eval mode, ``trained_on`` set)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    dpath = Path(dpath)
    if not detect(dpath):
        raise FileNotFoundError(f"{str(dpath)!r} is not a sparsify folder: expected {EXPECTS}.")
    cfg_fpath, weights_fpath = dpath / CFG_FNAME, dpath / WEIGHTS_FNAME
    try:
        cfg = json.loads(cfg_fpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(cfg_fpath)!r} is not valid JSON ({err}); expected a sparsify cfg.json.") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(cfg_fpath)!r} holds a JSON {type(cfg).__name__}, expected a sparsify config object.")
    activation = cfg.get("activation", "topk")
    refusals = {
        "activation": (activation != "topk", f"activation={activation!r} (a per-group argmax, not a top-k)"),
        "skip_connection": (bool(cfg.get("skip_connection")), "skip_connection=true (x^ adds x W_skip^T)"),
        "transcode": (bool(cfg.get("transcode")), "transcode=true (a transcoder predicts another layer's output)"),
        "signed": (bool(cfg.get("signed")), "signed=true (top-k of |pre| with signed values, no ReLU)"),
    }
    for _, (refused, why) in refusals.items():
        if refused:
            raise ValueError(
                f"{str(cfg_fpath)!r}: {why} is not representable by a vlmsae SAE; only sparsify TopK SAEs "
                "(activation topk, no skip connection, not a transcoder, unsigned) load."
            )
    d_in = _int_field(cfg, "d_in", cfg_fpath, 1)
    k = _int_field(cfg, "k", cfg_fpath, 1)
    num_latents = cfg.get("num_latents", 0) or d_in * _int_field(cfg, "expansion_factor", cfg_fpath, 1)
    try:
        tensors = load_file(str(weights_fpath), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(weights_fpath)!r} is not a readable safetensors file ({err}).") from err
    shapes = {
        "encoder.weight": (num_latents, d_in),
        "encoder.bias": (num_latents,),
        "W_dec": (num_latents, d_in),
        "b_dec": (d_in,),
    }
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise ValueError(
            f"{str(weights_fpath)!r} lacks {missing} (it has {sorted(tensors)}); a sparsify SAE saved with its "
            f"decoder has {list(shapes)}."
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{str(weights_fpath)!r}: {name} has shape {tuple(tensors[name].shape)}, but cfg.json (d_in={d_in}, "
                f"num_latents={num_latents}) implies {shape}."
            )
    if k > num_latents:
        raise ValueError(f"{str(cfg_fpath)!r}: k={k} is larger than the {num_latents} latents.")
    sae = build_sae(SAEConfig(arch="topk", d_in=d_in, n_latents=num_latents, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(tensors["encoder.weight"].float())
        sae.b_enc.copy_(tensors["encoder.bias"].float())
        sae.W_dec.copy_(tensors["W_dec"].float())
        sae.b_dec.copy_(tensors["b_dec"].float())
    run_cfg = _read_run_config(dpath.parent / "config.json")
    model, pretrained = model_from_name(run_cfg.get("model"))
    sae.trained_on = {
        "model": model,
        "pretrained": pretrained,
        "layer": layer_from_hookpoint(dpath.name),
        "tokens": None,
        "input_normalisation": "none",
        "format": NAME,
        "original_path": str(dpath),
        "hookpoint": dpath.name,
        "model_name": run_cfg.get("model"),
    }
    return sae.to(device).eval()


def _read_run_config(fpath: Path) -> dict[str, Any]:
    """sparsify's run-level TrainConfig (``model``, ``hookpoints``, ...), or {} when absent or unreadable."""
    try:
        obj = json.loads(fpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}
