"""open_clip backend: CLIP ViT-B/32, ViT-L/14, ViT-L/14-336 (native ViTs) and SigLIP (a timm trunk).

Where the weights come from and what decides their activation (QuickGELU for OpenAI weights) and image
preprocessing (the registered pretrained config of the tag, a folder's ``open_clip_config.json``, or the
:data:`OVERRIDE_TARGETS` fields) is docs/offline.md's first bullet; :func:`resolve_open_clip_weights` decides
it without loading anything, and :func:`create_open_clip` is the one place that builds an open_clip model
(taps, embedders, zero-shot). The tap keeps only the vision tower and runs its blocks itself, up to block L.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from vlmsae.config.nodes import open_clip_overrides
from vlmsae.models.digits import DIGITS_VIT_ARCHS, DIGITS_VIT_RANDOM_ARCH, ensure_digits_vit
from vlmsae.models.hub import offline_reason
from vlmsae.models.spec import ModelSpec
from vlmsae.models.tap import Tap, looks_offline, resolve_device, torch_dtype
from vlmsae.models.tiny import OPEN_CLIP_CONFIG, build_tiny_open_clip, tiny_model_dpath

log = logging.getLogger(__name__)
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def _missing_weights_error(spec: ModelSpec, err: BaseException) -> RuntimeError:
    import open_clip

    repo = "<repo>"
    if spec.pretrained and not spec.arch.startswith("hf-hub:"):
        repo = (open_clip.get_pretrained_cfg(spec.arch, spec.pretrained) or {}).get("hf_hub", repo).rstrip("/") or repo
    elif spec.arch.startswith("hf-hub:"):
        repo = spec.arch[len("hf-hub:") :]
    return RuntimeError(
        f"Could not load the weights of model {spec.name!r} (open_clip arch={spec.arch!r}, "
        f"pretrained={spec.pretrained!r}, cache_dir={spec.cache_dir!r}): {err}\n"
        "This machine may be offline and the weights not cached. Download them where there is internet "
        f"(e.g. `python -c \"import open_clip; open_clip.create_model('{spec.arch}', pretrained='{spec.pretrained}', "
        f"cache_dir='<dir>')\"` or `huggingface-cli download {repo} --local-dir <dir>`) and pass "
        "model.local_path=<checkpoint file or folder> (keep model.pretrained=<tag>: it decides the image "
        "preprocessing and the activation), or point model.cache_dir at a cache that holds them."
    )


# Model/embedder fields (vlmsae.config.nodes.OPEN_CLIP_OVERRIDES) that override what the registered pretrained
# config (or a folder's config) says, for weights that no open_clip tag describes; value -> open_clip's
# preprocess key (None: the activation).
OVERRIDE_TARGETS = {
    "quick_gelu": None,
    "image_mean": "mean",
    "image_std": "std",
    "image_interpolation": "interpolation",
    "image_resize_mode": "resize_mode",
}
_RESIZE_MODES = ("shortest", "longest", "squash")
_INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class OpenClipWeights:
    """Where open_clip weights come from, and the activation and image preprocessing they need.

    ``quick_gelu`` and ``preprocess`` are passed to open_clip explicitly (they override its own
    choice), so a checkpoint file gets exactly what its registered tag would get.
    """

    model_name: str  # built-in arch, "local-dir:<folder>" or "hf-hub:<repo>"
    pretrained: Optional[str]  # registered tag or checkpoint file (built-in arch only), else None
    tag: Optional[str]  # the registered pretrained config that decided activation/preprocessing, if any
    quick_gelu: Optional[bool]  # None only for hf-hub sources without an override: the hub config decides
    preprocess: dict[str, Any]  # mean, std, interpolation, resize_mode (hf-hub: only the overrides)
    decided_by: str  # what decided them, for logs and errors
    seed: int = 0  # the seed of the random weights when there are none to load (pretrained and local path None)

    def needs_hub(self) -> bool:
        """Whether loading downloads (or reads the Hub's cache): an hf-hub arch or a registered tag, not a file."""
        if self.model_name.startswith("hf-hub:"):
            return True
        return bool(self.pretrained) and not Path(self.pretrained).expanduser().exists()

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``open_clip.create_model_and_transforms(self.model_name, **kwargs)``."""
        kwargs: dict[str, Any] = {"pretrained": self.pretrained}
        if self.quick_gelu is not None:
            # force_quick_gelu can only turn it on; the model kwarg also turns it off (e.g. a -quickgelu config).
            kwargs.update(force_quick_gelu=self.quick_gelu, quick_gelu=self.quick_gelu)
        kwargs.update({f"image_{key}": value for key, value in self.preprocess.items()})
        return kwargs


def _default_preprocess() -> dict[str, Any]:
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    cfg = asdict(PreprocessCfg())
    return {key: cfg[key] for key in ("mean", "std", "interpolation", "resize_mode")}


def _merge_preprocess(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    out.update({key: overlay[key] for key in base if overlay.get(key) is not None})
    return {key: tuple(float(x) for x in v) if key in ("mean", "std") else v for key, v in out.items()}


def _explicit_overrides(overrides: dict[str, Any], where: str) -> tuple[Optional[bool], dict[str, Any]]:
    """``(quick_gelu, preprocess)`` set explicitly (``<where>.quick_gelu``, ``<where>.image_mean``, ...), validated."""
    quick_gelu = overrides.get("quick_gelu")
    if quick_gelu is not None and not isinstance(quick_gelu, bool):
        raise ValueError(f"{where}.quick_gelu={quick_gelu!r} must be true or false.")
    preprocess: dict[str, Any] = {}
    for key, target in OVERRIDE_TARGETS.items():
        value = overrides.get(key)
        if target is None or value is None:
            continue
        if target in ("mean", "std"):
            ok = isinstance(value, (list, tuple)) and len(value) == 3
            ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
            if not ok or (target == "std" and min(value) <= 0):
                raise ValueError(
                    f"{where}.{key}={value!r} must be three per-channel (R, G, B) numbers"
                    + (", all > 0." if target == "std" else ".")
                )
        elif target == "resize_mode" and value not in _RESIZE_MODES:
            raise ValueError(f"{where}.{key}={value!r} is not an open_clip resize mode: use one of {_RESIZE_MODES}.")
        elif target == "interpolation" and value not in _INTERPOLATIONS:
            raise ValueError(
                f"{where}.{key}={value!r} is not an open_clip interpolation: use one of {_INTERPOLATIONS}."
            )
        preprocess[target] = value
    return quick_gelu, preprocess


def registered_preprocess(arch: str, tag: Optional[str]) -> tuple[bool, dict[str, Any]]:
    """``(quick_gelu, preprocess)`` that open_clip's pretrained registry gives ``arch`` with ``tag``.

    The one place the activation rule lives: the tag's ``quick_gelu`` (OpenAI weights were trained
    with QuickGELU), else the architecture's own config (the ``-quickgelu`` variants), else GELU.
    Preprocessing is open_clip's defaults overlaid with the tag's mean/std/interpolation/resize_mode
    (SigLIP: mean = std = 0.5, squash resize, no centre crop).
    """
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    arch_cfg = open_clip.get_model_config(arch) or {}
    quick_gelu = bool(tag_cfg.get("quick_gelu", arch_cfg.get("quick_gelu", False)))
    return quick_gelu, _merge_preprocess(_default_preprocess(), tag_cfg)


def _folder_preprocess(dpath: Path) -> tuple[bool, dict[str, Any]]:
    """``(quick_gelu, preprocess)`` from an open_clip folder's ``open_clip_config.json`` (as open_clip reads it)."""
    config = json.loads((dpath / OPEN_CLIP_CONFIG).read_text())
    quick_gelu = bool((config.get("model_cfg") or {}).get("quick_gelu", False))
    return quick_gelu, _merge_preprocess(_default_preprocess(), config.get("preprocess_cfg") or {})


def _checkpoint_in_dir(dpath: Path) -> Path | None:
    files = sorted(p for p in dpath.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
    files.sort(key=lambda p: p.suffix != ".safetensors")  # prefer safetensors (no pickles)
    return files[0] if files else None


def _is_tag(arch: str, value: Optional[str]) -> bool:
    import open_clip

    return bool(value) and bool(open_clip.get_pretrained_cfg(arch, value))


def _tag_for_file(
    name: str,
    arch: str,
    pretrained: Optional[str],
    pretrained_tag: Optional[str],
    overrides: dict[str, Any],
    where: str,
    fpath: Path,
) -> Optional[str]:
    """The registered tag whose config a checkpoint file is loaded with; errors say how to name one."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    tag = pretrained_tag or (pretrained if pretrained and not Path(pretrained).expanduser().is_file() else None)
    if tag is not None:
        if not _is_tag(arch, tag):
            field_name = "pretrained_tag" if pretrained_tag else "pretrained"
            raise ValueError(
                f"Unknown pretrained tag {tag!r} ({where}.{field_name}) for open_clip model {arch!r} ({where} "
                f"{name!r}): valid tags are {tags}. It names the registered config whose preprocessing and "
                "activation the weights in the file need."
            )
        return tag
    if tags and not all(overrides.get(key) is not None for key in OVERRIDE_TARGETS):
        raise ValueError(
            f"{where} {name!r} loads open_clip {arch!r} weights from the file {fpath}, but nothing says which "
            "registered pretrained config they are, so the image preprocessing (mean/std, resize) and the "
            f"activation (QuickGELU or GELU) are unknown. Set {where}.pretrained_tag=<tag> (valid tags for {arch}: "
            f"{tags}), or keep {where}.pretrained=<tag> and give the file as {where}.local_path=<file>; for weights "
            f"that match no tag set all of {where}.{{{','.join(OVERRIDE_TARGETS)}}}."
        )
    if not tags:
        log.warning(
            "%s %s: open_clip has no registered pretrained config for %s; weights from %s use open_clip's "
            "default preprocessing unless %s sets %s",
            where,
            name,
            arch,
            fpath,
            where,
            list(OVERRIDE_TARGETS),
        )
    return None


def resolve_open_clip_weights(
    name: str,
    arch: str,
    pretrained: Optional[str] = None,
    local_path: Optional[str] = None,
    pretrained_tag: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    where: str = "model",
) -> OpenClipWeights:
    """Which weights to load and with which activation and preprocessing; nothing is loaded or downloaded.

    Precedence for the weights: ``local_path`` (folder with ``open_clip_config.json``, folder with one
    checkpoint, or checkpoint file) > ``arch`` = ``hf-hub:``/``local-dir:`` > ``pretrained`` (tag or file).
    Activation and preprocessing: ``overrides`` (:data:`OVERRIDE_TARGETS`; None values = unset) > a folder's
    ``open_clip_config.json`` > the registered config of ``pretrained_tag`` or the ``pretrained`` tag.
    ``where`` ("model" or "embedder") names the config group in errors.
    """
    overrides = dict(overrides or {})
    quick_gelu_override, preprocess_override = _explicit_overrides(overrides, where)
    if not local_path and pretrained_tag and _is_tag(arch, pretrained) and pretrained_tag != pretrained:
        raise ValueError(
            f"{where}.pretrained={pretrained!r} and {where}.pretrained_tag={pretrained_tag!r} name "
            f"different registered configs ({where} {name!r}): drop one of them."
        )

    def weights_of(
        model_name: str, weights: Optional[str], tag: Optional[str], base: tuple[bool, dict[str, Any]], decided_by: str
    ) -> OpenClipWeights:
        quick_gelu = base[0] if quick_gelu_override is None else quick_gelu_override
        preprocess = _merge_preprocess(base[1], preprocess_override)
        if quick_gelu_override is not None or preprocess_override:
            decided_by += f" + {where} overrides"
        return OpenClipWeights(model_name, weights, tag, quick_gelu, preprocess, decided_by)

    def registered(weights: Optional[str], tag: Optional[str]) -> OpenClipWeights:
        decided_by = f"registered config {arch}/{tag}" if tag else "open_clip defaults"
        return weights_of(arch, weights, tag, registered_preprocess(arch, tag), decided_by)

    fpath: Optional[Path] = None
    if local_path:
        path = Path(local_path).expanduser()
        if path.is_dir():
            if (path / OPEN_CLIP_CONFIG).exists():
                folder = _folder_preprocess(path)
                tag = pretrained_tag or (pretrained if _is_tag(arch, pretrained) else None)
                by_tag = registered_preprocess(arch, tag) if tag else folder
                if by_tag != folder:  # e.g. conf/model's default tag, but other weights in the folder
                    log.warning(
                        "%s %s: %s/%s says quick_gelu/preprocess %s, the registered %s/%s says %s; using the folder's",
                        where,
                        name,
                        path,
                        OPEN_CLIP_CONFIG,
                        folder,
                        arch,
                        tag,
                        by_tag,
                    )
                return weights_of(f"local-dir:{path}", None, None, folder, f"{path / OPEN_CLIP_CONFIG}")
            fpath = _checkpoint_in_dir(path)
            if fpath is None:
                raise FileNotFoundError(
                    f"{where}.local_path={path} holds neither {OPEN_CLIP_CONFIG} nor a checkpoint "
                    f"({', '.join(_CHECKPOINT_SUFFIXES)}) for {where} {name!r}."
                )
        elif path.is_file():
            fpath = path
        else:
            raise FileNotFoundError(f"{where}.local_path={path} does not exist ({where} {name!r}).")
    elif arch.startswith("local-dir:"):
        dpath = Path(arch[len("local-dir:") :]).expanduser()
        if not (dpath / OPEN_CLIP_CONFIG).exists():
            raise FileNotFoundError(
                f"{where}.arch={arch!r}: {dpath / OPEN_CLIP_CONFIG} does not exist ({where} {name!r})."
            )
        return weights_of(f"local-dir:{dpath}", None, None, _folder_preprocess(dpath), f"{dpath / OPEN_CLIP_CONFIG}")
    elif arch.startswith("hf-hub:"):
        # The hub's open_clip_config.json decides; only explicit overrides are passed.
        return OpenClipWeights(arch, None, None, quick_gelu_override, preprocess_override, f"{arch} config")
    _check_arch(arch)
    if fpath is None and pretrained and not _is_tag(arch, pretrained):
        if Path(pretrained).expanduser().is_file():
            fpath = Path(pretrained).expanduser()
        else:
            import open_clip

            raise ValueError(
                f"Unknown pretrained tag {pretrained!r} for open_clip model {arch!r} ({where} {name!r}): valid tags "
                f"are {open_clip.list_pretrained_tags_by_model(arch)}, or give a checkpoint file/folder with "
                f"{where}.local_path=<path>."
            )
    if fpath is not None:
        return registered(str(fpath), _tag_for_file(name, arch, pretrained, pretrained_tag, overrides, where, fpath))
    if pretrained is None:
        log.warning(
            "%s %s: no pretrained weights given, using a RANDOM %s (fine for benchmarks only)", where, name, arch
        )
        if pretrained_tag and not _is_tag(arch, pretrained_tag):
            _tag_for_file(name, arch, None, pretrained_tag, overrides, where, Path("<none>"))  # raises the tag error
        return registered(None, pretrained_tag)
    return registered(pretrained, pretrained)


def spec_weights(spec: ModelSpec) -> OpenClipWeights:
    """:func:`resolve_open_clip_weights` for a model spec (``tiny: true`` first builds the tiny folder)."""
    local_path = spec.local_path
    if spec.tiny:
        dpath = tiny_model_dpath(spec.name, spec.seed, spec.local_path)
        if spec.arch in DIGITS_VIT_ARCHS:  # trained on the real digits (checked, retrained when not trusted)
            local_path = str(ensure_digits_vit(dpath, seed=spec.seed, random_init=spec.arch == DIGITS_VIT_RANDOM_ARCH))
        else:
            local_path = str(build_tiny_open_clip(dpath, seed=spec.seed))
    weights = resolve_open_clip_weights(
        spec.name, spec.arch, spec.pretrained, local_path, spec.pretrained_tag, open_clip_overrides(spec)
    )
    return dataclasses.replace(weights, seed=int(spec.seed))


def create_open_clip(
    weights: OpenClipWeights,
    cache_dir: Optional[str] = None,
    on_missing: Optional[Callable[[BaseException], BaseException]] = None,
) -> tuple[Any, Any]:
    """``(model, preprocess)`` on CPU from open_clip, with ``weights``' activation and preprocessing.

    ``on_missing(err)`` turns a failed download into the caller's offline error.
    """
    import open_clip

    log.info(
        "open_clip %s (weights %s): quick_gelu=%s, preprocess=%s, decided by %s",
        weights.model_name,
        weights.pretrained,
        weights.quick_gelu,
        weights.preprocess,
        weights.decided_by,
    )
    offline = offline_reason() if weights.needs_hub() else None  # one quick probe, not a minute of retries
    try:
        # Random weights (no pretrained, no folder) come from the seed, so an SAE trained on them can be scored on
        # the same network again (the SAE's trained_on records the seed); the caller's RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                weights.model_name, cache_dir=cache_dir, device="cpu", **weights.create_kwargs()
            )
    except (RuntimeError, OSError, ValueError) as err:
        if on_missing is not None and offline is not None:  # one message, not a chain of download tracebacks
            raise on_missing(
                OSError(f"the Hugging Face Hub is unreachable ({offline}) and the weights are not in the cache")
            ) from None
        if on_missing is not None and looks_offline(err):
            raise on_missing(err) from err
        raise
    return model, preprocess


def _check_arch(arch: str) -> None:
    import open_clip

    choices = open_clip.list_models()
    if arch not in choices:
        close = difflib.get_close_matches(arch, choices, n=3)
        raise ValueError(
            f"Unknown open_clip architecture {arch!r}"
            + (f" (did you mean {close}?)" if close else "")
            + f": valid choices are {choices}, or 'hf-hub:<org>/<repo>'."
        )


class OpenClipTap(Tap):
    """An open_clip vision tower (native ``VisionTransformer`` or a timm trunk such as SigLIP's)."""

    def __init__(self, spec: ModelSpec, visual: torch.nn.Module, preprocess: Any):
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.visual = visual.eval()
        self._preprocess = preprocess
        self.device = next(visual.parameters()).device
        self.dtype = next(visual.parameters()).dtype
        self.is_timm = hasattr(visual, "trunk")
        if self.is_timm:
            trunk = visual.trunk
            self.n_layers = len(trunk.blocks)
            self.width = trunk.embed_dim
            self.has_cls = getattr(trunk, "cls_token", None) is not None
            self._n_prefix = trunk.num_prefix_tokens
            grid = trunk.patch_embed.grid_size
            self.image_size = trunk.patch_embed.img_size[0]
        else:
            self.n_layers = len(visual.transformer.resblocks)
            self.width = visual.conv1.out_channels
            self.has_cls = True
            self._n_prefix = 1
            grid = visual.grid_size
            self.image_size = visual.image_size[0]
        self._n_patches = grid[0] * grid[1]
        self.embed_dim = getattr(visual, "output_dim", None) or spec.embed_dim
        for field_name in ("n_layers", "width", "has_cls"):
            if getattr(spec, field_name) != getattr(self, field_name):
                log.warning(
                    "model %s: config says %s=%s but the loaded model has %s; using the model's value",
                    spec.name,
                    field_name,
                    getattr(spec, field_name),
                    getattr(self, field_name),
                )

    @property
    def n_tokens(self) -> int:
        return self._n_prefix + self._n_patches

    def preprocess(self, image: Any) -> torch.Tensor:
        return self._preprocess(image.convert("RGB") if hasattr(image, "convert") else image)

    def _blocks_forward(self, images_BCHW: torch.Tensor, layer: int) -> torch.Tensor:
        if self.is_timm:
            trunk = self.visual.trunk
            x = trunk.patch_embed(images_BCHW)
            x = trunk._pos_embed(x)
            x = trunk.patch_drop(x)
            x = trunk.norm_pre(x)
            for block in trunk.blocks[: layer + 1]:
                x = block(x)
            return x
        visual = self.visual
        x = visual._embeds(images_BCHW)  # patchify, CLS, positions, ln_pre
        transformer = visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in transformer.resblocks[: layer + 1]:
            x = block(x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        return x

    def _embed_forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        out = self.visual(images_BCHW)
        return out[0] if isinstance(out, tuple) else out


def load_open_clip_tap(spec: ModelSpec) -> OpenClipTap:
    """Load ``spec`` through :func:`create_open_clip` and wrap its vision tower."""
    model, preprocess = create_open_clip(
        spec_weights(spec), spec.cache_dir, on_missing=lambda err: _missing_weights_error(spec, err)
    )
    visual = model.visual.to(device=resolve_device(spec.device), dtype=torch_dtype(spec.dtype))
    del model
    return OpenClipTap(spec, visual, preprocess)
