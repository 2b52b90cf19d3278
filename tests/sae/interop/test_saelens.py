"""SAELens folders: written here exactly as SAELens lays them out (random weights), loaded through vlmsae, and
compared with SAELens' forward re-implemented below; export -> SAELens forward / re-import is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmsae.sae import JumpReLUSAE, ReluSAE, SAEConfig, TopKSAE, build_sae, set_input_scale_
from vlmsae.sae.interop import saelens

D_IN, D_SAE = 12, 40
ATOL = 5e-6  # issue 23: every published SAE loads with codes within 5e-6


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _weights(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """SAELens state_dict keys and shapes (W_enc [d_in, d_sae], W_dec [d_sae, d_in])."""
    out = {
        "W_enc": _randn(D_IN, D_SAE, seed=seed) * 0.5,
        "W_dec": _randn(D_SAE, D_IN, seed=seed + 1) * 0.3,  # rows not unit norm on purpose
        "b_dec": _randn(D_IN, seed=seed + 2) * 0.5,
    }
    if arch == "gated":
        out.update(
            b_gate=_randn(D_SAE, seed=seed + 3) * 0.5,
            r_mag=_randn(D_SAE, seed=seed + 4) * 0.3,
            b_mag=_randn(D_SAE, seed=seed + 5) * 0.5,
        )
    else:
        out["b_enc"] = _randn(D_SAE, seed=seed + 3) * 0.5
    if arch == "jumprelu":
        out["threshold"] = _randn(D_SAE, seed=seed + 6).abs() * 0.6
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        out["topk_threshold"] = torch.tensor(0.35, dtype=torch.double)
    return out


def _v6_cfg(arch: str, **fields) -> dict:
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": arch,
        "metadata": {
            "sae_lens_version": "6.18.0",
            "model_name": "openai/clip-vit-large-patch14-336",
            "hook_name": "blocks.22.hook_resid_post",
            "hook_head_index": None,
        },
    }
    if arch == "topk":
        cfg.update(k=4, rescale_acts_by_decoder_norm=False)
    cfg.update(fields)
    return cfg


def _write(dpath: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    dpath.mkdir(parents=True, exist_ok=True)
    (dpath / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(dpath / "sae_weights.safetensors"))
    return dpath


def _reference(cfg: dict, w: dict[str, torch.Tensor], x: torch.Tensor, sf: float | None = None):
    """SAELens encode/decode (v6 sae.py, *_sae.py; v5 activation_fn topk), from the formulas, in float64."""
    w = {k: v.double() for k, v in w.items()}
    x = x.double()
    arch = cfg.get("architecture", "standard")
    if arch == "standard" and cfg.get("activation_fn_str") == "topk":
        arch, k = "topk", cfg["activation_fn_kwargs"]["k"]
    else:
        k = cfg.get("k")
    x_in = x * sf if sf is not None else x  # the training-time ActivationScaler
    sae_in = x_in - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    norms = w["W_dec"].norm(dim=-1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", arch in ("batchtopk", "matryoshka_batchtopk"))
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
        f = gate * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    else:
        h = sae_in @ w["W_enc"] + w["b_enc"]
        if arch == "standard":
            f = torch.relu(h)
        elif arch == "jumprelu":
            f = torch.relu(h) * (h > w["threshold"])
        elif arch == "topk":
            h = h * norms if rescale else h
            top = torch.topk(h, k, dim=-1)
            f = torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
        else:  # batchtopk training checkpoint: what save_inference_model turns into a jumprelu
            h = h * norms if rescale else h
            f = torch.relu(h) * (h > w["topk_threshold"])
    f_dec = f / norms if (arch != "gated" and arch not in ("standard", "jumprelu") and rescale) else f
    for key in ("scaling_factor", "finetuning_scaling_factor"):  # SAELens 5: decode (f * s) W_dec + b_dec
        if key in w:
            f_dec = f_dec * w[key]
    x_hat = f_dec @ w["W_dec"] + w["b_dec"]
    if sf is not None:
        x_hat = x_hat / sf
    return f.float(), x_hat.float()


def _check_same(sae, cfg, w, sf=None, n=300, seed=7):
    x = _randn(n, D_IN, seed=seed) * 1.5
    codes_ref, x_hat_ref = _reference(cfg, w, x, sf)
    with torch.no_grad():
        codes, x_hat = sae.encode(x), sae(x)
    assert (codes_ref > 0).any(dim=1).float().mean() > 0.5, "test data should activate latents"
    torch.testing.assert_close(codes, codes_ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(x_hat, x_hat_ref, atol=ATOL, rtol=ATOL)


V6_CASES = {
    "standard": ("standard", {}, ReluSAE),
    "standard_no_bdec": ("standard", {"apply_b_dec_to_input": False}, ReluSAE),
    "topk": ("topk", {}, TopKSAE),
    "topk_rescale": ("topk", {"rescale_acts_by_decoder_norm": True}, TopKSAE),
    "jumprelu": ("jumprelu", {}, JumpReLUSAE),
    "jumprelu_no_bdec": ("jumprelu", {"apply_b_dec_to_input": False}, JumpReLUSAE),
    "gated": ("gated", {}, JumpReLUSAE),
    "gated_no_bdec": ("gated", {"apply_b_dec_to_input": False}, JumpReLUSAE),
    "batchtopk_training_ckpt": ("batchtopk", {"k": 4.0}, JumpReLUSAE),
    "matryoshka_training_ckpt": (
        "matryoshka_batchtopk",
        {"k": 4.0, "rescale_acts_by_decoder_norm": False},
        JumpReLUSAE,
    ),
}


@pytest.mark.parametrize("case", sorted(V6_CASES))
def test_v6_folders_match_saelens_forward(tmp_path, case):
    arch, fields, cls = V6_CASES[case]
    cfg, w = _v6_cfg(arch, **fields), _weights(arch)
    dpath = _write(tmp_path / case, cfg, w)
    assert saelens.detect(dpath)
    sae = saelens.load(dpath)
    assert type(sae) is cls and not sae.training
    _check_same(sae, cfg, w)
    assert sae.trained_on["model"] == "clip_l14_336" and sae.trained_on["pretrained"] == "openai"
    assert sae.trained_on["layer"] == 22 and sae.trained_on["tokens"] is None
    assert sae.trained_on["format"] == "saelens" and sae.trained_on["original_path"] == str(dpath)
    assert sae.trained_on["input_normalisation"] == "none"


def test_batchtopk_exported_as_jumprelu_keeps_one_threshold(tmp_path):
    """SAELens' BatchTopK inference file: jumprelu with threshold = ones * topk_threshold."""
    w = _weights("jumprelu")
    w["threshold"] = torch.full((D_SAE,), 0.3)
    cfg = _v6_cfg("jumprelu")
    sae = saelens.load(_write(tmp_path, cfg, w))
    _check_same(sae, cfg, w)
    torch.testing.assert_close(sae.threshold.detach(), torch.full((D_SAE,), 0.3))


def test_v5_configs(tmp_path):
    # v5 standard: hook_point / hook_point_layer naming, bool normalize_activations, a finetuning scaling factor.
    w = _weights("standard", seed=3)
    w["scaling_factor"] = _randn(D_SAE, seed=9).abs() + 0.5
    cfg = {
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "relu",
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": True, "context_size": 128,
        "model_name": "openai/clip-vit-base-patch32", "hook_point": "blocks.7.hook_resid_pre", "hook_point_layer": 7,
        "hook_point_head_index": None, "normalize_activations": False, "dtype": "torch.float32", "device": "cpu",
        "sae_lens_training_version": "3.0.0",
    }  # fmt: skip
    sae = saelens.load(_write(tmp_path / "v5std", cfg, w))
    _check_same(sae, cfg, w)
    assert (
        sae.trained_on["model"] == "clip_b32" and sae.trained_on["layer"] == 6
    )  # resid_pre of block 7 = block 6 output
    # v5 topk: activation_fn_str "topk" + activation_fn_kwargs.k, architecture still "standard".
    w = _weights("topk", seed=5)
    cfg = {
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": False, "hook_name": "blocks.3.hook_resid_post",
        "hook_layer": 3, "model_name": "some-vit", "normalize_activations": "none", "dtype": "float32",
    }  # fmt: skip
    sae = saelens.load(_write(tmp_path / "v5topk", cfg, w))
    assert type(sae) is TopKSAE and sae.cfg.k == 3
    _check_same(sae, cfg, w)
    assert sae.trained_on["layer"] == 3 and sae.trained_on["model"] is None


def test_expected_average_only_in_is_folded_from_activation_scaler(tmp_path):
    w, cfg = _weights("jumprelu", seed=11), _v6_cfg("jumprelu", normalize_activations="expected_average_only_in")
    dpath = _write(tmp_path, cfg, w)
    with pytest.raises(ValueError, match="activation_scaler.json"):
        saelens.load(dpath)
    sf = 0.37
    _check_same(saelens.load(dpath, norm_scaling_factor=sf), cfg, w, sf=sf)
    (dpath / "activation_scaler.json").write_text(json.dumps({"scaling_factor": sf}))
    sae = saelens.load(dpath)
    _check_same(sae, cfg, w, sf=sf)
    assert "0.37" in sae.trained_on["input_normalisation"]
    (dpath / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None}))
    _check_same(saelens.load(dpath), cfg, w, sf=None)  # SAELens' scaler with no factor: identity


TRAINING_CKPTS = {  # SAELens training configs: rescale_acts_by_decoder_norm defaults to true
    "topk": {"k": 4, "rescale_acts_by_decoder_norm": True},
    "batchtopk": {"k": 4.0},
    "matryoshka_batchtopk": {"k": 4.0, "rescale_acts_by_decoder_norm": True},
}


def _saelens_end_of_training(cfg: dict, w: dict[str, torch.Tensor], sf: float) -> dict[str, torch.Tensor]:
    """What SAELens does to a training SAE when training ends, step by step in its order (float64): the trainer's
    fold_activation_norm_scaling_factor, then save_inference_model's _fold_norm_topk; the batchtopk threshold is
    divided by sf (the codes are), so the latents that fired in training fire."""
    w = {k: v.double() for k, v in w.items()}
    W_enc, W_dec, b_dec, b_enc = w["W_enc"] * sf, w["W_dec"] / sf, w["b_dec"] / sf, w["b_enc"]
    norms = W_dec.norm(dim=-1)
    out = {"W_enc": W_enc * norms, "b_enc": b_enc * norms, "W_dec": W_dec / norms[:, None], "b_dec": b_dec}
    if "topk_threshold" in w:
        out["threshold"] = torch.full((D_SAE,), float(w["topk_threshold"]) / sf, dtype=torch.double)
    return out


@pytest.mark.parametrize("arch", sorted(TRAINING_CKPTS))
def test_training_checkpoint_with_scaler_and_decoder_norm_rescale(tmp_path, arch):
    """A mid-run checkpoint (cfg still expected_average_only_in, activation_scaler.json beside it) of an SAE that
    rescales by the decoder norms: the codes are those of the SAE SAELens writes at the end of training."""
    sf = 2.7
    cfg = _v6_cfg(arch, normalize_activations="expected_average_only_in", **TRAINING_CKPTS[arch])
    w = _weights(arch, seed=13)
    dpath = _write(tmp_path / arch, cfg, w)
    (dpath / "activation_scaler.json").write_text(json.dumps({"scaling_factor": sf}))
    sae = saelens.load(dpath)
    x = _randn(300, D_IN, seed=7) * 1.5
    codes_train, x_hat_ref = _reference(cfg, w, x, sf)  # the training forward, on x * sf
    with torch.no_grad():
        codes, x_hat = sae.encode(x), sae(x)
    assert (codes_train > 0).any(dim=1).float().mean() > 0.5, "test data should activate latents"
    torch.testing.assert_close(codes, codes_train / sf, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(x_hat, x_hat_ref, atol=ATOL, rtol=ATOL)
    # The same, from SAELens' own end-of-training folding applied to the file's weights.
    final = _saelens_end_of_training(cfg, w, sf)
    h = (x.double() - final["b_dec"]) @ final["W_enc"] + final["b_enc"]
    if arch == "topk":
        top = torch.topk(h, 4, dim=-1)
        f = torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
    else:
        f = torch.relu(h) * (h > final["threshold"])
    torch.testing.assert_close(codes, f.float(), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(sae.W_dec.detach(), final["W_dec"].float(), atol=ATOL, rtol=ATOL)


def test_v5_finetuning_scaling_factor_is_applied_to_the_decoder(tmp_path):
    """SAELens 5 with finetuning_scaling_factor=true saves the parameter under its own name and decodes
    (f * s) W_dec + b_dec; both SAELens versions refuse to load that file, vlmsae applies s as v5's decode does."""
    w = _weights("standard", seed=17)
    w["finetuning_scaling_factor"] = _randn(D_SAE, seed=19).abs() * 3 + 0.2
    cfg = {
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "relu",
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": True, "model_name": "gpt2",
        "hook_name": "blocks.2.hook_resid_post", "hook_layer": 2, "normalize_activations": "none",
        "dtype": "float32", "device": "cpu", "sae_lens_training_version": "5.11.0",
    }  # fmt: skip
    sae = saelens.load(_write(tmp_path / "ft", cfg, w))
    _check_same(sae, cfg, w)
    plain = {k: v for k, v in w.items() if k != "finetuning_scaling_factor"}
    x = _randn(50, D_IN, seed=2)
    _, x_hat_without = _reference(cfg, plain, x)
    assert (sae(x).detach() - x_hat_without).abs().max() > 0.1, "the factor must matter in this test"
    # A factor the config does not switch on is ambiguous: refused, naming the fix.
    cfg_off = dict(cfg, finetuning_scaling_factor=False)
    with pytest.raises(ValueError, match=r"finetuning_scaling_factor=false.*set \"finetuning_scaling_factor\": true"):
        saelens.load(_write(tmp_path / "off", cfg_off, w))
    bad = dict(w, finetuning_scaling_factor=w["finetuning_scaling_factor"][:-1])
    with pytest.raises(ValueError, match=r"finetuning_scaling_factor has shape \(39,\)"):
        saelens.load(_write(tmp_path / "bad", cfg, bad))


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_per_input_normalisation_is_refused(tmp_path, norm):
    dpath = _write(tmp_path, _v6_cfg("standard", normalize_activations=norm), _weights("standard"))
    with pytest.raises(ValueError, match=f"normalize_activations='{norm}'.*not an affine map"):
        saelens.load(dpath)


def test_bad_folders_are_refused(tmp_path):
    w = _weights("standard")
    with pytest.raises(ValueError, match="architecture='transcoder' is not supported"):
        saelens.load(_write(tmp_path / "a", _v6_cfg("transcoder"), w))
    bad = dict(w, W_enc=w["W_enc"][:, :-1])
    with pytest.raises(ValueError, match=r"W_enc has shape \(12, 39\).*\(12, 40\)"):
        saelens.load(_write(tmp_path / "b", _v6_cfg("standard"), bad))
    with pytest.raises(ValueError, match=r"lacks \['threshold'\]"):
        saelens.load(_write(tmp_path / "c", _v6_cfg("jumprelu"), w))
    with pytest.raises(ValueError, match="integer k"):
        saelens.load(_write(tmp_path / "d", _v6_cfg("topk", k=0), w))
    with pytest.raises(ValueError, match="hook_z"):
        saelens.load(_write(tmp_path / "e", _v6_cfg("standard", reshape_activations="hook_z"), w))
    assert not saelens.detect(tmp_path)


def test_layer_from_hook_name():
    assert saelens.layer_from_hook_name("blocks.0.hook_resid_post") == 0
    assert saelens.layer_from_hook_name("blocks.11.hook_resid_post") == 11
    assert saelens.layer_from_hook_name("blocks.11.hook_resid_pre") == 10
    assert saelens.layer_from_hook_name("blocks.0.hook_resid_pre") is None
    assert saelens.layer_from_hook_name("blocks.5.hook_mlp_out") is None
    assert saelens.layer_from_hook_name(None) is None


# ---------------------------------------------------------------------------------------------- export

# What SAELens' load_from_disk reads (sae_lens/saes/sae.py SAEConfig + handle_config_defaulting), per architecture.
REQUIRED_FIELDS = {
    "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
    "architecture", "metadata",
}  # fmt: skip
SAELENS_KEYS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
}


def _vlmsae_sae(arch: str, threshold: float | None = 0.2):
    extra = {"group_fractions": (0.25, 0.75)} if arch == "matryoshka" else {}
    sae = build_sae(SAEConfig(arch=arch, d_in=D_IN, n_latents=D_SAE, k=4, **extra), seed=4)
    with torch.no_grad():
        sae.W_enc.add_(0.2 * _randn(D_SAE, D_IN, seed=1))
        sae.b_enc.copy_(_randn(D_SAE, seed=2) * 0.3)
        sae.b_dec.copy_(_randn(D_IN, seed=3))
        if arch == "jumprelu":
            sae.threshold.copy_(_randn(D_SAE, seed=5).abs() * 0.5)
        elif threshold is not None:
            sae.threshold.fill_(threshold)
    set_input_scale_(sae, 2.5)  # export folds it: the folder takes raw activations
    sae.trained_on = {"model": "clip_l14_336", "pretrained": "openai", "layer": 22, "tokens": "cls"}
    return sae.eval()


EXPORTS = {
    "relu": ("relu", 0.2, "standard", ReluSAE),
    "topk": ("topk", None, "topk", TopKSAE),
    "batchtopk": ("batchtopk", 0.2, "jumprelu", JumpReLUSAE),
    "batchtopk_no_threshold": ("batchtopk", None, "topk", TopKSAE),
    "matryoshka": ("matryoshka", 0.2, "jumprelu", JumpReLUSAE),
    "jumprelu": ("jumprelu", None, "jumprelu", JumpReLUSAE),
}


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_is_what_saelens_loads_and_reimports_exactly(tmp_path, case):
    arch, threshold, sl_arch, cls = EXPORTS[case]
    sae = _vlmsae_sae(arch, threshold)
    dpath = saelens.save(sae, tmp_path / case)
    assert sorted(p.name for p in dpath.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((dpath / "cfg.json").read_text())
    assert set(cfg) >= REQUIRED_FIELDS and cfg["architecture"] == sl_arch
    assert cfg["dtype"] == "float32" and cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    from packaging.version import Version

    assert Version(cfg["metadata"]["sae_lens_version"]) >= Version("6.0.0")  # else SAELens takes its v5 path
    assert cfg["metadata"]["hook_name"] == "blocks.22.hook_resid_post"
    if sl_arch == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    weights = load_file(str(dpath / "sae_weights.safetensors"))
    assert set(weights) == SAELENS_KEYS[sl_arch]  # SAELens loads strictly: no extra keys
    assert weights["W_enc"].shape == (D_IN, D_SAE) and weights["W_dec"].shape == (D_SAE, D_IN)
    assert all(t.dtype == torch.float32 for t in weights.values())
    # SAELens' forward on the exported files == the vlmsae SAE on raw activations.
    _check_same(sae, cfg, weights)
    # ... and vlmsae reads it back exactly.
    back = saelens.load(dpath)
    assert type(back) is cls
    x = _randn(200, D_IN, seed=8) * 2
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(back(x), sae(x), atol=ATOL, rtol=ATOL)
    assert {k: back.trained_on[k] for k in ("model", "pretrained", "layer", "tokens")} == sae.trained_on
    assert back.trained_on["format"] == "saelens"


def test_an_export_from_before_the_trained_on_rename_keeps_its_exact_record(tmp_path):
    """vlmsae's own export wrote the training record as ``metadata.vlmsae_source`` before ``vlmsae_trained_on``."""
    sae = _vlmsae_sae("topk", None)
    sae.trained_on = {**sae.trained_on, "tokens": "patches"}  # only the exact record knows the tokens
    dpath = saelens.save(sae, tmp_path / "old")
    cfg = json.loads((dpath / "cfg.json").read_text())
    cfg["metadata"]["vlmsae_source"] = cfg["metadata"].pop("vlmsae_trained_on")
    (dpath / "cfg.json").write_text(json.dumps(cfg))
    back = saelens.load(dpath).trained_on
    assert {k: back[k] for k in ("model", "pretrained", "layer", "tokens")} == sae.trained_on
