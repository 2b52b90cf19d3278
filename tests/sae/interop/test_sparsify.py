"""sparsify hookpoint folders written here as sparsify lays them out, compared with its forward re-implemented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlmsae.sae import TopKSAE
from vlmsae.sae.interop import sparsify

D_IN, N_LATENTS, K = 12, 48, 5


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _write(dpath: Path, cfg_extra: dict | None = None, dtype=torch.float32, skip=False) -> tuple[Path, dict]:
    cfg = {
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": K,
        "multi_topk": False, "skip_connection": skip, "transcode": False, "d_in": D_IN,
    }  # fmt: skip
    cfg.update(cfg_extra or {})
    weights = {
        "encoder.weight": _randn(N_LATENTS, D_IN, seed=1) * 0.5,
        "encoder.bias": _randn(N_LATENTS, seed=2) * 0.3,
        "W_dec": _randn(N_LATENTS, D_IN, seed=3) * 0.4,
        "b_dec": _randn(D_IN, seed=4),
    }
    if skip:
        weights["W_skip"] = _randn(D_IN, D_IN, seed=5)
    weights = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    dpath.mkdir(parents=True, exist_ok=True)
    (dpath / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(dpath / "sae.safetensors"))  # sparsify: safetensors.torch.save_model, same tensors
    return dpath, weights


def _reference(w: dict[str, torch.Tensor], x: torch.Tensor, k: int):
    """sparsify SparseCoder.encode/decode: relu((x - b_dec) W^T + b), top-k of that, sum values * W_dec rows."""
    w = {name: t.double() for name, t in w.items()}
    pre = torch.relu((x.double() - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(k, dim=-1)
    x_hat = torch.stack([(v[:, None] * w["W_dec"][i]).sum(0) for v, i in zip(top.values, top.indices)]) + w["b_dec"]
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return codes.float(), x_hat.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_topk_matches_library_forward(tmp_path, dtype):
    (tmp_path / "config.json").write_text(json.dumps({"model": "openai/clip-vit-large-patch14", "hookpoints": []}))
    dpath, w = _write(tmp_path / "vision_model.encoder.layers.6", dtype=dtype)
    assert sparsify.detect(dpath)
    sae = sparsify.load(dpath)
    assert type(sae) is TopKSAE and sae.cfg.k == K and sae.n_latents == N_LATENTS and not sae.training
    x = _randn(300, D_IN, seed=9) * 1.5
    codes_ref, x_hat_ref = _reference(w, x, K)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), codes_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    assert sae.trained_on["layer"] == 6 and sae.trained_on["model"] == "clip_l14" and sae.trained_on["tokens"] is None
    assert sae.trained_on["format"] == "sparsify" and sae.trained_on["input_normalisation"] == "none"


def test_old_config_without_activation_and_explicit_num_latents(tmp_path):
    dpath, w = _write(tmp_path / "layers.3", {"num_latents": N_LATENTS, "expansion_factor": 99})
    cfg = json.loads((dpath / "cfg.json").read_text())
    del cfg["activation"], cfg["transcode"]  # EleutherAI/sae (2024) files
    (dpath / "cfg.json").write_text(json.dumps(cfg))
    sae = sparsify.load(dpath)
    x = _randn(50, D_IN, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), _reference(w, x, K)[1], atol=1e-5, rtol=1e-5)
    assert sae.trained_on["layer"] == 3 and sae.trained_on["model"] is None


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"activation": "groupmax"}, "groupmax"),
        ({"transcode": True}, "transcoder"),
        ({"signed": True}, "signed"),
        ({"k": 0}, "k must be an integer"),
        ({"expansion_factor": 5}, r"encoder.weight has shape \(48, 12\).*\(60, 12\)"),
    ],
)
def test_unrepresentable_or_inconsistent_folders_are_refused(tmp_path, extra, match):
    dpath, _ = _write(tmp_path / "layers.1", extra)
    with pytest.raises(ValueError, match=match):
        sparsify.load(dpath)


def test_skip_connection_is_refused(tmp_path):
    dpath, _ = _write(tmp_path / "layers.1", skip=True)
    with pytest.raises(ValueError, match="skip_connection"):
        sparsify.load(dpath)


def test_layer_from_hookpoint():
    assert sparsify.layer_from_hookpoint("layers.6") == 6
    assert sparsify.layer_from_hookpoint("vision_model.encoder.layers.23") == 23
    assert sparsify.layer_from_hookpoint("visual.transformer.resblocks.10") == 10
    assert sparsify.layer_from_hookpoint("vision_model.encoder.layers.6.mlp") is None
    assert sparsify.layer_from_hookpoint("embed_tokens") is None
