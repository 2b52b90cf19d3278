"""vlmsae.studies.ms_study: the CLIP zero-shot splice of an SAE into its own source CLIP."""

from __future__ import annotations

from vlmsae.sae import SAEConfig, build_sae
from vlmsae.studies.ms_study import clip_zero_shot


def test_clip_zero_shot_row(tmp_path, monkeypatch):
    """The CLIP zero-shot splice for an open_clip-sourced SAE (the tiny open_clip), skipped with a note otherwise."""
    from PIL import Image

    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    llava_sae = build_sae(SAEConfig(arch="topk", d_in=32, n_latents=64, k=8), seed=0)
    llava_sae.trained_on = {"model": "tiny_llava", "layer": 2}
    assert "hf_llava" in clip_zero_shot(llava_sae, None, "a photo of a {}.", 10, 4)["skipped"]
    clip_sae = build_sae(SAEConfig(arch="topk", d_in=64, n_latents=128, k=6), seed=0)
    clip_sae.trained_on = {"model": "tiny", "layer": 2, "tokens": "all"}
    assert "zero_shot_images" in clip_zero_shot(clip_sae, None, "a photo of a {}.", 10, 4)["skipped"]
    for c in ("red", "blue"):
        (tmp_path / "classes" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), c).save(tmp_path / "classes" / c / f"{i}.png")
    out = clip_zero_shot(clip_sae, str(tmp_path / "classes"), "a photo of a {}.", 10, 4)
    assert out["n_images"] == 6 and out["n_classes"] == 2 and out["kl"] >= 0 and 0 <= out["top1_agreement"] <= 1
