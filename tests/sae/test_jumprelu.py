"""JumpReLU SAE: the libraries' inference rule, per-latent thresholds through save/load, and STE training."""

from __future__ import annotations

import json

import pytest
import torch

from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.metrics.seed_matching import max_cosine
from vlmsae.sae import JumpReLUSAE, SAEConfig, build_sae, load_sae, save_sae, set_input_scale_, train_steps

D_IN, N_LATENTS = 16, 48


def _random_jumprelu(seed: int = 0) -> JumpReLUSAE:
    sae = build_sae(SAEConfig(arch="jumprelu", d_in=D_IN, n_latents=N_LATENTS), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(N_LATENTS, D_IN, generator=g))
        sae.b_enc.copy_(torch.randn(N_LATENTS, generator=g) * 0.5)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        # Per-latent thresholds of both signs: a negative one must act like a plain ReLU.
        sae.threshold.copy_(torch.randn(N_LATENTS, generator=g).abs() * 0.8 - 0.2)
    return sae.eval()


def _reference_codes(x, W_enc_DF, b_enc_F, b_dec_D, theta_F):
    """SAELens JumpReLUSAE.encode: h = (x - b_dec) W_enc + b_enc; relu(h) * (h > theta)."""
    h = (x - b_dec_D) @ W_enc_DF + b_enc_F
    return torch.relu(h) * (h > theta_F).float()


def test_build_gives_per_latent_threshold_parameter():
    sae = build_sae(SAEConfig(arch="jumprelu", d_in=D_IN, n_latents=N_LATENTS))
    assert isinstance(sae, JumpReLUSAE) and sae.arch == "jumprelu"
    assert isinstance(sae.threshold, torch.nn.Parameter) and sae.threshold.shape == (N_LATENTS,)
    assert "threshold" not in dict(sae.named_buffers())


def test_encode_matches_library_rule_with_per_latent_thresholds():
    sae = _random_jumprelu()
    x = torch.randn(200, D_IN) * 2
    want = _reference_codes(x, sae.W_enc.T.detach(), sae.b_enc.detach(), sae.b_dec.detach(), sae.threshold.detach())
    with torch.no_grad():
        codes = sae.encode(x)
        torch.testing.assert_close(codes, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(sae(x), want @ sae.W_dec + sae.b_dec, atol=1e-5, rtol=0)
    # The thresholds really select: some latents have h > 0 but below their threshold, and those are off.
    h = sae.encode_pre(x).detach()
    gated_off = (h > 0) & (h <= sae.threshold.detach())
    assert gated_off.any() and bool((codes[gated_off] == 0).all())
    # dictionary_learning writes it relu(h * (h > theta)): the same numbers.
    torch.testing.assert_close(codes, torch.relu(h * (h > sae.threshold.detach())), atol=1e-6, rtol=0)


def test_save_load_round_trip_keeps_per_latent_thresholds_and_folds_scale(tmp_path):
    sae = _random_jumprelu()
    set_input_scale_(sae, 3.0)
    x = torch.randn(100, D_IN) * 2
    with torch.no_grad():
        codes, x_hat = sae.encode(x), sae(x)
    dpath = save_sae(sae, tmp_path / "sae", trained_on={"model": "tiny", "layer": 1})
    info = json.loads((dpath / "config.json").read_text())
    assert info["arch"] == "jumprelu" and info["threshold"] is None  # per-latent: the tensor file has them
    loaded = load_sae(dpath)
    assert type(loaded) is JumpReLUSAE and loaded.threshold.shape == (N_LATENTS,)
    assert float(loaded.input_scale) == 1.0 and float(sae.input_scale) == 3.0
    torch.testing.assert_close(loaded.threshold.detach(), sae.threshold.detach() / 3.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), codes, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(x), x_hat, atol=1e-5, rtol=1e-5)


def test_uniform_threshold_is_recorded_in_config_json(tmp_path):
    sae = _random_jumprelu()
    with torch.no_grad():
        sae.threshold.fill_(0.25)
    info = json.loads((save_sae(sae, tmp_path) / "config.json").read_text())
    assert info["threshold"] == pytest.approx(0.25)


def test_threshold_gradient_is_the_rectangle_kernel_ste():
    """d loss / d theta_j = -(theta_j / eps) sum_b 1[|z_bj - theta_j| < eps/2] dL/df_bj (+ the L0 term)."""
    from vlmsae.sae.jumprelu import BANDWIDTH

    sae = _random_jumprelu()
    sae.train()
    with torch.no_grad():  # put many pre-activations inside the kernel window
        sae.threshold.copy_(torch.linspace(0.05, 0.6, N_LATENTS))
    x = torch.randn(512, D_IN)
    codes = sae._train_codes(x - sae.b_dec)
    upstream_BF = torch.randn_like(codes.codes_BF)
    (codes.codes_BF * upstream_BF).sum().backward(retain_graph=True)
    z = codes.z_BF.detach()
    theta = sae.threshold.detach()
    window = ((z - theta).abs() < BANDWIDTH / 2).float()
    assert window.sum() > 10
    torch.testing.assert_close(sae.threshold.grad, (-(theta / BANDWIDTH) * window * upstream_BF).sum(0))
    sae.threshold.grad = None
    sae._sparsity_penalty(codes).backward()
    torch.testing.assert_close(sae.threshold.grad, -(window.sum(0) / BANDWIDTH) / x.shape[0])


def test_training_on_planted_features_learns_thresholds_and_sparsity():
    planted = PlantedDictionary.random(d_in=32, n_atoms=64, k=3, noise_std=0.01, scale=5.0, offset_norm=3.0, seed=0)
    held = planted.sample(2048, seed=12345)
    sae = build_sae(SAEConfig(arch="jumprelu", d_in=32, n_latents=128, l1_coeff=0.1), seed=0)
    history = train_steps(sae, planted.batches(256, 150, seed=1), lr=3e-3)
    with torch.no_grad():
        x_hat, codes = sae(held.x), sae.encode(held.x)
    fve = float(1 - (held.x - x_hat).pow(2).sum() / (held.x - held.x.mean(0)).pow(2).sum())
    l0 = float((codes > 0).sum(1).float().mean())
    assert fve > 0.8 and l0 < 128 / 4, (fve, l0)
    assert float(sae.threshold.detach().min()) > 0.05  # thresholds moved up from their 0.01 start
    assert float(max_cosine(held.dictionary, sae.W_dec)[0].mean()) > 0.85
    assert history["l0"][-1] < 0.5 * history["l0"][0]
