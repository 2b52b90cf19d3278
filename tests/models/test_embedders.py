"""Image embedders for MS: the tiny CLIP and a tiny DINOv2 load through the real code paths."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlmsae.config import to_typed
from vlmsae.models.embedders import EmbedderSpec, load_embedder


def _images(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_pixels_embedder_is_deterministic_and_meaningful() -> None:
    emb = load_embedder({"name": "pixels", "backend": "pixels", "arch": "pixels", "embed_dim": 16, "batch_size": 2})
    red, red2, blue = (Image.new("RGB", (20, 20), c) for c in ((250, 10, 10), (235, 30, 20), (10, 10, 250)))
    out = emb.embed([red, red2, blue])
    assert out.shape == (3, 16) and out.dtype == torch.float32
    again = load_embedder(EmbedderSpec(name="pixels", backend="pixels", embed_dim=16)).embed([red, red2, blue])
    torch.testing.assert_close(out, again)  # same seed, same weights (batching only changes rounding)
    cos = torch.nn.functional.cosine_similarity
    assert cos(out[0], out[1], dim=0) > cos(out[0], out[2], dim=0) + 0.3


def test_tiny_open_clip_embedder(tmp_path, monkeypatch, compose_cfg) -> None:
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path))
    cfg = compose_cfg("monosemanticity", ["embedder=tiny", "sae_path=x"])
    emb = load_embedder(cfg.embedder)
    images = _images(5)
    out = emb.embed(images)
    assert out.shape == (5, 32) and torch.isfinite(out).all()
    assert (tmp_path / "models" / "embedder_tiny" / "open_clip_config.json").exists()
    with torch.no_grad():
        ref = emb.model.encode_image(torch.stack([emb.preprocess(im.convert("RGB")) for im in images]))
    torch.testing.assert_close(out, ref.float())
    text = emb.embed_text(["a red circle", "a blue square"])
    assert text.shape == (2, 32) and not torch.allclose(text[0], text[1])


def test_hf_dinov2_embedder_from_local_folder(tmp_path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    processor = BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    model.save_pretrained(tmp_path / "dino")
    processor.save_pretrained(tmp_path / "dino")
    emb = load_embedder(
        {
            "name": "dino_tiny",
            "backend": "hf",
            "arch": "facebook/dinov2-base",
            "local_path": str(tmp_path / "dino"),
            "batch_size": 2,
        }
    )
    images = _images(3)
    out = emb.embed(images)
    with torch.no_grad():
        ref = model(**processor(images=[im.convert("RGB") for im in images], return_tensors="pt")).pooler_output
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, ref)


def test_bad_specs_are_clear(tmp_path) -> None:
    with pytest.raises(ValueError, match="backend"):
        EmbedderSpec(name="x", backend="tensorflow")
    with pytest.raises(ValueError, match="Unknown embedder field"):
        to_typed({"name": "x", "backend": "pixels", "colour": 3}, EmbedderSpec)
    with pytest.raises(FileNotFoundError, match="local_path"):
        load_embedder({"name": "x", "backend": "hf", "arch": "a/b", "local_path": str(tmp_path / "missing")})


@pytest.mark.slow
def test_offline_error_names_the_fix(tmp_path) -> None:
    code = (
        "from vlmsae.models.embedders import load_embedder\n"
        "load_embedder(dict(name='clip_b32', backend='open_clip', arch='ViT-B-32', pretrained='openai', "
        f"cache_dir='{tmp_path}'))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "offline" in proc.stderr and "embedder.local_path" in proc.stderr
