"""Model names across libraries: a Hugging Face id (``openai/clip-vit-large-patch14-336``), the bare repo name
the paper's folders use (``clip-vit-large-patch14-336``) or a vlmsae ``conf/model`` name -> vlmsae's name and
pretrained tag. The one table every loader and writer of :mod:`vlmsae.sae.interop` reads."""

from __future__ import annotations

from typing import Any

# Hugging Face id -> (vlmsae conf/model name, pretrained tag as that conf names it)
HF_MODELS: dict[str, tuple[str, str | None]] = {
    "openai/clip-vit-large-patch14-336": ("clip_l14_336", "openai"),
    "openai/clip-vit-large-patch14": ("clip_l14", "openai"),
    "openai/clip-vit-base-patch32": ("clip_b32", "openai"),
    "google/siglip-so400m-patch14-384": ("siglip_so400m", "webli"),
    "llava-hf/llava-1.5-7b-hf": ("llava15_7b", "llava-hf/llava-1.5-7b-hf"),
    "open-clip:timm/vit_base_patch32_clip_224.openai": ("clip_b32", "openai"),  # ViT-Prisma's name (not an HF id)
}
VLMSAE_MODELS = ("clip_b32", "clip_l14", "clip_l14_336", "clip_l14_336_hf", "siglip_so400m", "llava15_7b")


def model_from_name(name: Any) -> tuple[str | None, str | None]:
    """(vlmsae model name, pretrained tag) for a library's model name; (None, None) when unknown."""
    if not isinstance(name, str) or not name:
        return None, None
    if name in VLMSAE_MODELS:
        return name, None
    if name in HF_MODELS:
        return HF_MODELS[name]
    bare = name.split("/")[-1]  # the paper's folders name the repo without its organisation
    return next((value for hf_id, value in HF_MODELS.items() if hf_id.split("/")[-1] == bare), (None, None))


def hf_id(model: Any) -> str:
    """The Hugging Face id of a vlmsae model name (``clip_l14_336`` and ``clip_l14_336_hf`` alike); else as given."""
    for hf_name, (name, _pretrained) in HF_MODELS.items():
        if model in (name, f"{name}_hf"):
            return hf_name
    return model if isinstance(model, str) else ""
