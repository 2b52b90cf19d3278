"""dictionary_learning (saprmarks/dictionary_learning) and the paper's code (ExplainableML/sae-for-vlm, which
vendors an older copy): ``ae.pt`` + ``config.json``, loaded and written.

Layout (what ``dictionary_learning.utils.load_dictionary`` reads): ``trainer_<i>/config.json`` =
``{"trainer": {"dict_class": ..., "k": ...}, "buffer": {...}}`` and ``ae.pt``, a bare state dict (also
``checkpoints/ae_<step>.pt``, the latest loaded when there is no ``ae.pt``). ``sae_path`` may name one checkpoint
file or the run folder above a single ``trainer_<i>/``. A mid-training backup (``{step, ae, optimizer}``) is refused.

``trainer.dict_class`` -> vlmsae arch (x raw activations):

- ``AutoEncoder`` -> relu: ``encoder.*`` [F,d], ``decoder.weight`` [d,F], ``bias`` (b_dec). As its
  ``from_pretrained`` does, decoder columns are rescaled to unit norm (encoder by the same norms) unless already so;
- ``AutoEncoderTopK`` -> topk (``k``; its scalar ``threshold`` is unused at inference);
- ``BatchTopKSAE`` -> batchtopk: f = p * (p > threshold), p = relu(z). A threshold still at -1 is a plain ReLU,
  loaded as threshold 0 (same codes), with a warning;
- ``MatryoshkaBatchTopKSAE`` / ``MatroyshkaBatchTopKSAE`` (the paper's spelling) -> matryoshka: ``W_enc`` [d,F],
  ``W_dec`` [F,d], ``group_sizes`` (kept as group fractions), all groups active at inference;
- ``JumpReluAutoEncoder`` -> jumprelu: pre = x W_enc + b_enc (b_dec NOT subtracted), so b_enc' = b_enc + b_dec W_enc.

With ``normalize_activations`` the trainer folds its norm factor into the saved weights: files take raw inputs.

``sae.trained_on``: ``trainer.layer`` L is block L's residual output (vlmsae's index). The paper's code saves empty
``layer``/``lm_name``; its folder ``<dataset>_<split>_activations_<model>_<layer>_<point>_<sae>_<k>_x<expansion>``
has them: ``post_mlp_residual`` L = block L, ``post_projection`` = vlmsae ``"last"`` (tokens "cls"). A
``random_k_<n>`` folder above means tokens random_k (the steering SAE); otherwise tokens are unknown (None).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.checkpoint import check_shape, require_keys
from vlmsae.sae.config import SAEConfig
from vlmsae.sae.interop._convert import export_weights, json_object_or_none, sae_from_weights
from vlmsae.sae.interop.names import hf_id, model_from_name
from vlmsae.sae.interop.torchfile import read_torch_file
from vlmsae.utils.io import atomic_write, atomic_write_json
from vlmsae.utils.provenance import provenance

NAME = "dictionary_learning"
AE_FNAME = "ae.pt"
CONFIG_FNAME = "config.json"
EXPECTS = (
    'ae.pt (a torch state dict) + config.json with {"trainer": {"dict_class": ...}} (dictionary_learning, '
    "sae-for-vlm), or trainer_<i>/checkpoints/ae_<step>.pt beside trainer_<i>/config.json"
)
DICT_CLASSES = {
    "AutoEncoder": "relu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "matryoshka",
    "MatroyshkaBatchTopKSAE": "matryoshka",
    "JumpReluAutoEncoder": "jumprelu",
}
_KEYS = {
    "relu": ("bias", "encoder.weight", "encoder.bias", "decoder.weight"),
    "topk": ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"),
    "batchtopk": ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"),
    "matryoshka": ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
}
_TRAINER_CLASSES = {
    "AutoEncoder": "StandardTrainer",
    "AutoEncoderTopK": "TopKTrainer",
    "BatchTopKSAE": "BatchTopKTrainer",
    "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer",
    "MatroyshkaBatchTopKSAE": "MatroyshkaBatchTopKTrainer",
}
MATRYOSHKA_CLASSES = ("MatryoshkaBatchTopKSAE", "MatroyshkaBatchTopKSAE")
"""dictionary_learning's Matryoshka class name, then the paper's vendored copy's (sic): ``save(matryoshka_class=)``."""
_CHECKPOINT = re.compile(r"^ae_(\d+)\.pt$")
_VLM_FOLDER = re.compile(
    r"^(?P<dataset>.+?)_(?P<split>train|val)_activations_(?P<model>.+?)_(?P<layer>-?\d+)_"
    r"(?P<point>post_mlp_residual|post_projection)(?:_(?P<sae>.+)_(?P<k>\d+)_x(?P<expansion>\d+))?$"
)
_RANDOM_K = re.compile(r"^random_k_(\d+)$")
_NORMALISATION = "none: dictionary_learning folds its training norm factor into the biases, so the file takes raw "
_NORMALISATION += "activations"


# ---------------------------------------------------------------------------------------------- locating files
def _checkpoints(dpath: Path) -> list[Path]:
    """``dpath/checkpoints/ae_<step>.pt``, by step."""
    ckpt_dpath = dpath / "checkpoints"
    found = [p for p in ckpt_dpath.iterdir() if _CHECKPOINT.match(p.name)] if ckpt_dpath.is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def _locate_trainer(path: Path) -> tuple[Path, Path] | None:
    """(weights file, config.json) for a trainer folder, an ae.pt, or a checkpoints/ae_<step>.pt; None if absent."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".pt":
            return None
        folders = [path.parent] + ([path.parent.parent] if path.parent.name == "checkpoints" else [])
        configs = [d / CONFIG_FNAME for d in folders if (d / CONFIG_FNAME).is_file()]
        return (path, configs[0]) if configs else None
    config_fpath = path / CONFIG_FNAME
    if not config_fpath.is_file():
        return None
    weights = [path / AE_FNAME] if (path / AE_FNAME).is_file() else _checkpoints(path)  # else the latest checkpoint
    return (weights[-1], config_fpath) if weights else None


def _is_trainer(found: tuple[Path, Path] | None) -> bool:
    trainer = (json_object_or_none(found[1]) or {}).get("trainer") if found is not None else None
    return isinstance(trainer, dict) and "dict_class" in trainer


def _trainer_folders(dpath: Path) -> list[Path]:
    """The trainer folders right under ``dpath`` (a training run's ``trainer_<i>/``), by name; [] for a file."""
    if not dpath.is_dir() or (dpath / CONFIG_FNAME).is_file():
        return []
    found = [d for d in dpath.iterdir() if d.is_dir() and _is_trainer(_locate_trainer(d))]
    return sorted(found, key=lambda d: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", d.name)])


def _locate(path: Path) -> tuple[Path, Path] | None:
    """(weights file, config.json) for ``path``: a trainer folder or file (:func:`_locate_trainer`), or a run folder
    one level above exactly one trainer folder. Several trainers there are refused, naming them."""
    path = Path(path)
    found = _locate_trainer(path)
    if found is not None:
        return found
    trainers = _trainer_folders(path)
    if len(trainers) > 1:
        names = ", ".join(d.name for d in trainers[:8]) + (", ..." if len(trainers) > 8 else "")
        raise ValueError(
            f"{str(path)!r} holds {len(trainers)} dictionary_learning trainers ({names}): pass one of them, e.g. "
            f"sae_path={path / trainers[0].name}, or a comma-separated list of them to evaluate each."
        )
    return _locate_trainer(trainers[0]) if trainers else None


def detect(dpath: Path) -> bool:
    dpath = Path(dpath)
    return _is_trainer(_locate_trainer(dpath)) or bool(_trainer_folders(dpath))


# ---------------------------------------------------------------------------------------------- loading
def read_state_dict(fpath: Path) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` state dict of an ``ae.pt`` (:func:`~vlmsae.sae.interop.torchfile.read_torch_file`);
    a training backup or any non-tensor value is refused, naming the keys."""
    obj = read_torch_file(fpath)
    if isinstance(obj, dict) and {"ae", "optimizer"} <= set(obj):
        raise ValueError(
            f"{str(fpath)!r} is a dictionary_learning mid-training backup ({{step, ae, optimizer, ...}}; its weights "
            "are in the trainer's normalised units), not a saved SAE: load the final ae.pt or a "
            "checkpoints/ae_<step>.pt instead."
        )
    if not isinstance(obj, dict):
        raise ValueError(f"{str(fpath)!r} holds a {type(obj).__name__}, not a state dict {{name: tensor}}.")
    bad = {key: type(value).__name__ for key, value in obj.items() if not isinstance(value, torch.Tensor)}
    if bad:
        raise ValueError(
            f"{str(fpath)!r} is not a plain state dict: keys {sorted(bad)} hold {sorted(set(bad.values()))}, not "
            "tensors (expected {name: tensor}, as dictionary_learning saves ae.pt)."
        )
    return obj


def _scalar(tensors: dict[str, torch.Tensor], key: str, fpath: Path, what: str) -> torch.Tensor:
    value = tensors[key]
    if value.numel() != 1:
        raise ValueError(
            f"{str(fpath)!r}: {key} has shape {tuple(value.shape)}, but {what} stores a single scalar {key}; the file "
            f"contradicts its class: re-save it from dictionary_learning, or fix config.json trainer.dict_class."
        )
    return value.reshape(())


def _group_fractions(sizes: list[int], n_latents: int, fpath: Path) -> tuple[float, ...]:
    if any(size < 1 for size in sizes) or sum(sizes) != n_latents:
        raise ValueError(
            f"{str(fpath)!r}: group_sizes={sizes} sum to {sum(sizes)}, but the weights have F={n_latents} latents; "
            "group sizes must be positive and sum to F (the dict_size). The file is inconsistent: fix group_sizes "
            "in ae.pt (and trainer.group_sizes in config.json) or use the matching weights."
        )
    fractions = tuple(size / n_latents for size in sizes)
    if SAEConfig(arch="matryoshka", d_in=1, n_latents=n_latents, group_fractions=fractions).group_sizes != sizes:
        raise ValueError(f"{str(fpath)!r}: group_sizes={sizes} cannot be expressed as vlmsae group fractions.")
    return fractions


def _convert(arch: str, dict_class: str, tensors: dict[str, torch.Tensor], fpath: Path, trainer: dict) -> tuple:
    """(SAEConfig fields, vlmsae tensors (W_enc [F,d], b_enc, W_dec [F,d], b_dec), threshold) of one file."""
    what = f" for dict_class {dict_class!r} (is config.json trainer.dict_class right for this file?)"
    require_keys(tensors, _KEYS[arch], repr(str(fpath)), what)
    t = {key: value.detach().to(torch.float32) for key, value in tensors.items() if key not in ("k", "group_sizes")}
    if arch in ("relu", "topk", "batchtopk"):
        W_enc_FD, b_enc_F, W_dec_FD = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"].T
        b_dec_D = t["bias"] if arch == "relu" else t["b_dec"]
    else:
        W_enc_FD, b_enc_F, W_dec_FD, b_dec_D = t["W_enc"].T, t["b_enc"], t["W_dec"], t["b_dec"]
    n_latents, d_in = W_enc_FD.shape
    where = f"{str(fpath)!r} (encoder: d={d_in}, F={n_latents})"
    check_shape("W_dec", W_dec_FD, (n_latents, d_in), where)
    check_shape("b_enc", b_enc_F, (n_latents,), where)
    check_shape("b_dec", b_dec_D, (d_in,), where)
    kwargs: dict[str, Any] = {}
    if "k" in tensors:
        k = int(_scalar(tensors, "k", fpath, dict_class))
        if trainer.get("k") is not None and int(trainer["k"]) != k:
            raise ValueError(
                f"{str(fpath)!r}: k={k} in the weights but trainer.k={trainer['k']} in config.json "
                "(dictionary_learning refuses this too): make them agree."
            )
        kwargs["k"] = k
    threshold = torch.tensor(-1.0)
    if arch == "jumprelu":
        threshold = t["threshold"]
        check_shape("threshold", threshold, (n_latents,), where + " (JumpReluAutoEncoder: one per latent)")
        b_enc_F = b_enc_F + W_enc_FD @ b_dec_D  # the library does not subtract b_dec before encoding
    elif "threshold" in t:
        threshold = _scalar(t, "threshold", fpath, dict_class)
    if arch == "relu":
        norms_F = W_dec_FD.norm(dim=1)
        if not torch.allclose(norms_F, torch.ones_like(norms_F)):  # AutoEncoder.from_pretrained(normalize_decoder)
            W_dec_FD, W_enc_FD, b_enc_F = W_dec_FD / norms_F[:, None], W_enc_FD * norms_F[:, None], b_enc_F * norms_F
    if arch in ("batchtopk", "matryoshka") and float(threshold) < 0:
        warnings.warn(
            f"{str(fpath)!r}: threshold={float(threshold)} was never estimated, so dictionary_learning encodes this "
            f"{dict_class} with a plain ReLU (every positive latent active); loaded with threshold 0, which gives "
            "the same codes. Expect dense codes.",
            stacklevel=3,
        )
        threshold = torch.tensor(0.0)
    if arch == "matryoshka":
        sizes = [int(s) for s in tensors["group_sizes"].reshape(-1)]
        if trainer.get("group_sizes") is not None and [int(s) for s in trainer["group_sizes"]] != sizes:
            raise ValueError(
                f"{str(fpath)!r}: group_sizes={sizes} in the weights but trainer.group_sizes={trainer['group_sizes']} "
                "in config.json: make them agree (the weights' buffer is what the library uses)."
            )
        kwargs["group_fractions"] = _group_fractions(sizes, n_latents, fpath)
    return kwargs, (W_enc_FD, b_enc_F, W_dec_FD, b_dec_D), threshold


def _trained_on(trainer: dict, config: dict, config_fpath: Path) -> dict[str, Any]:
    written = config.get("vlmsae") if isinstance(config.get("vlmsae"), dict) else {}
    for key in ("trained_on", "source"):  # written by vlmsae's own export ("source" before the rename): exact
        if isinstance(written.get(key), dict):
            return dict(written[key])
    hf_model = trainer.get("lm_name") if isinstance(trainer.get("lm_name"), str) and trainer["lm_name"] else None
    model, pretrained = model_from_name(hf_model)
    layer = trainer.get("layer")
    layer = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
    trained_on: dict[str, Any] = {"model": model, "pretrained": pretrained, "layer": layer, "tokens": None}
    for dpath in list(config_fpath.parents)[:4]:
        match = _VLM_FOLDER.match(dpath.name)
        if match and model is None and layer is None:
            hf_model = match["model"]
            model, pretrained = model_from_name(hf_model)
            point, raw_layer = match["point"], int(match["layer"])
            layer = "last" if point == "post_projection" else raw_layer
            trained_on.update(model=model, pretrained=pretrained, layer=layer, library_layer=raw_layer)
            trained_on.update(attachment_point=point, dataset=match["dataset"])
            if point == "post_projection":
                trained_on["tokens"] = "cls"  # one projected embedding per image
        random_k = _RANDOM_K.match(dpath.name)
        if random_k:
            trained_on.update(tokens="random_k", tokens_k=int(random_k.group(1)))
    trained_on["hf_model"] = hf_model
    return trained_on


def load(dpath: Path, device: str = "cpu") -> SAE:
    found = _locate(Path(dpath))
    if found is None:
        raise FileNotFoundError(f"{str(dpath)!r} is not a dictionary_learning SAE; expected {EXPECTS}.")
    weights_fpath, config_fpath = found
    config = json_object_or_none(config_fpath)
    trainer = (config or {}).get("trainer")
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise ValueError(f'{str(config_fpath)!r} has no "trainer": {{"dict_class": ...}}; expected {EXPECTS}.')
    dict_class = trainer["dict_class"]
    if dict_class not in DICT_CLASSES:
        raise ValueError(
            f"{str(config_fpath)!r}: dict_class {dict_class!r} is not supported; supported: {', '.join(DICT_CLASSES)}."
        )
    arch = DICT_CLASSES[dict_class]
    kwargs, weights, threshold = _convert(arch, dict_class, read_state_dict(weights_fpath), weights_fpath, trainer)
    trained_on = _trained_on(trainer, config, config_fpath)
    trained_on.setdefault("input_normalisation", _NORMALISATION)
    trained_on.update(format=NAME, original_path=str(dpath), dict_class=dict_class)
    in_checkpoints = weights_fpath.parent.name == "checkpoints"
    trained_on["checkpoint"] = f"checkpoints/{weights_fpath.name}" if in_checkpoints else weights_fpath.name
    where = repr(str(weights_fpath))
    return sae_from_weights(
        arch, *weights, threshold=threshold, trained_on=trained_on, device=device, where=where, **kwargs
    )


# ---------------------------------------------------------------------------------------------- export
def _unit_decoder(W_enc_FD: torch.Tensor, b_enc_F: torch.Tensor, W_dec_FD: torch.Tensor) -> tuple:
    """(W_enc * n, b_enc * n, W_dec / n) for decoder row norms n, unless they pass the library's own unit-norm check
    (``AutoEncoder.normalize_decoder``: torch.allclose to ones); then the tensors unchanged."""
    norms_F = W_dec_FD.norm(dim=1)
    if torch.allclose(norms_F, torch.ones_like(norms_F)):
        return W_enc_FD, b_enc_F, W_dec_FD
    if not bool((norms_F > 0).all()):
        raise ValueError(
            "dictionary_learning export: the SAE has all-zero decoder rows, which AutoEncoder.from_pretrained cannot "
            "normalise; drop those latents or export to saelens / vlmsae instead."
        )
    warnings.warn(
        f"relu SAE with decoder rows of norm {float(norms_F.min()):.4g}..{float(norms_F.max()):.4g}: written with unit "
        "rows (norms folded into the encoder), because dictionary_learning's AutoEncoder renormalises them on load. "
        "Reconstructions are unchanged; each latent's codes are multiplied by its row norm.",
        stacklevel=3,
    )
    n64_F = norms_F.double()
    return (
        (W_enc_FD.double() * n64_F[:, None]).float(),
        (b_enc_F.double() * n64_F).float(),
        (W_dec_FD.double() / n64_F[:, None]).float(),
    )


def save(sae: SAE, out_dpath: Path, matryoshka_class: str = MATRYOSHKA_CLASSES[0]) -> Path:
    """Write ``out_dpath/ae.pt`` + ``config.json`` that ``dictionary_learning.utils.load_dictionary`` loads.

    relu -> AutoEncoder (decoder rows made unit norm, see :func:`_unit_decoder`), topk -> AutoEncoderTopK, batchtopk
    -> BatchTopKSAE, matryoshka -> ``matryoshka_class`` (MatroyshkaBatchTopKSAE (sic) for sae-for-vlm's copy). A
    BatchTopK-family SAE without an estimated threshold (per-sample top-k in vlmsae) is written as AutoEncoderTopK.
    """
    if sae.arch not in ("relu", "topk", "batchtopk", "matryoshka"):
        raise ValueError(
            f"dictionary_learning export supports arch relu, topk, batchtopk and matryoshka; got {sae.arch!r}."
        )
    if matryoshka_class not in MATRYOSHKA_CLASSES:
        raise ValueError(
            f"matryoshka_class={matryoshka_class!r} is not a dictionary_learning class name; use "
            f"{MATRYOSHKA_CLASSES[0]} (dictionary_learning) or {MATRYOSHKA_CLASSES[1]} (sic; the paper's code)."
        )
    weights, arch = export_weights(sae)
    W_enc_FD, b_enc_F, W_dec_FD, b_dec_D = (weights[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if arch == "relu":
        W_enc_FD, b_enc_F, W_dec_FD = _unit_decoder(W_enc_FD, b_enc_F, W_dec_FD)
    if arch != sae.arch:
        warnings.warn(
            f"{sae.arch} SAE without an estimated threshold: vlmsae encodes it with per-sample top-k, which "
            "dictionary_learning's batch top-k classes cannot express; written as AutoEncoderTopK (same codes"
            + (f"; matryoshka_class={matryoshka_class} does not apply)." if sae.arch == "matryoshka" else ")."),
            stacklevel=2,
        )
    dict_class = matryoshka_class if arch == "matryoshka" else next(c for c, a in DICT_CLASSES.items() if a == arch)
    # Every key any class saves; each class writes the keys its loader reads (_KEYS; AutoEncoderTopK also a threshold).
    values = {"bias": b_dec_D, "b_dec": b_dec_D, "encoder.weight": W_enc_FD, "encoder.bias": b_enc_F}
    values.update({"decoder.weight": W_dec_FD.T, "W_enc": W_enc_FD.T, "b_enc": b_enc_F, "W_dec": W_dec_FD})
    values.update(k=torch.tensor(sae.cfg.k, dtype=torch.int32), threshold=weights["threshold"].reshape(()))
    values["group_sizes"] = torch.tensor(sae.group_sizes, dtype=torch.int64)
    state = {name: values[name].contiguous() for name in _KEYS[arch] + (("threshold",) if arch == "topk" else ())}
    trained_on = dict(sae.trained_on)
    layer = trained_on.get("layer")
    trainer = {
        "dict_class": dict_class,
        "trainer_class": _TRAINER_CLASSES[dict_class],
        "activation_dim": sae.d_in,
        "dict_size": sae.n_latents,
        "layer": layer if isinstance(layer, int) and not isinstance(layer, bool) else "",
        "lm_name": hf_id(trained_on.get("model")),
        "submodule_name": "",
    }
    if arch != "relu":
        trainer["k"] = sae.cfg.k
    if arch == "matryoshka":
        trainer.update(group_sizes=sae.group_sizes, group_fractions=list(sae.cfg.group_fractions))
    prov = provenance()
    extra = {
        "trained_on": trained_on,
        "arch": sae.arch,
        "vlmsae_version": prov["vlmsae_version"],
        "created": prov["created"],
    }
    out_dpath = Path(out_dpath)
    out_dpath.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dpath / AE_FNAME, lambda tmp: torch.save(state, tmp))
    atomic_write_json(out_dpath / CONFIG_FNAME, {"trainer": trainer, "buffer": {}, "vlmsae": extra})
    return out_dpath


__all__ = ["DICT_CLASSES", "EXPECTS", "MATRYOSHKA_CLASSES", "NAME", "detect", "load", "save"]
