"""saev checkpoints (OSU-NLP-Group/saev, samuelstevens/saev) as vlmsae SAEs.

File (``sae.pt`` on the Hub): a UTF-8 JSON header line, then ``torch.save(state_dict)`` with ``W_enc`` [d, F],
``b_enc``, ``W_dec`` [F, d], ``b_dec`` and, for BatchTopK, the scalar ``activation.threshold``; read with
``weights_only=True`` (:func:`vlmsae.sae.interop.torchfile.read_torch_file`).

Header schemas: none (flat, ReLU), 1 (``cls`` and ``cfg.top_k``, or ``cfg.activation``), 2-5
(``cfg.activation = {cls, params}``). ``Relu``; ``TopK`` keeps the per-row top-k with no ReLU
(:class:`SignedTopKSAE`); ``BatchTopK`` at inference h * (h > theta), loaded with threshold max(theta, 0). BatchTopK
files without a threshold (before 2025-11-16) select over the whole batch and are refused.

Encoder bias: saev subtracted ``b_dec`` before encoding until 2025-07-31 (e7ca004), again the same day after a
merge, and not since 2025-09-05 (654befb). No schema and schema 1 subtract; schema 2 by the commit lists below
(unknown commits refused unless ``subtract_b_dec=`` says); schemas 3-5 do not. Without the subtraction,
b_enc' = b_enc + b_dec @ W_enc.

Input normalisation is not in the file: the SAE takes activations as stored, unless ``input_mean`` / ``input_scale``
(trained on (x - mean) / scale) are passed to :func:`load` and folded exactly. Layer i = the output of
``resblocks[i]`` = vlmsae's block index (negatives included); the file records no layer, model or tokens: pass
``layer=``, ``model=``, ``tokens=`` (or the job options).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.checkpoint import check_shape, require_keys
from vlmsae.sae.interop._convert import finite_positive, matching_files, sae_from_weights, single_checkpoint
from vlmsae.sae.interop.torchfile import read_torch_file
from vlmsae.sae.topk import TopKSAE

NAME = "saev"
EXPECTS = (
    "a saev file (e.g. sae.pt): a JSON header line, then a torch state dict with W_enc [d, F], b_enc, W_dec [F, d], "
    "b_dec (+ activation.threshold for BatchTopK)"
)


def _shas(text: str) -> frozenset[str]:
    return frozenset(text.split())


# saev commits (git short SHA, 7 hex) whose schema-2 files subtract b_dec before encoding (2025-07-31..09-05),
# and the schema-2 commits that do not (2025-09-05..10-02); read from the saev repository history.
_SCHEMA2_SUBTRACT = _shas(
    "dd7827d a4c2c60 b713a4c 99755f1 8c389b4 b633fc7 6245263 dc2b4e0 8603345 3bda80a 3fac6b6 5513f7d "
    "81e73b9 fa5aef9 23fd0a2 fd0542a e71e43b b67891f 5a30313 52aedab 1462014 2fb5cc2 9b1dad5 254daa0 "
    "caf75c1 01e141a bdbb2ef 5b9a724 37604e1 00d07b7 2fe190b 89cb76f afb8679 4ddfb89 9ecf55b 8d38c23"
)
_SCHEMA2_NO_SUBTRACT = _shas(
    "e43e7dd 7c24d25 d4cc39a 64e2b75 53f2fdc 29d3347 60d64d9 d3d769e ac676da ef4c09c 25533b9 28fcd35 "
    "afb522b 9ef01be de5078a f8acc32 03c96ca 6e2a640 eabb166 7eb06eb 64f9bf3 70cd3b4 dd85df9 f988ee1 "
    "46d6966 9179aa0 88c4e38 859abc7 8ff9c42 c59ad4c c423ac6 4f0167b 1d8cbda 654befb"
)
# Schema-1 commits of 2025-07-31 (a few hours) saved after the subtraction was first removed.
_SCHEMA1_NO_SUBTRACT = _shas("5056de4 795479b fad9929 ab690dc e7ca004")
_ACTIVATIONS = ("Relu", "TopK", "BatchTopK")


class SignedTopKSAE(TopKSAE):
    """saev's TopK: keep the per-row top-k pre-activations with their sign (no ReLU). Inference only."""

    interop_only = "saev TopK keeps negative values (no ReLU); vlmsae's topk would add one"

    def _activate(self, z_BF: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        top = z_BF.topk(min(self.cfg.k, z_BF.shape[-1]), dim=-1, sorted=False)
        return torch.zeros_like(z_BF).scatter_(-1, top.indices, top.values)


def _starts_with_json(fpath: Path) -> bool:
    try:
        with open(fpath, "rb") as fd:
            return fd.read(1) == b"{"  # a torch zip starts with "PK", a legacy pickle with 0x80
    except OSError:
        return False


def detect(dpath: Path) -> bool:
    """True for a saev file, or a folder holding one (``*.pt`` whose first byte opens a JSON header)."""
    return bool(matching_files(Path(dpath), _starts_with_json, "*.pt"))


def read_file(fpath: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, state dict) of a saev file; the payload goes through the safe reader."""
    data = Path(fpath).read_bytes()
    first, sep, rest = data.partition(b"\n")
    try:
        header = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(fpath)!r}: the first line is not a JSON header ({err}); not a saev file.") from err
    if not sep or not isinstance(header, dict):
        raise ValueError(f"{str(fpath)!r}: expected a JSON object on line 1 followed by a torch payload (saev).")
    state = read_torch_file(io.BytesIO(rest), name=f"{fpath} (after its header line)")
    if not isinstance(state, dict):
        raise ValueError(f"{str(fpath)!r}: the torch payload is a {type(state).__name__}, not a state dict.")
    return header, state


def _activation(header: dict[str, Any], where: str) -> tuple[str, int | None]:
    """(activation class name, top_k) from any header schema."""
    if "schema" not in header:
        return "Relu", None
    cfg = header.get("cfg")
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: header schema {header['schema']} without a 'cfg' object.")
    if header["schema"] == 1 and header.get("cls", "SparseAutoencoderConfig") in _ACTIVATIONS:
        name, params = header["cls"], {"top_k": cfg.get("top_k", 32)}  # form A
    else:
        act = cfg.get("activation")
        if not (isinstance(act, dict) and "cls" in act):
            raise ValueError(
                f"{where}: header cfg.activation is {act!r}; expected {{'cls': 'Relu'|'TopK'|'BatchTopK', 'params': "
                "{...}} (saev schema >= 1)."
            )
        name, params = act["cls"], act.get("params") or {}
    if name not in _ACTIVATIONS:
        raise ValueError(f"{where}: saev activation {name!r} is not supported; expected one of {_ACTIVATIONS}.")
    return name, (int(params.get("top_k", 32)) if name != "Relu" else None)


def subtracts_b_dec(header: dict[str, Any], where: str = "saev header") -> bool:
    """Whether the saev version that wrote this header encoded (x - b_dec) (see the module docstring)."""
    schema = header.get("schema")
    commit = str(header.get("commit") or "")[:7]
    if schema is None:
        return True
    if schema == 1:
        return commit not in _SCHEMA1_NO_SUBTRACT
    if schema == 2:
        if commit in _SCHEMA2_SUBTRACT:
            return True
        if commit in _SCHEMA2_NO_SUBTRACT:
            return False
        raise ValueError(
            f"{where}: schema-2 saev file from commit {header.get('commit')!r}, which is not a known saev commit; "
            "saev subtracted b_dec before encoding until 2025-09-05 and not afterwards, so the forward is ambiguous. "
            "Load it with vlmsae.sae.interop.saev.load(path, subtract_b_dec=True|False) and save it with save_sae."
        )
    if schema in (3, 4, 5):
        return False
    raise ValueError(f"{where}: unknown saev header schema {schema!r}; expected none or 1-5.")


def _check_header_sizes(cfg: dict[str, Any], d_in: int, n_latents: int, where: str) -> None:
    d_model = cfg.get("d_model", cfg.get("d_vit"))
    if d_model is not None and int(d_model) != d_in:
        raise ValueError(f"{where}: header d_model={d_model} but W_enc is [{d_in}, {n_latents}].")
    d_sae = cfg.get("d_sae")
    if d_sae is None and cfg.get("exp_factor") is not None and d_model is not None:
        d_sae = int(d_model) * int(cfg["exp_factor"])
    if d_sae is not None and int(d_sae) != n_latents:
        raise ValueError(f"{where}: header implies d_sae={d_sae} but W_enc is [{d_in}, {n_latents}].")


def load(
    dpath: Path,
    device: str = "cpu",
    *,
    input_mean: torch.Tensor | None = None,
    input_scale: float | None = None,
    subtract_b_dec: bool | None = None,
    layer: int | str | None = None,
    model: str | None = None,
    tokens: str | None = None,
) -> SAE:
    """A saev file (or a folder with one) as an eval-mode vlmsae SAE taking raw activations.

    ``input_mean`` [d] / ``input_scale`` (scalar s): the SAE was trained on (x - mean) / s; folded exactly.
    ``subtract_b_dec``: override the forward chosen from the header (only needed for unknown schema-2 commits).
    ``layer``/``model``/``tokens``: recorded in ``sae.trained_on`` (saev files do not store them).
    """
    dpath = Path(dpath)
    fpath = single_checkpoint(dpath, matching_files(dpath, _starts_with_json, "*.pt"), "saev", EXPECTS)
    where = repr(str(fpath))
    header, state = read_file(fpath)
    act, top_k = _activation(header, where)
    require_keys(state, ("W_enc", "b_enc", "W_dec", "b_dec"), f"{where}: the state dict")
    W_enc_DF = state["W_enc"].double()
    d_in, n_latents = W_enc_DF.shape
    check_shape("b_enc", state["b_enc"], (n_latents,), where)
    check_shape("W_dec", state["W_dec"], (n_latents, d_in), where)
    check_shape("b_dec", state["b_dec"], (d_in,), where)
    _check_header_sizes(header.get("cfg", header), d_in, n_latents, where)
    b_enc_F, W_dec_FD, b_dec_D = state["b_enc"].double(), state["W_dec"].double(), state["b_dec"].double()

    subtract = subtracts_b_dec(header, where) if subtract_b_dec is None else bool(subtract_b_dec)
    if not subtract:  # h = x W + b_e = (x - b_dec) W + (b_e + b_dec W)
        b_enc_F = b_enc_F + b_dec_D @ W_enc_DF

    # Input normalisation x~ = (x - m) / s, folded: codes unchanged, x_hat = s * x~_hat + m.
    scale = 1.0 if input_scale is None else finite_positive(input_scale, "input_scale (the divisor)", "saev load")
    mean_D = torch.zeros(d_in, dtype=torch.float64)
    if input_mean is not None:
        mean_D = torch.as_tensor(input_mean, dtype=torch.float64).reshape(-1)
        if mean_D.shape != (d_in,):
            raise ValueError(f"saev load: input_mean has {mean_D.numel()} values; the SAE reads d={d_in}.")
    W_enc_FD = W_enc_DF.T / scale
    W_dec_FD = W_dec_FD * scale
    b_dec_D = b_dec_D * scale + mean_D

    threshold = None
    if act == "BatchTopK":
        if "activation.threshold" not in state:
            raise ValueError(
                f"{where}: a saev BatchTopK file without activation.threshold (saev before 2025-11-16) keeps the top "
                "k*B values of the whole batch, which no per-sample encoder reproduces; vlmsae cannot load it exactly."
            )
        threshold = max(float(state["activation.threshold"]), 0.0)  # theta <= 0 means h * (h > 0) in saev

    normalisation = "none (raw activations)"
    if input_mean is not None or input_scale is not None:
        normalisation = f"(x - input_mean) / {scale:g}, folded into the weights"
    trained_on = {
        "model": model,
        "pretrained": None,
        "layer": layer,
        "tokens": tokens,
        "input_normalisation": normalisation,
        "format": NAME,
        "original_path": str(fpath),
        "library": {
            "schema": header.get("schema"),
            "commit": header.get("commit"),
            "lib": header.get("lib"),
            "activation": act,
            "b_dec_subtracted": subtract,
        },
    }
    arch = {"Relu": "relu", "TopK": "topk", "BatchTopK": "batchtopk"}[act]
    return sae_from_weights(
        arch,
        W_enc_FD,
        b_enc_F,
        W_dec_FD,
        b_dec_D,
        k=min(top_k, n_latents) if top_k is not None else None,
        threshold=threshold,
        cls=SignedTopKSAE if act == "TopK" else None,
        trained_on=trained_on,
        device=device,
    )
