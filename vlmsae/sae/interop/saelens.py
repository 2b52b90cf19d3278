"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``): load into a vlmsae SAE, and export to one.

Layout of SAELens v6 ``save_model``/``load_from_disk`` (v5 configs read as v6's ``handle_pre_6_0_config`` does):
``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec`` [d_sae, d_in], ``b_dec``, plus ``threshold`` (jumprelu),
``b_gate``/``r_mag``/``b_mag`` instead of ``b_enc`` (gated), ``topk_threshold`` (batchtopk /
matryoshka_batchtopk training checkpoints). SAELens encodes h = (norm_in(x) - b_dec * apply_b_dec_to_input) W_enc
+ b_enc, then:

- ``standard``: relu(h) -> ``relu``; ``topk``: relu of the top-k of h -> ``topk``; with
  ``rescale_acts_by_decoder_norm`` h is scaled by the W_dec row norms n and decode divides by n (folded exactly:
  W_enc*n, b_enc*n, W_dec/n);
- ``jumprelu``: relu(h) * (h > threshold) -> ``jumprelu``. SAELens saves BatchTopK and Matryoshka SAEs so (threshold
  = ones * the batch threshold); their training checkpoints are converted the same way from ``topk_threshold``,
  after folding the decoder norms as ``save_inference_model`` does;
- ``gated``: 1[x~ W_enc + b_gate > 0] * relu(x~ (W_enc e^r_mag) + b_mag) is exactly a JumpReLU with threshold
  b_mag - e^r_mag * b_gate (W_enc scaled by e^r_mag, b_enc = b_mag);
- v5's ``finetuning_scaling_factor`` (decode (f * s) W_dec; weight ``finetuning_scaling_factor`` or, older,
  ``scaling_factor``) is folded into the W_dec rows; a factor whose cfg.json flag is not true is refused, as
  SAELens refuses it. ``apply_b_dec_to_input: false`` becomes b_enc + W_enc b_dec.

``normalize_activations``: ``expected_average_only_in`` (SAELens trains on x * sf, sf = sqrt(d_in) / E||x||, and
folds sf at the end of training) needs sf, from ``activation_scaler.json`` ({"scaling_factor": sf}) or
``load(..., norm_scaling_factor=sf)`` (``pretrained_saes.yaml`` for Hub SAEs), folded as SAELens folds it (W_enc*sf,
W_dec/sf, b_dec/sf), before the decoder norms as SAELens' end of training does (codes = training codes / sf, the
``topk_threshold`` divided by sf too); without it the load is refused. ``constant_norm_rescale``, ``layer_norm``
(per-input, not affine) and ``reshape_activations="hook_z"`` are refused.

Layer: ``blocks.{L}.hook_resid_post`` = vlmsae layer L, ``blocks.{L}.hook_resid_pre`` = L-1 (None for L = 0),
other hooks None (v5's ``hook_layer`` when there is no hook name). ``metadata.model_name`` is mapped to a vlmsae
model when known; ``tokens`` is None unless vlmsae wrote the folder (``metadata.vlmsae_trained_on``; ``vlmsae_source``
in older exports).

Export (``save``), input scale folded: relu -> standard, topk -> topk (no rescale), jumprelu -> jumprelu,
batchtopk / matryoshka -> jumprelu with threshold = ones * theta (topk while theta is not estimated). cfg.json
carries every field SAELens' ``SAEConfig`` reads, with metadata.sae_lens_version >= 6.0.0 (the v6 path).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from vlmsae import __version__
from vlmsae.formats import read_json_object
from vlmsae.sae.base import SAE
from vlmsae.sae.checkpoint import check_shape, read_safetensors, require_keys
from vlmsae.sae.interop._convert import export_weights, finite_positive, positive_int, sae_from_weights
from vlmsae.sae.interop.names import model_from_name
from vlmsae.utils.io import atomic_write, atomic_write_json

NAME = "saelens"
EXPECTS = "cfg.json (SAELens SAEConfig: d_in, d_sae, architecture, ...) + sae_weights.safetensors (W_enc, W_dec, ...)"
CFG_FNAME = "cfg.json"
WEIGHTS_FNAME = "sae_weights.safetensors"
SCALER_FNAME = "activation_scaler.json"
EXPORT_SAE_LENS_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens reads configs older than 6.0.0-rc.0 through its v5 path."""

_RESID_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


def detect(dpath: Path) -> bool:
    return (Path(dpath) / CFG_FNAME).is_file() and (Path(dpath) / WEIGHTS_FNAME).is_file()


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """vlmsae layer (output of block L) of a TransformerLens hook name; None when it is not a block output."""
    match = _RESID_RE.match(hook_name or "")
    layer = int(match.group(1)) - (match.group(2) == "pre") if match else -1  # resid_pre of L = output of L-1
    return layer if layer >= 0 else None


def _is_v6(cfg: dict[str, Any]) -> bool:
    from packaging.version import InvalidVersion, Version

    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        return bool(version) and Version(str(version)) >= Version("6.0.0-rc.0")
    except InvalidVersion:
        return False


def normalise_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields vlmsae needs, from a v6 or a pre-6 cfg.json (the renames and defaults of SAELens' v5 path)."""
    if _is_v6(cfg):
        out = {**cfg, "metadata": dict(cfg.get("metadata") or {})}
        out.setdefault("normalize_activations", "none")
        out.setdefault("reshape_activations", "none")
        return {"apply_b_dec_to_input": True, **out}
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
    old = {renames.get(key, key): value for key, value in cfg.items()}
    out = {"apply_b_dec_to_input": True, **old, "architecture": old.get("architecture") or "standard"}
    activation = old.get("activation_fn", old.get("activation_fn_str", "relu"))
    out["activation_fn"] = activation
    k = (old.get("activation_fn_kwargs") or {}).get("k")
    if activation == "topk" and k is not None:
        out["architecture"], out["k"] = "topk", k
    norm = old.get("normalize_activations")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    out["normalize_activations"] = norm or "none"
    hook_name = old.get("hook_name") or ""
    out.setdefault("reshape_activations", "hook_z" if "hook_z" in hook_name else "none")
    metadata_keys = ("model_name", "hook_name", "hook_head_index", "hook_layer", "sae_lens_training_version")
    out["metadata"] = {key: old[key] for key in metadata_keys if key in old}
    out["metadata"].update(old.get("metadata") or {})
    return out


def _scaling_factor(dpath: Path, norm_scaling_factor: float | None) -> float | None:
    if norm_scaling_factor is not None:
        return finite_positive(norm_scaling_factor, "norm_scaling_factor", "saelens load")
    fpath = dpath / SCALER_FNAME
    if not fpath.is_file():
        raise ValueError(
            f"{str(dpath / CFG_FNAME)!r} says normalize_activations='expected_average_only_in' (the SAE expects "
            "inputs scaled by sf = sqrt(d_in) / E||x||, not yet folded into its weights), but the folder has no "
            f'{SCALER_FNAME} with that factor. Write {SCALER_FNAME} = {{"scaling_factor": <sf>}} next to cfg.json '
            "(for a SAELens Hub release sf is norm_scaling_factor in SAELens' pretrained_saes.yaml), or call "
            "vlmsae.sae.interop.saelens.load(path, norm_scaling_factor=<sf>)."
        )
    value = read_json_object(fpath, 'expected {"scaling_factor": <number or null>}.').get("scaling_factor")
    if value is None:
        return None  # SAELens' ActivationScaler with no factor: inputs were not scaled
    return finite_positive(value, "scaling_factor (or null)", repr(str(fpath)))


def _finetuning_scaling_factor(
    tensors: dict[str, torch.Tensor], cfg: dict[str, Any], fpath: Path, d_sae: int
) -> torch.Tensor | None:
    """SAELens 5's per-latent decoder factor s [d_sae] (decode (f * s) W_dec + b_dec), or None.

    SAELens 5 saves it as ``finetuning_scaling_factor`` (its parameter's name); older files call it
    ``scaling_factor``, which SAELens 5 drops when all ones and renames when cfg.json says
    ``finetuning_scaling_factor: true`` (a factor with the flag false is refused, as SAELens refuses it).
    """
    found = [key for key in ("finetuning_scaling_factor", "scaling_factor") if key in tensors]
    if not found:
        return None
    if len(found) == 2:
        raise ValueError(
            f"{str(fpath)!r} holds both finetuning_scaling_factor and scaling_factor: SAELens 5 reads one decoder "
            "factor; keep the one that was trained and delete the other."
        )
    key = found[0]
    factor = tensors[key]
    if key == "scaling_factor" and torch.allclose(factor, torch.ones_like(factor)):
        return None  # SAELens 5 wrote a constant 1 for a while; it drops it
    flag = cfg.get("finetuning_scaling_factor")
    if flag is not True:
        raise ValueError(
            f"{str(fpath)!r} holds a decoder factor {key} [d_sae] but cfg.json has finetuning_scaling_factor="
            f"{json.dumps(flag)}, so it is unclear whether it applies (SAELens refuses this file too). If the SAE "
            'was fine-tuned with it, set "finetuning_scaling_factor": true in cfg.json (vlmsae then decodes '
            "(f * s) W_dec + b_dec, as SAELens 5 does); otherwise delete the tensor."
        )
    check_shape(key, factor, (d_sae,), repr(str(fpath)))
    return factor.reshape(-1)


def load(dpath: Path, device: str = "cpu", norm_scaling_factor: float | None = None) -> SAE:
    """A SAELens folder as a vlmsae SAE (eval mode, ``trained_on`` set); see the module docstring for the mapping."""
    dpath = Path(dpath)
    if not detect(dpath):
        raise FileNotFoundError(f"{str(dpath)!r} is not a SAELens folder: expected {EXPECTS}.")
    cfg_fpath, weights_fpath = dpath / CFG_FNAME, dpath / WEIGHTS_FNAME
    cfg = normalise_cfg(read_json_object(cfg_fpath, "expected a SAELens cfg.json."))
    arch = cfg.get("architecture")
    d_in, d_sae = positive_int(cfg, "d_in", repr(str(cfg_fpath))), positive_int(cfg, "d_sae", repr(str(cfg_fpath)))
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(
            f"{str(cfg_fpath)!r}: reshape_activations={cfg['reshape_activations']!r} (attention-head hook_z SAEs) "
            "is not supported: vlmsae SAEs read residual-stream activations [..., d_in]."
        )
    if cfg.get("activation_fn") not in (None, "relu", "topk"):
        raise ValueError(
            f"{str(cfg_fpath)!r}: activation_fn={cfg['activation_fn']!r} is not supported (relu or topk only)."
        )
    norm = cfg.get("normalize_activations", "none")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(
            f"{str(cfg_fpath)!r}: normalize_activations={norm!r} normalises every input by its own "
            f"{'norm' if norm == 'constant_norm_rescale' else 'mean and std'} and undoes it on the output; that is "
            "not an affine map vlmsae can fold into the weights, so this SAE cannot be loaded exactly. Use a SAELens "
            "SAE trained with normalize_activations 'none' or 'expected_average_only_in'."
        )
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(
            f"{str(cfg_fpath)!r}: normalize_activations={norm!r} is not one SAELens knows (none, "
            "expected_average_only_in, constant_norm_rescale, layer_norm)."
        )
    sf = _scaling_factor(dpath, norm_scaling_factor) if norm == "expected_average_only_in" else None

    tensors = {name: tensor.float() for name, tensor in read_safetensors(weights_fpath).items()}
    where = f"{str(weights_fpath)!r} (cfg.json: d_in={d_in}, d_sae={d_sae})"

    def need(*names: str) -> None:
        require_keys(tensors, names, where, f" for a SAELens {arch!r} SAE")

    need("W_enc", "W_dec", "b_dec")
    W_enc_DF, W_dec_FD, b_dec_D = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    check_shape("W_enc", W_enc_DF, (d_in, d_sae), where)
    check_shape("W_dec", W_dec_FD, (d_sae, d_in), where)
    check_shape("b_dec", b_dec_D, (d_in,), where)
    if arch not in ("standard", "topk", "jumprelu", "gated", "batchtopk", "matryoshka_batchtopk"):
        raise ValueError(
            f"{str(cfg_fpath)!r}: architecture={arch!r} is not supported; vlmsae loads SAELens standard, topk, "
            "jumprelu, gated (and batchtopk / matryoshka_batchtopk, which SAELens saves as jumprelu)."
        )
    vlmsae_arch = {"standard": "relu", "topk": "topk"}.get(arch, "jumprelu")
    threshold_F = k = None  # k: topk only (SAEConfig's default otherwise)
    if arch == "gated":
        need("b_gate", "r_mag", "b_mag")
        scale_F = tensors["r_mag"].exp()
        W_enc_DF = W_enc_DF * scale_F
        b_enc_F = tensors["b_mag"]
        threshold_F = tensors["b_mag"] - scale_F * tensors["b_gate"]
    else:
        need("b_enc")
        b_enc_F = tensors["b_enc"]
    if arch == "jumprelu":
        need("threshold")
        threshold_F = tensors["threshold"]
    elif arch == "topk":
        k = cfg.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
            raise ValueError(f"{str(cfg_fpath)!r}: a topk SAE needs an integer k in [1, d_sae={d_sae}]; got {k!r}.")
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        need("topk_threshold")
        threshold_F = torch.full((d_sae,), float(tensors["topk_threshold"].reshape(-1)[0]))
    for name, tensor in (("b_enc", b_enc_F), ("threshold", threshold_F)):
        if tensor is not None:
            check_shape(name, tensor, (d_sae,), where)
    finetuning_F = _finetuning_scaling_factor(tensors, cfg, weights_fpath, d_sae)
    if finetuning_F is not None:  # SAELens 5 decodes (f * s) W_dec: s scales the decoder rows
        W_dec_FD = W_dec_FD * finetuning_F[:, None]
    # Training-time TopK/BatchTopK rescale pre-activations by the decoder row norms (SAELens' _fold_norm_topk).
    rescale_default = arch in ("batchtopk", "matryoshka_batchtopk")  # the training config's default
    rescale = (arch == "topk" or rescale_default) and bool(cfg.get("rescale_acts_by_decoder_norm", rescale_default))
    if sf is not None:  # SAELens' fold_activation_norm_scaling_factor, before the decoder norms (as SAELens does)
        W_enc_DF, W_dec_FD, b_dec_D = W_enc_DF * sf, W_dec_FD / sf, b_dec_D / sf
        if rescale and threshold_F is not None:
            # The rescaled pre-activation h * ||W_dec|| is now h * ||W_dec|| / sf: the training threshold too.
            threshold_F = threshold_F / sf
    if rescale:
        norms_F = W_dec_FD.norm(dim=-1)
        W_enc_DF, b_enc_F, W_dec_FD = W_enc_DF * norms_F, b_enc_F * norms_F, W_dec_FD / norms_F[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes x W_enc + b_enc; vlmsae (x - b_dec) W_enc + b_enc'. Pre-activations (and so the
        # threshold comparison) are unchanged.
        b_enc_F = b_enc_F + b_dec_D.double() @ W_enc_DF.double()

    trained_on = _trained_on(cfg, dpath, norm, sf, rescale)
    return sae_from_weights(
        vlmsae_arch,
        W_enc_DF.T,
        b_enc_F,
        W_dec_FD,
        b_dec_D,
        k=k,
        threshold=threshold_F,
        trained_on=trained_on,
        device=device,
    )


def _trained_on(cfg: dict[str, Any], dpath: Path, norm: str, sf: float | None, rescale: bool) -> dict[str, Any]:
    metadata = cfg.get("metadata") or {}
    original = metadata.get("vlmsae_trained_on", metadata.get("vlmsae_source"))  # "vlmsae_source" before the rename
    if isinstance(original, dict):  # written by vlmsae: the exact record
        trained_on = dict(original)
    else:
        model, pretrained = model_from_name(metadata.get("model_name"))
        hook_name = metadata.get("hook_name")
        layer = layer_from_hook_name(hook_name)
        if layer is None and isinstance(metadata.get("hook_layer"), int) and not hook_name:
            layer = metadata["hook_layer"]
        trained_on = {"model": model, "pretrained": pretrained, "layer": layer, "tokens": None}
    normalisation = "none"
    if norm == "expected_average_only_in":
        normalisation = f"expected_average_only_in, sf={sf} folded" if sf is not None else "none (scaler unset)"
        if sf is not None and rescale:
            normalisation += " before the decoder norms (codes = training codes / sf)"
    trained_on.update(
        input_normalisation=normalisation,
        format=NAME,
        original_path=str(dpath),
        hook_name=metadata.get("hook_name"),
        model_name=metadata.get("model_name"),
    )
    return trained_on


def _hook_name(trained_on: dict[str, Any]) -> str | None:
    layer = trained_on.get("layer")
    if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0:
        return f"blocks.{layer}.hook_resid_post"
    return trained_on.get("hook_name") if isinstance(trained_on.get("hook_name"), str) else None


def save(sae: SAE, out_dpath: Path) -> Path:
    """Write ``out_dpath/cfg.json`` + ``sae_weights.safetensors`` that SAELens' ``SAE.load_from_disk`` loads."""
    from safetensors.torch import save_file

    if not isinstance(sae, SAE):
        raise TypeError(f"saelens.save needs a vlmsae SAE module; got {type(sae).__name__}.")
    out_dpath = Path(out_dpath)
    out_dpath.mkdir(parents=True, exist_ok=True)
    weights, written = export_weights(sae)
    tensors = {name: weights[name].contiguous() for name in ("b_enc", "W_dec", "b_dec")}
    tensors["W_enc"] = weights["W_enc"].T.contiguous()
    extra: dict[str, Any] = {}
    arch = sae.arch
    if written == "relu":
        architecture = "standard"
    elif written == "topk":
        architecture = "topk"
        extra = {"k": int(sae.cfg.k), "rescale_acts_by_decoder_norm": False}
    elif written in ("jumprelu", "batchtopk", "matryoshka"):  # BatchTopK: threshold = ones * theta
        architecture = "jumprelu"
        tensors["threshold"] = weights["threshold"].expand(sae.n_latents).contiguous()
    else:
        raise ValueError(f"saelens.save: no SAELens architecture for a vlmsae {arch!r} SAE.")
    trained_on = dict(sae.trained_on)
    cfg = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "sae_lens_version": EXPORT_SAE_LENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": trained_on.get("model_name") or trained_on.get("model"),
            "hook_name": _hook_name(trained_on),
            "hook_head_index": None,
            "model_from_pretrained_kwargs": {},
            "exported_by": f"vlmsae {__version__}",
            "vlmsae_arch": arch,
            "vlmsae_trained_on": trained_on,
        },
    }
    atomic_write(out_dpath / WEIGHTS_FNAME, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(out_dpath / CFG_FNAME, cfg)
    return out_dpath
