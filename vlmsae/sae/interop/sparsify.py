"""EleutherAI sparsify (and its predecessor ``EleutherAI/sae``) hookpoint folders: ``cfg.json`` + ``sae.safetensors``.

Weights (``SparseCoder.save_to_disk``): ``encoder.weight`` [F, d], ``encoder.bias``, ``W_dec`` [F, d], ``b_dec``.
cfg.json: ``d_in``, ``k``, ``num_latents`` (0 = d_in * ``expansion_factor``), ``activation`` (absent = topk), ...
The forward, relu((x - b_dec) W_e^T + b_e) kept at its per-sample top-k, is vlmsae's ``topk`` exactly
(``multi_topk`` and ``normalize_decoder`` only affect training). Refused: ``activation="groupmax"``,
``skip_connection``, ``transcode``, ``signed``. No input normalisation.

Layer: the folder name is the hookpoint, ``<layers_name>.<L>`` (``layers.6``, ``transformer.resblocks.6``, ...),
whose output is vlmsae layer L; other hookpoints give None. The run's ``../config.json`` names the model.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlmsae.formats import read_json_object
from vlmsae.sae.base import SAE
from vlmsae.sae.checkpoint import check_shape, read_safetensors, require_keys
from vlmsae.sae.interop._convert import json_object_or_none, positive_int, sae_from_weights
from vlmsae.sae.interop.names import model_from_name

NAME = "sparsify"
EXPECTS = "cfg.json (sparsify SparseCoderConfig: d_in, k, ...) + sae.safetensors (encoder.weight, W_dec, b_dec)"
CFG_FNAME = "cfg.json"
WEIGHTS_FNAME = "sae.safetensors"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|resblocks|h|blocks)\.(\d+)$")


def detect(dpath: Path) -> bool:
    return (Path(dpath) / CFG_FNAME).is_file() and (Path(dpath) / WEIGHTS_FNAME).is_file()


def layer_from_hookpoint(hookpoint: str) -> int | None:
    """vlmsae layer of a sparsify hookpoint name (a module whose output was recorded); None when not a block."""
    match = _LAYER_RE.search(hookpoint)
    return int(match.group(1)) if match else None


def load(dpath: Path, device: str = "cpu") -> SAE:
    """A sparsify hookpoint folder as a vlmsae ``topk`` SAE (eval mode, ``trained_on`` set)."""
    dpath = Path(dpath)
    if not detect(dpath):
        raise FileNotFoundError(f"{str(dpath)!r} is not a sparsify folder: expected {EXPECTS}.")
    cfg_fpath, weights_fpath = dpath / CFG_FNAME, dpath / WEIGHTS_FNAME
    cfg = read_json_object(cfg_fpath, "expected a sparsify cfg.json.")
    activation = cfg.get("activation", "topk")
    refusals = (
        (activation != "topk", f"activation={activation!r} (a per-group argmax, not a top-k)"),
        (bool(cfg.get("skip_connection")), "skip_connection=true (x^ adds x W_skip^T)"),
        (bool(cfg.get("transcode")), "transcode=true (a transcoder predicts another layer's output)"),
        (bool(cfg.get("signed")), "signed=true (top-k of |pre| with signed values, no ReLU)"),
    )
    for refused, why in refusals:
        if refused:
            raise ValueError(
                f"{str(cfg_fpath)!r}: {why} is not representable by a vlmsae SAE; only sparsify TopK SAEs "
                "(activation topk, no skip connection, not a transcoder, unsigned) load."
            )
    where = repr(str(cfg_fpath))
    d_in, k = positive_int(cfg, "d_in", where), positive_int(cfg, "k", where)
    num_latents = cfg.get("num_latents", 0) or d_in * positive_int(cfg, "expansion_factor", where)
    tensors = read_safetensors(weights_fpath)
    names = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
    require_keys(tensors, names, repr(str(weights_fpath)), " (a sparsify SAE saved with its decoder)")
    if k > num_latents:
        raise ValueError(f"{str(cfg_fpath)!r}: k={k} is larger than the {num_latents} latents.")
    run_cfg = json_object_or_none(dpath.parent / "config.json") or {}  # sparsify's run-level TrainConfig
    model, pretrained = model_from_name(run_cfg.get("model"))
    trained_on = {
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
    where = f"{str(weights_fpath)!r} (cfg.json: d_in={d_in}, num_latents={num_latents})"
    check_shape("encoder.weight", tensors["encoder.weight"], (num_latents, d_in), where)
    weights = [tensors[name] for name in names]
    return sae_from_weights("topk", *weights, k=k, trained_on=trained_on, device=device, where=where)
