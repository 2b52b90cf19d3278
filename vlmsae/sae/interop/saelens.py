"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``): load into a vlmsae SAE, and export to one.

Layout (SAELens v6 ``SAE.save_model`` / ``load_from_disk``; v5 configs are read the way v6's
``handle_pre_6_0_config`` reads them). Weights: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in],
``b_dec`` [d_in], plus ``threshold`` [d_sae] (jumprelu), ``b_gate``/``r_mag``/``b_mag`` instead of ``b_enc``
(gated), ``topk_threshold`` (training checkpoints of batchtopk / matryoshka_batchtopk). SAELens encodes
``x~ = norm_in(x) - b_dec * apply_b_dec_to_input`` and ``h = x~ W_enc + b_enc``; then

- ``standard``: f = relu(h)                               -> vlmsae ``relu``
- ``topk``: top-k of h, then relu on the kept values; with ``rescale_acts_by_decoder_norm`` h is first multiplied
  by the W_dec row norms n and decode divides f by n (folded here: W_enc*n, b_enc*n, W_dec/n; exact) -> ``topk``
- ``jumprelu``: f = relu(h) * (h > threshold)              -> ``jumprelu``
  (SAELens saves its BatchTopK and Matryoshka BatchTopK SAEs as jumprelu with threshold = ones * the batch
  threshold; their training checkpoints, architecture ``batchtopk`` / ``matryoshka_batchtopk``, are converted the
  same way from ``topk_threshold``, after folding the decoder norms as SAELens' ``save_inference_model`` does)
- ``gated``: f = 1[x~ W_enc + b_gate > 0] * relu(x~ (W_enc e^r_mag) + b_mag). With m = the magnitude
  pre-activation, the gate is m > b_mag - e^r_mag * b_gate, so it is exactly a JumpReLU with that threshold
  -> ``jumprelu`` (W_enc scaled by e^r_mag, b_enc = b_mag).
- decode: x^ = f W_dec + b_dec, then norm_out. v5's ``finetuning_scaling_factor: true`` (weight
  ``finetuning_scaling_factor`` [d_sae] as SAELens 5's ``save_model`` writes it, or ``scaling_factor`` in older
  files; v5 decodes (f * s) W_dec + b_dec, codes unchanged) is folded into the W_dec rows. Both SAELens versions
  refuse the first kind of file (their loaders drop the flag, then find an unexpected weight); a factor whose
  cfg.json flag is not true is refused here too.

When ``apply_b_dec_to_input`` is false, b_enc becomes b_enc + W_enc b_dec (vlmsae always subtracts b_dec).

``normalize_activations``:
- ``none``: nothing to do.
- ``expected_average_only_in``: SAELens trains on x * sf (sf = sqrt(d_in) / E||x||) and folds sf into the weights
  at the end of training (then writes "none"). A folder that still says "expected_average_only_in" needs sf: it is
  read from ``activation_scaler.json`` ({"scaling_factor": sf}, what SAELens writes next to training checkpoints;
  null = no scaling) or passed as ``load(..., norm_scaling_factor=sf)`` (for Hub SAEs SAELens keeps it in its
  ``pretrained_saes.yaml`` as ``norm_scaling_factor``), and folded the way SAELens folds it (W_enc*sf, W_dec/sf,
  b_dec/sf). Without it the load is refused: the codes would be off by sf. With ``rescale_acts_by_decoder_norm``
  (topk, and the batchtopk / matryoshka_batchtopk training checkpoints) sf is folded first and the decoder norms
  after, the order of SAELens' end of training (the trainer folds sf, then ``save_inference_model`` folds the norms)
  and of its ``from_pretrained``: the codes are the training codes / sf, as in the SAE SAELens writes when training
  ends, and the ``topk_threshold`` is divided by sf with them, so the latents that fired in training fire (SAELens
  itself leaves that threshold in training units).
- ``constant_norm_rescale`` and ``layer_norm`` normalise each input by its own norm (mean, std) and undo it on the
  output: not an affine map, so not representable by a vlmsae SAE; refused with a message (never dropped).
``reshape_activations="hook_z"`` (attention heads) is refused too.

Layer convention: SAELens ``hook_name`` is a TransformerLens hook name. ``blocks.{L}.hook_resid_post`` = output of
block L = vlmsae layer L (= HF ``hidden_states[L+1]``); ``blocks.{L}.hook_resid_pre`` = input of block L = vlmsae
layer L-1 (None for L = 0: the embeddings are no block output). Other hooks (mlp_out, attn, hook_z, ...) give
layer None. v5 configs also carry ``hook_layer`` (the L in the hook name). ``metadata.model_name`` is mapped to a
vlmsae model name when it is one, or a known HF id of one; ``tokens`` is unknown (None) unless the folder was
written by vlmsae (``metadata.vlmsae_trained_on``; ``vlmsae_source`` in older exports). Decoder rows of a
loaded SAE need not be unit norm (inference only).

Export (``save``): vlmsae relu -> standard, topk -> topk (k, rescale_acts_by_decoder_norm false), batchtopk and
matryoshka -> jumprelu with threshold = ones * theta (the inference rule relu(z) * (z > theta), theta >= 0; an SAE
whose threshold was never estimated encodes with per-sample top-k, so it is written as topk), jumprelu -> jumprelu.
The cfg.json carries every field SAELens' ``SAEConfig`` reads (d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, architecture, metadata with sae_lens_version >= 6.0.0 so that SAELens
takes the v6 path; k and rescale_acts_by_decoder_norm for topk). Input scale is folded first (raw activations in).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from vlmsae import __version__
from vlmsae.sae.base import SAE
from vlmsae.sae.build import build_sae
from vlmsae.sae.config import SAEConfig
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
    dpath = Path(dpath)
    return (dpath / CFG_FNAME).is_file() and (dpath / WEIGHTS_FNAME).is_file()


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """vlmsae layer (output of block L) of a TransformerLens hook name; None when it is not a block output."""
    match = _RESID_RE.match(hook_name or "")
    if match is None:
        return None
    layer = int(match.group(1))
    if match.group(2) == "pre":
        return layer - 1 if layer >= 1 else None
    return layer


def _read_cfg(dpath: Path) -> dict[str, Any]:
    fpath = dpath / CFG_FNAME
    try:
        cfg = json.loads(fpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(fpath)!r} is not valid JSON ({err}); expected a SAELens cfg.json.") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(fpath)!r} holds a JSON {type(cfg).__name__}, expected a SAELens config object.")
    return cfg


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
        out = dict(cfg)
        out["metadata"] = dict(cfg.get("metadata") or {})
        out.setdefault("apply_b_dec_to_input", True)
        out.setdefault("normalize_activations", "none")
        out.setdefault("reshape_activations", "none")
        return out
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
    old = {renames.get(key, key): value for key, value in cfg.items()}
    out = dict(old)
    out["architecture"] = old.get("architecture") or "standard"
    out.setdefault("apply_b_dec_to_input", True)
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


def _load_tensors(fpath: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(fpath), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(fpath)!r} is not a readable safetensors file ({err}).") from err
    return {name: tensor.float() for name, tensor in tensors.items()}


def _scaling_factor(dpath: Path, norm_scaling_factor: float | None) -> float | None:
    if norm_scaling_factor is not None:
        value = float(norm_scaling_factor)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"norm_scaling_factor must be a finite number > 0; got {norm_scaling_factor!r}.")
        return value
    fpath = dpath / SCALER_FNAME
    if not fpath.is_file():
        raise ValueError(
            f"{str(dpath / CFG_FNAME)!r} says normalize_activations='expected_average_only_in' (the SAE expects "
            "inputs scaled by sf = sqrt(d_in) / E||x||, not yet folded into its weights), but the folder has no "
            f'{SCALER_FNAME} with that factor. Write {SCALER_FNAME} = {{"scaling_factor": <sf>}} next to cfg.json '
            "(for a SAELens Hub release sf is norm_scaling_factor in SAELens' pretrained_saes.yaml), or call "
            "vlmsae.sae.interop.saelens.load(path, norm_scaling_factor=<sf>)."
        )
    try:
        value = json.loads(fpath.read_text(encoding="utf-8")).get("scaling_factor")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f'{str(fpath)!r} is not {{"scaling_factor": <number or null>}} ({err}).') from err
    if value is None:
        return None  # SAELens' ActivationScaler with no factor: inputs were not scaled
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{str(fpath)!r}: scaling_factor must be a finite number > 0 or null; got {value!r}.")
    return float(value)


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
    _check_shape(factor, (d_sae,), key, fpath)
    return factor.reshape(-1)


def _need(tensors: dict[str, torch.Tensor], names: tuple[str, ...], fpath: Path, arch: str) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(
            f"{str(fpath)!r} lacks {missing} for a SAELens {arch!r} SAE (it has {sorted(tensors)}); expected "
            f"{list(names)}."
        )


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...], name: str, fpath: Path) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{str(fpath)!r}: {name} has shape {tuple(tensor.shape)}, but cfg.json (d_in, d_sae) implies {shape}."
        )


def load(dpath: Path, device: str = "cpu", norm_scaling_factor: float | None = None) -> SAE:
    """A SAELens folder as a vlmsae SAE (eval mode, ``trained_on`` set); see the module docstring for the mapping."""

    dpath = Path(dpath)
    if not detect(dpath):
        raise FileNotFoundError(f"{str(dpath)!r} is not a SAELens folder: expected {EXPECTS}.")
    cfg_fpath, weights_fpath = dpath / CFG_FNAME, dpath / WEIGHTS_FNAME
    cfg = normalise_cfg(_read_cfg(dpath))
    arch = cfg.get("architecture")
    for name in ("d_in", "d_sae"):
        value = cfg.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{str(cfg_fpath)!r}: {name} must be a positive integer; got {value!r}.")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
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

    tensors = _load_tensors(weights_fpath)
    _need(tensors, ("W_enc", "W_dec", "b_dec"), weights_fpath, str(arch))
    W_enc_DF, W_dec_FD, b_dec_D = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    _check_shape(W_enc_DF, (d_in, d_sae), "W_enc", weights_fpath)
    _check_shape(W_dec_FD, (d_sae, d_in), "W_dec", weights_fpath)
    _check_shape(b_dec_D, (d_in,), "b_dec", weights_fpath)
    threshold_F = None
    k = 20  # SAEConfig needs one; unused by relu/jumprelu
    if arch == "gated":
        _need(tensors, ("b_gate", "r_mag", "b_mag"), weights_fpath, arch)
        scale_F = tensors["r_mag"].exp()
        W_enc_DF = W_enc_DF * scale_F
        b_enc_F = tensors["b_mag"]
        threshold_F = tensors["b_mag"] - scale_F * tensors["b_gate"]
        vlmsae_arch = "jumprelu"
    else:
        _need(tensors, ("b_enc",), weights_fpath, str(arch))
        b_enc_F = tensors["b_enc"]
        if arch == "standard":
            vlmsae_arch = "relu"
        elif arch == "jumprelu":
            _need(tensors, ("threshold",), weights_fpath, arch)
            threshold_F = tensors["threshold"]
            vlmsae_arch = "jumprelu"
        elif arch == "topk":
            k = cfg.get("k")
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
                raise ValueError(f"{str(cfg_fpath)!r}: a topk SAE needs an integer k in [1, d_sae={d_sae}]; got {k!r}.")
            vlmsae_arch = "topk"
        elif arch in ("batchtopk", "matryoshka_batchtopk"):
            _need(tensors, ("topk_threshold",), weights_fpath, arch)
            threshold_F = torch.full((d_sae,), float(tensors["topk_threshold"].reshape(-1)[0]))
            vlmsae_arch = "jumprelu"
        else:
            raise ValueError(
                f"{str(cfg_fpath)!r}: architecture={arch!r} is not supported; vlmsae loads SAELens standard, topk, "
                "jumprelu, gated (and batchtopk / matryoshka_batchtopk, which SAELens saves as jumprelu)."
            )
    for name, tensor in (("b_enc", b_enc_F), ("threshold", threshold_F)):
        if tensor is not None:
            _check_shape(tensor, (d_sae,), name, weights_fpath)
    finetuning_F = _finetuning_scaling_factor(tensors, cfg, weights_fpath, d_sae)
    if finetuning_F is not None:  # SAELens 5 decodes (f * s) W_dec: s scales the decoder rows
        W_dec_FD = W_dec_FD * finetuning_F[:, None]
    # Training-time TopK/BatchTopK rescale pre-activations by the decoder row norms (SAELens' _fold_norm_topk).
    rescale_default = arch in ("batchtopk", "matryoshka_batchtopk")  # the training config's default
    rescale = arch in ("topk", "batchtopk", "matryoshka_batchtopk") and bool(
        cfg.get("rescale_acts_by_decoder_norm", rescale_default)
    )
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

    sae = build_sae(SAEConfig(arch=vlmsae_arch, d_in=d_in, n_latents=d_sae, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc_DF.T)
        sae.b_enc.copy_(b_enc_F)
        sae.W_dec.copy_(W_dec_FD)
        sae.b_dec.copy_(b_dec_D)
        if threshold_F is not None:
            sae.threshold.copy_(threshold_F)
    sae.trained_on = _trained_on(cfg, dpath, norm, sf, rescale)
    return sae.to(device).eval()


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
    if norm == "expected_average_only_in":
        normalisation = f"expected_average_only_in, sf={sf} folded" if sf is not None else "none (scaler unset)"
        if sf is not None and rescale:
            normalisation += " before the decoder norms (codes = training codes / sf)"
    else:
        normalisation = "none"
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
    import copy

    from safetensors.torch import save_file

    if not isinstance(sae, SAE):
        raise TypeError(f"saelens.save needs a vlmsae SAE module; got {type(sae).__name__}.")
    out_dpath = Path(out_dpath)
    out_dpath.mkdir(parents=True, exist_ok=True)
    folded = copy.deepcopy(sae).cpu().float()
    folded.fold_input_scale_()
    tensors = {
        "W_enc": folded.W_enc.detach().T.contiguous(),
        "b_enc": folded.b_enc.detach().contiguous(),
        "W_dec": folded.W_dec.detach().contiguous(),
        "b_dec": folded.b_dec.detach().contiguous(),
    }
    extra: dict[str, Any] = {}
    arch = sae.arch
    if arch == "relu":
        architecture = "standard"
    elif arch == "jumprelu":
        architecture = "jumprelu"
        tensors["threshold"] = folded.threshold.detach().reshape(-1).contiguous()
    elif arch == "topk" or (arch in ("batchtopk", "matryoshka") and float(folded.threshold) < 0):
        architecture = "topk"
        extra = {"k": int(sae.cfg.k), "rescale_acts_by_decoder_norm": False}
    elif arch in ("batchtopk", "matryoshka"):
        architecture = "jumprelu"
        tensors["threshold"] = torch.full((sae.n_latents,), float(folded.threshold))
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
