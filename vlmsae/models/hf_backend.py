"""transformers backend: ``CLIPVisionModel(WithProjection)`` and the vision tower inside LLaVA.

Index convention as everywhere (METHOD §1): block L's output is ``hidden_states[L+1]``. Rather than ask
for all hidden states (which runs every block), the tap runs embeddings -> ``pre_layrnorm`` [sic,
transformers' name] -> ``encoder.layers[:L+1]`` itself and stops. ``layer="last"`` is
``image_embeds`` (post_layernorm(CLS) @ visual_projection) for CLIP; LLaVA's tower has no
projection of its own, so ``last`` is refused there. Weights: ``local_path`` (a ``save_pretrained`` folder)
> ``pretrained`` (a HF id, cached in ``cache_dir``); LLaVA's tower alone comes from :mod:`vlmsae.models.llava`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmsae.models import llava
from vlmsae.models.hub import hub_unreachable, offline_reason
from vlmsae.models.spec import ModelSpec
from vlmsae.models.tap import Tap, resolve_device, torch_dtype
from vlmsae.models.tiny import build_tiny_hf_clip, tiny_model_dpath


class HFVisionTap(Tap):
    """A transformers CLIP-style vision tower: ``embeddings``, ``pre_layrnorm``, ``encoder.layers``."""

    def __init__(
        self,
        spec: ModelSpec,
        tower: nn.Module,
        blocks: nn.ModuleList,
        image_processor: Any,
        projection: nn.Module | None,
    ):
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.tower = tower.eval()
        # transformers 4.x wraps the stack in ``.vision_model``; 5.x puts it on the model itself.
        self.core = getattr(tower, "vision_model", tower)
        self.blocks = blocks
        self.projection = projection
        self.image_processor = image_processor
        config = self.core.config
        self.n_layers = len(blocks)
        self.width = config.hidden_size
        self.embed_dim = projection.out_features if projection is not None else None
        self.has_cls = True
        self.image_size = config.image_size
        self._n_tokens = (config.image_size // config.patch_size) ** 2 + 1
        params = next(tower.parameters())
        self.device, self.dtype = params.device, params.dtype
        self._causal_kwarg = "causal_attention_mask" in inspect.signature(blocks[0].forward).parameters

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    def preprocess(self, image: Any) -> torch.Tensor:
        return self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def _blocks_forward(self, images_BCHW: torch.Tensor, layer: int) -> torch.Tensor:
        x = self.core.embeddings(images_BCHW)
        x = self.core.pre_layrnorm(x)
        kwargs = {"causal_attention_mask": None} if self._causal_kwarg else {}
        for block in self.blocks[: layer + 1]:
            out = block(x, None, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def _embed_forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            raise ValueError(
                f"layer=last (the projected image embedding) is not defined for {self.name}: its vision tower has "
                f"no projection. Use a block index 0..{self.n_layers - 1} (LLaVA-1.5 uses -2, i.e. block "
                f"{self.n_layers - 2})."
            )
        x = self._blocks_forward(images_BCHW, self.n_layers - 1)
        pooled = self.core.post_layernorm(x[:, 0])
        return self.projection(pooled)


def _hf_repo_or_dir(spec: ModelSpec) -> tuple[str, bool]:
    """``(name_or_path, local_files_only)`` for ``from_pretrained``."""
    if spec.local_path:
        path = Path(spec.local_path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"model.local_path={path} is not a folder (model {spec.name!r}): it must hold what save_pretrained "
                "writes (config.json, weights, preprocessor_config.json)."
            )
        return str(path), True
    if not spec.pretrained:
        raise ValueError(
            f"Model {spec.name!r} (backend {spec.backend}) needs model.pretrained=<HF id> or model.local_path."
        )
    return spec.pretrained, offline_reason() is not None  # HF_HUB_OFFLINE, or no Hub within seconds: the cache


def load_hf_clip_tap(spec: ModelSpec) -> HFVisionTap:
    """``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor`` from a HF id, a local folder or the tiny folder."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    if spec.tiny:
        dpath = build_tiny_hf_clip(
            tiny_model_dpath(spec.name, spec.seed, spec.local_path),
            seed=spec.seed,
            image_size=spec.image_size,
            width=spec.width,
            layers=spec.n_layers,
            embed_dim=spec.embed_dim or spec.width,
            patch_size=spec.patch_size,
        )
        repo_or_dir, local_only = str(dpath), True
    else:
        repo_or_dir, local_only = _hf_repo_or_dir(spec)
    kwargs = {"cache_dir": spec.cache_dir, "local_files_only": local_only}
    try:
        dtype = llava.dtype_kwarg(torch_dtype(spec.dtype))
        model = CLIPVisionModelWithProjection.from_pretrained(repo_or_dir, **dtype, **kwargs)
        processor = CLIPImageProcessor.from_pretrained(repo_or_dir, **kwargs)
    except OSError as err:
        offline = None if spec.tiny or spec.local_path else hub_unreachable()
        why = err if offline is None else f"the Hugging Face Hub is unreachable ({offline}) and the model is not cached"
        raise OSError(
            f"Could not load the weights of model {spec.name!r} ({repo_or_dir!r}, cache_dir={spec.cache_dir!r}): "
            f"{why}\n"
            "This machine may be offline and the model not cached. Download it where there is internet "
            f"(`huggingface-cli download {repo_or_dir} --local-dir <folder>`) and pass model.local_path=<folder>, "
            "or point model.cache_dir / HF_HOME at a cache that holds it."
        ) from (None if offline is not None else err)
    model = model.to(resolve_device(spec.device)).eval()
    core = getattr(model, "vision_model", model)
    return HFVisionTap(spec, model, core.encoder.layers, processor, model.visual_projection)


def load_hf_llava_tap(spec: ModelSpec) -> HFVisionTap:
    """The CLIP vision tower of a ``LlavaForConditionalGeneration`` (real or tiny), via ``vlmsae.models.llava``."""
    if spec.tiny:
        tiny_dpath = tiny_model_dpath(spec.name, spec.seed, spec.local_path)
        repo_or_dir = str(llava.build_tiny_llava(tiny_dpath, seed=spec.seed))
    else:
        repo_or_dir = spec.local_path or spec.pretrained or llava.LLAVA_15_7B
    # Only the vision tower's tensors are read (not the 7B language model); block taps need no projector.
    tower, image_processor = llava.load_llava_vision_tower(repo_or_dir, dtype=spec.dtype, cache_dir=spec.cache_dir)
    tower = tower.to(resolve_device(spec.device))
    return HFVisionTap(spec, tower, llava.vision_blocks(tower), image_processor, projection=None)
