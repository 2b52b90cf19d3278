"""Vision encoders to tap: ``load_tap(spec)`` returns a :class:`~vlmsae.models.tap.Tap` for any backend.

```python
from vlmsae.models import ModelSpec, load_tap, select_tokens
tap = load_tap(job.model)                    # or get_model_spec("tiny")
x_BCHW = torch.stack([tap.preprocess(img) for img in pil_images])
acts_BTD = tap.forward_to(x_BCHW, layer=22)            # block 22's output, later blocks never run
rows_ND, token_idx_N, image_idx_N = select_tokens(acts_BTD, "cls", has_cls=tap.has_cls)
```
Heavy libraries (open_clip, transformers) are imported by the backend that needs them.
"""

from __future__ import annotations

from vlmsae.config import to_typed
from vlmsae.models.hf_backend import load_hf_clip_tap, load_hf_llava_tap
from vlmsae.models.open_clip_backend import load_open_clip_tap
from vlmsae.models.spec import BACKENDS, ModelSpec, check_model_seed, get_model_spec, list_models
from vlmsae.models.tap import TOKEN_CHOICES, Tap, resolve_layer, select_tokens, torch_dtype
from vlmsae.models.tiny import build_tiny_hf_clip, build_tiny_open_clip, models_home, tiny_model_dpath, vlmsae_home

__all__ = [
    "BACKENDS",
    "TOKEN_CHOICES",
    "ModelSpec",
    "Tap",
    "build_tiny_hf_clip",
    "build_tiny_open_clip",
    "get_model_spec",
    "list_models",
    "load_tap",
    "models_home",
    "resolve_layer",
    "select_tokens",
    "tiny_model_dpath",
    "torch_dtype",
    "vlmsae_home",
]


def load_tap(spec: ModelSpec | dict | str) -> Tap:
    """A tap for ``spec``: a :class:`ModelSpec`, a dict/DictConfig of its fields, or a registered model name."""
    if isinstance(spec, str):
        spec = get_model_spec(spec)
    elif not isinstance(spec, ModelSpec):
        spec = to_typed(spec, ModelSpec)
    check_model_seed(spec)  # a seed is honoured (tiny or random weights) or refused, never dropped
    loaders = {"open_clip": load_open_clip_tap, "hf_clip": load_hf_clip_tap, "hf_llava": load_hf_llava_tap}
    if spec.backend not in loaders:
        raise ValueError(f"Unknown backend {spec.backend!r} for model {spec.name!r}: use one of {list(BACKENDS)}.")
    return loaders[spec.backend](spec)
