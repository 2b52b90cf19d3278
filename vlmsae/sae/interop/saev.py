"""saev checkpoints (OSU-NLP-Group/saev, samuelstevens/saev) as vlmsae SAEs.

File: one binary (``sae.pt`` on the Hub): line 1 is a UTF-8 JSON header ending in ``\\n``, the rest is
``torch.save(state_dict)`` with ``W_enc`` [d, F], ``b_enc`` [F], ``W_dec`` [F, d], ``b_dec`` [d] and, for
BatchTopK, the scalar ``activation.threshold``. The header is parsed as JSON and the payload is read with
``weights_only=True`` (:func:`vlmsae.sae.interop.torchfile.read_state_dict`); nothing is unpickled.

Header schemas: none (flat ``{d_vit, exp_factor, ...}``, ReLU), 1 (form A: ``cls`` names the activation and
``cfg.top_k`` its k; form B: ``cfg.activation = {cls, params}``), 2-5 (``cfg.activation = {cls, params}``, with
``params.top_k``). Activations: ``Relu`` f = relu(h); ``TopK`` f = h on the per-row top-k, *no ReLU* (negative
values survive; loaded as :class:`SignedTopKSAE`); ``BatchTopK`` at inference f = h * (h > theta), theta =
``activation.threshold`` (theta <= 0 means h * (h > 0)), loaded as a vlmsae BatchTopK SAE with threshold
max(theta, 0). BatchTopK files without a threshold (saev before 2025-11-16) select over the whole batch, which
no per-sample encoder reproduces: they are refused.

Encoder bias. saev's forward changed twice: saev subtracted ``b_dec`` before encoding until 2025-07-31
(commit e7ca004), a merge brought the subtraction back the same day, and it was removed for good on
2025-09-05 (654befb). So: no schema and schema 1 subtract; schema 2 subtracts when its ``commit`` is one of
the saev commits of 2025-07-31..2025-09-05 listed below, not when it is a later schema-2 commit, and any
other schema-2 commit is ambiguous (refused unless ``subtract_b_dec=`` says which); schemas 3-5 do not
subtract. A file that does not subtract is converted exactly with b_enc' = b_enc + b_dec @ W_enc.

Input normalisation is NOT in the file: saev's old trainer fed x~ = (x - act_mean) / scalar, the Hub CLIP
and BioCLIP SAEs take raw activations, and the Hub DINOv2 example normalises outside the SAE. By default the
loaded SAE takes the activations raw, as stored. If the SAE was trained on (x - mean) / scale, pass
``input_mean`` ([d]) and/or ``input_scale`` (the scalar divisor) to :func:`load`: they are folded exactly
(W_enc / scale, W_dec * scale, b_dec * scale + mean), so the module takes raw x and returns raw x_hat with the
same codes as saev. (The DINOv2 notebook's clamp is not representable: clamp the activations yourself.)

Layers: saev records layer i as the OUTPUT of ``resblocks[i]`` (a forward hook; negative i counts from the
end, default -2), which is vlmsae's block index i (= HF ``hidden_states[i + 1]``), negatives included. The
file does not record the layer, model or tokens (the Hub SAEs: layer 10 of ViT-B, patch tokens, CLS dropped):
pass ``layer=``, ``model=``, ``tokens=`` to :func:`load`, or the job options, otherwise they stay None.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.interop._convert import check_shape, sae_from_weights, single_checkpoint
from vlmsae.sae.interop.torchfile import read_torch_file
from vlmsae.sae.topk import TopKSAE

NAME = "saev"
EXPECTS = (
    "a saev file (e.g. sae.pt): a JSON header line, then a torch state dict with W_enc [d, F], b_enc, W_dec [F, d], "
    "b_dec (+ activation.threshold for BatchTopK)"
)
DEFAULT_FNAME = "sae.pt"


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


def _find_file(dpath: Path) -> list[Path]:
    if dpath.is_file():
        return [dpath] if _starts_with_json(dpath) else []
    if not dpath.is_dir():
        return []
    return [fpath for fpath in sorted(dpath.glob("*.pt")) if _starts_with_json(fpath)]


def detect(dpath: Path) -> bool:
    """True for a saev file, or a folder holding one (``*.pt`` whose first byte opens a JSON header)."""
    return bool(_find_file(Path(dpath)))


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
    fpath = single_checkpoint(dpath, _find_file(dpath), "saev", EXPECTS)
    where = repr(str(fpath))
    header, state = read_file(fpath)
    act, top_k = _activation(header, where)
    missing = [key for key in ("W_enc", "b_enc", "W_dec", "b_dec") if key not in state]
    if missing:
        raise ValueError(f"{where}: state dict lacks {missing}; expected {EXPECTS}.")
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
    scale = 1.0 if input_scale is None else float(input_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"saev load: input_scale must be a finite number > 0 (the divisor); got {input_scale!r}.")
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
