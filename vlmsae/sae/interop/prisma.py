"""ViT-Prisma SAE checkpoints (Prisma-Multimodal/ViT-Prisma) as vlmsae SAEs.

Files: ``<run>/n_images_<N>.pt`` = ``torch.save({"cfg": <pickled dataclass>, "state_dict": sd})`` next to
``config.json``. The config is read from ``config.json`` only (required); the ``.pt`` goes through torch's
``weights_only`` unpickler with every ``vit_prisma.*`` global replaced by an inert placeholder, so nothing runs; any
other global is refused, naming it, as are ``.pkl``/``.pkl.gz`` files. The largest N is loaded unless a file is named.

config.json: ``d_in``, ``expansion_factor``, ``architecture`` (only "standard"), ``activation_fn_str`` (relu |
topk with ``activation_fn_kwargs.k``), ``normalize_activations``, ``model_name``, ``hook_point_layer``,
``layer_subtype``, ``cls_token_only``, ``use_patches_only``. State dict: ``W_enc`` [d, F], ``b_enc``, ``W_dec``
[F, d], ``b_dec``, mapped 1:1 (f = act((norm_in(x) - b_dec) W_enc + b_enc), x_hat = norm_out(f W_dec + b_dec)).

``normalize_activations`` ``"layer_norm"`` (default: (x - mu) / (sigma + 1e-5), unbiased std, undone by y * sigma +
mu) and ``"constant_norm_rescale"`` (x * sqrt(d) / ||x||) depend on each input, so the loaded module applies them
itself (:class:`NormalisedInputSAE`, ``sae.input_transform``); ``decode`` uses the stats of the last ``encode`` of
the same rows, or ``decode(codes, x=x)``. Inference only.

Layers: ``hook_resid_post`` of block L = vlmsae layer L; other subtypes record layer None and ``trained_on["hook"]``.
Tokens: ``cls_token_only`` -> "cls", ``use_patches_only`` -> "patches", else "all".
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from vlmsae.sae.base import SAE
from vlmsae.sae.checkpoint import check_shape, require_keys
from vlmsae.sae.interop._convert import json_object_or_none, sae_from_weights
from vlmsae.sae.interop.names import model_from_name
from vlmsae.sae.relu import ReluSAE
from vlmsae.sae.topk import TopKSAE

NAME = "prisma"
EXPECTS = (
    "a ViT-Prisma run folder: config.json (d_in, expansion_factor, hook_point_layer, activation_fn_str, "
    "normalize_activations) + n_images_<N>.pt holding {cfg, state_dict: W_enc [d, F], b_enc, W_dec [F, d], b_dec}"
)
CONFIG_JSON = "config.json"
_CONFIG_KEYS = ("d_in", "hook_point_layer", "expansion_factor")
_LN_EPS = 1e-5
_PLACEHOLDER_PREFIXES = ("vit_prisma.",)


class _Placeholder:
    """Stands in for every vit_prisma global while reading a .pt: accepts any construction and state, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:  # object.__init__ then ignores the arguments
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        pass


class NormalisedInputSAE:
    """Mixin: a per-sample input normalisation applied around the SAE (Prisma's layer_norm / constant_norm_rescale).

    ``input_transform`` is "layer_norm" or "constant_norm_rescale". Stats of the last encoded batch are kept for
    ``decode`` (which also takes ``x=`` to recompute them).
    """

    interop_only = "per-sample input normalisation applied by the module; not stored by save_sae"
    input_transform: str = "layer_norm"

    def _normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if self.input_transform == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)  # unbiased, as torch.Tensor.std in Prisma
            return (x - mu) / (std + _LN_EPS), (mu, std)
        coeff = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True)
        return x * coeff, (coeff,)

    def _denormalise(self, y: torch.Tensor, stats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return y * stats[1] + stats[0] if self.input_transform == "layer_norm" else y / stats[0]  # (mu, std) | coeff

    def _prepare(self, x: torch.Tensor, where: str, require_2d: bool = False) -> torch.Tensor:
        x = self.check_input(x, where, require_2d=require_2d)
        x_n, self._last_stats = self._normalise(x)
        return x_n

    def encode(self, x: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        return super().encode(self._prepare(x, "encode", require_2d=sparse), sparse=sparse)

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        return super().encode_pre(self._prepare(x, "encode_pre"))

    def decode(self, codes: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        y = super().decode(codes)
        stats = self._normalise(self.check_input(x, "decode"))[1] if x is not None else self._last_stats_for(y)
        return self._denormalise(y, stats)

    def _last_stats_for(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stats = getattr(self, "_last_stats", None)
        if stats is None or tuple(stats[0].shape[:-1]) != tuple(y.shape[:-1]):
            raise ValueError(
                f"decode: this SAE normalises each input ({self.input_transform}), so decoding needs that input's "
                f"stats; codes of shape {tuple(y.shape[:-1])} do not match the last encoded batch. Call encode(x) on "
                "the same rows first, or pass decode(codes, x=x)."
            )
        return stats

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            f"{type(self).__name__} is an inference-only import of a ViT-Prisma SAE with a per-sample "
            f"{self.input_transform} input; vlmsae does not train it."
        )


class PrismaReluSAE(NormalisedInputSAE, ReluSAE):
    """Prisma ReLU SAE with its per-sample input normalisation."""


class PrismaTopKSAE(NormalisedInputSAE, TopKSAE):
    """Prisma TopK SAE with its per-sample input normalisation."""


def _read_config(dpath: Path) -> dict[str, Any] | None:
    cfg = json_object_or_none(dpath / CONFIG_JSON)
    return cfg if cfg is not None and all(key in cfg for key in _CONFIG_KEYS) else None


def _weights_files(dpath: Path) -> list[Path]:
    """Checkpoint files of a run folder, the preferred one first (largest n_images_<N>)."""

    def n_images(fpath: Path) -> int:
        match = re.fullmatch(r"n_images_(\d+)\.pt", fpath.name)
        return int(match[1]) if match else -1

    return sorted(
        (f for f in dpath.iterdir() if f.suffix == ".pt" or f.name.endswith((".pkl", ".pkl.gz"))),
        key=lambda f: (n_images(f), f.name),
        reverse=True,
    )


def detect(dpath: Path) -> bool:
    """True for a folder (or a file in one) whose config.json has Prisma's keys and which holds a checkpoint."""
    dpath = Path(dpath)
    folder = dpath.parent if dpath.is_file() else dpath
    if not folder.is_dir() or _read_config(folder) is None:
        return False
    return dpath.is_file() or bool(_weights_files(folder))


def read_checkpoint(fpath: Path) -> dict[str, torch.Tensor]:
    """The state dict of a Prisma ``.pt``, without unpickling its config object (see the module docstring)."""
    import io
    import pickle

    if fpath.name.endswith((".pkl", ".pkl.gz")):
        raise ValueError(
            f"{str(fpath)!r} is a plain pickle (Prisma's .pkl/.pkl.gz save), which vlmsae does not unpickle; re-save "
            "its state_dict with torch.save(obj['state_dict'], 'n_images_<N>.pt') where you trust the file."
        )
    data = fpath.read_bytes()
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))  # static scan, runs nothing
    except (ValueError, RuntimeError, EOFError) as err:
        raise ValueError(f"{str(fpath)!r} is not a torch zip checkpoint ({err}).") from err
    foreign = [name for name in names if not name.startswith(_PLACEHOLDER_PREFIXES)]
    if foreign:
        raise ValueError(
            f"{str(fpath)!r} needs code to unpickle ({', '.join(sorted(foreign))}): vlmsae refuses it and executed "
            "nothing from it. A Prisma checkpoint holds only tensors and its vit_prisma config object."
        )
    try:
        with torch.serialization.safe_globals([(_Placeholder, name) for name in names]):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise ValueError(f"{str(fpath)!r}: unreadable without executing code ({err}); nothing was executed.") from err
    state = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(fpath)!r}: expected a state dict of tensors (or {{cfg, state_dict}}); got {type(obj)}.")
    return state


def load(dpath: Path, device: str = "cpu") -> SAE:
    """A ViT-Prisma run folder (or one checkpoint file next to its config.json) as an eval-mode vlmsae SAE."""
    dpath = Path(dpath)
    folder = dpath.parent if dpath.is_file() else dpath
    cfg = _read_config(folder)
    if cfg is None:
        raise FileNotFoundError(
            f"{str(folder)!r} has no ViT-Prisma {CONFIG_JSON} (with {', '.join(_CONFIG_KEYS)}). Prisma's .pt keeps its "
            "config only as a pickled Python object, which vlmsae does not unpickle: provide the config.json Prisma "
            "writes next to the checkpoint (save_config; the Hub repos ship it)."
        )
    cfg = {k: (v["value"] if isinstance(v, dict) and "__type__" in v else v) for k, v in cfg.items()}
    where = repr(str(folder / CONFIG_JSON))
    if cfg.get("is_transcoder"):
        raise ValueError(f"{where}: is_transcoder=true; vlmsae loads SAEs, not Prisma transcoders.")
    if cfg.get("architecture", "standard") != "standard":
        raise ValueError(f"{where}: architecture={cfg['architecture']!r}; only 'standard' Prisma SAEs are supported.")
    act = cfg.get("activation_fn_str", "topk")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if act not in ("relu", "topk") or (act == "topk" and k is None):
        raise ValueError(
            f"{where}: activation_fn_str={act!r} with activation_fn_kwargs={cfg.get('activation_fn_kwargs')!r}; "
            "expected 'relu', or 'topk' with a k."
        )
    if dpath.is_file():
        fpath = dpath
    else:
        files = _weights_files(folder)
        if not files:
            raise FileNotFoundError(f"{str(folder)!r} has {CONFIG_JSON} but no checkpoint (n_images_<N>.pt).")
        fpath = files[0]
    state = read_checkpoint(fpath)
    require_keys(state, ("W_enc", "b_enc", "W_dec", "b_dec"), f"{str(fpath)!r}: the state dict")
    d_in = int(cfg["d_in"])
    n_latents = d_in * int(cfg["expansion_factor"])
    where_w = f"{str(fpath)!r} (config.json: d_in={d_in}, expansion_factor={cfg['expansion_factor']})"
    check_shape("W_enc", state["W_enc"], (d_in, n_latents), where_w)  # the others: by sae_from_weights

    norm = cfg.get("normalize_activations", "layer_norm")
    transform = norm if norm in ("layer_norm", "constant_norm_rescale") else None
    layer, subtype = cfg["hook_point_layer"], cfg.get("layer_subtype", "ln2.hook_normalized")
    tokens = "cls" if cfg.get("cls_token_only") else "patches" if cfg.get("use_patches_only") else "all"
    trained_on = {
        "model": model_from_name(cfg.get("model_name"))[0],
        "pretrained": cfg.get("model_name"),
        "layer": int(layer) if subtype == "hook_resid_post" else None,
        "tokens": tokens,
        "input_normalisation": (
            f"{transform} per sample, applied by the loaded module (not foldable)" if transform else "none"
        ),
        "format": NAME,
        "original_path": str(fpath),
        "hook": f"blocks.{layer}.{subtype}",
    }
    cls = {"relu": PrismaReluSAE, "topk": PrismaTopKSAE}[act] if transform else None
    sae = sae_from_weights(
        act,
        state["W_enc"].T,
        state["b_enc"],
        state["W_dec"],
        state["b_dec"],
        k=int(k) if act == "topk" else None,
        cls=cls,
        trained_on=trained_on,
        device=device,
        where=where_w,
    )
    if transform:
        sae.input_transform = transform
    return sae
