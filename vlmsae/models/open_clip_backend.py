"""open_clip backend: CLIP ViT-B/32, ViT-L/14, ViT-L/14-336 (native ViTs) and SigLIP (a timm trunk).

Weights come from, in order of precedence: the tiny model folder (``tiny: true``), ``local_path``
(an open_clip folder with ``open_clip_config.json``, a folder holding one checkpoint, or a
checkpoint file: .safetensors/.bin/.pt/.npz), ``arch="hf-hub:org/repo"``, or ``pretrained=<tag>``
(downloaded into ``cache_dir``). OpenAI weights need QuickGELU; ``pretrained: openai`` turns it on.
Only the vision tower is kept. The forward runs the blocks itself and stops after block L.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import torch

from vlmsae.models.spec import ModelSpec
from vlmsae.models.tap import Tap, resolve_device, torch_dtype
from vlmsae.models.tiny import OPEN_CLIP_CONFIG, build_tiny_open_clip, tiny_model_dpath

log = logging.getLogger(__name__)
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def _missing_weights_error(spec: ModelSpec, err: BaseException) -> RuntimeError:
    import open_clip

    repo = "<repo>"
    if spec.pretrained and not spec.arch.startswith("hf-hub:"):
        repo = (open_clip.get_pretrained_cfg(spec.arch, spec.pretrained) or {}).get("hf_hub", repo).rstrip("/") or repo
    elif spec.arch.startswith("hf-hub:"):
        repo = spec.arch[len("hf-hub:"):]
    return RuntimeError(
        f"Could not load the weights of model {spec.name!r} (open_clip arch={spec.arch!r}, "
        f"pretrained={spec.pretrained!r}, cache_dir={spec.cache_dir!r}): {err}\n"
        "This machine may be offline and the weights not cached. Download them where there is internet "
        f"(e.g. `python -c \"import open_clip; open_clip.create_model('{spec.arch}', pretrained='{spec.pretrained}', "
        f"cache_dir='<dir>')\"` or `huggingface-cli download {repo} --local-dir <dir>`) and pass "
        "model.local_path=<checkpoint file or folder>, or point model.cache_dir at a cache that holds them."
    )


def _checkpoint_in_dir(dpath: Path) -> Path | None:
    files = sorted(p for p in dpath.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
    files.sort(key=lambda p: p.suffix != ".safetensors")  # prefer safetensors (no pickles)
    return files[0] if files else None


def _resolve_source(spec: ModelSpec) -> tuple[str, str | None]:
    """``(model_name, pretrained)`` for ``open_clip.create_model`` from the spec's weight fields."""
    import open_clip

    if spec.tiny:
        dpath = Path(spec.local_path).expanduser() if spec.local_path else tiny_model_dpath(spec.name)
        build_tiny_open_clip(dpath, seed=int(spec.extra.get("seed", 0)))
        return f"local-dir:{dpath}", None
    if spec.local_path:
        path = Path(spec.local_path).expanduser()
        if path.is_dir():
            if (path / OPEN_CLIP_CONFIG).exists():
                return f"local-dir:{path}", None
            ckpt = _checkpoint_in_dir(path)
            if ckpt is None:
                raise FileNotFoundError(
                    f"model.local_path={path} holds neither {OPEN_CLIP_CONFIG} nor a checkpoint "
                    f"({', '.join(_CHECKPOINT_SUFFIXES)}) for model {spec.name!r}."
                )
            path = ckpt
        elif not path.is_file():
            raise FileNotFoundError(f"model.local_path={path} does not exist (model {spec.name!r}).")
        _check_arch(spec.arch)
        return spec.arch, str(path)
    if spec.arch.startswith("hf-hub:") or spec.arch.startswith("local-dir:"):
        return spec.arch, None
    _check_arch(spec.arch)
    if spec.pretrained is None:
        log.warning("model %s: no pretrained weights given, using a RANDOM %s (fine for benchmarks only)",
                    spec.name, spec.arch)
        return spec.arch, None
    if Path(spec.pretrained).expanduser().is_file():
        return spec.arch, str(Path(spec.pretrained).expanduser())
    tags = open_clip.list_pretrained_tags_by_model(spec.arch)
    if spec.pretrained not in tags:
        raise ValueError(
            f"Unknown pretrained tag {spec.pretrained!r} for open_clip model {spec.arch!r} (model {spec.name!r}): "
            f"valid tags are {tags}, or give a checkpoint file/folder with model.local_path=<path>."
        )
    return spec.arch, spec.pretrained


def _check_arch(arch: str) -> None:
    import open_clip

    choices = open_clip.list_models()
    if arch not in choices:
        close = difflib.get_close_matches(arch, choices, n=3)
        raise ValueError(
            f"Unknown open_clip architecture {arch!r}" + (f" (did you mean {close}?)" if close else "")
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
                log.warning("model %s: config says %s=%s but the loaded model has %s; using the model's value",
                            spec.name, field_name, getattr(spec, field_name), getattr(self, field_name))

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
    """Load ``spec`` through ``open_clip.create_model_and_transforms`` and wrap its vision tower."""
    import open_clip

    model_name, pretrained = _resolve_source(spec)
    quick_gelu = bool(spec.extra.get("quick_gelu", spec.pretrained == "openai"))
    device = resolve_device(spec.device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, cache_dir=spec.cache_dir, force_quick_gelu=quick_gelu,
            device="cpu",
        )
    except (RuntimeError, OSError) as err:
        text = str(err).lower()
        if any(word in text for word in ("download", "connect", "offline", "resolve", "hub", "not found", "404")):
            raise _missing_weights_error(spec, err) from err
        raise
    visual = model.visual.to(device=device, dtype=torch_dtype(spec.dtype))
    del model
    return OpenClipTap(spec, visual, preprocess)
