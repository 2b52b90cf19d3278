"""The SAE base class and its architectures on planted features: recovery, sparsity, thresholds, Matryoshka
prefixes, AuxK and dead latents, the encode/decode API; bad inputs are refused naming the value and what is expected.

The architectures (topk.py, batchtopk.py, matryoshka.py, relu.py) and the mechanics that need a trained SAE are
tested here, on one set of SAEs trained once per module; mechanics on hand-made cases are in test_mechanics.py.
"""

from __future__ import annotations

import pytest
import torch

from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.metrics.seed_matching import max_cosine
from vlmsae.sae import (
    SAEConfig,
    auxk_loss,
    build_sae,
    geometric_median,
    train_steps,
)

D_IN, N_ATOMS, K, N_LATENTS = 32, 64, 3, 128
STEPS, BATCH = 150, 256


@pytest.fixture(scope="module")
def planted() -> PlantedDictionary:
    # Large norms and a big shared offset, like real ViT activations: exercises scaling and the b_dec init.
    return PlantedDictionary.random(d_in=D_IN, n_atoms=N_ATOMS, k=K, noise_std=0.01, scale=5.0, offset_norm=3.0, seed=0)


@pytest.fixture(scope="module")
def held_out(planted):
    return planted.sample(2048, seed=12345)


def _fve(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


ARCH_SETTINGS = {
    "topk": {},
    "batchtopk": {"threshold_start_step": 50},
    "matryoshka": {"threshold_start_step": 50, "group_fractions": (0.125, 0.25, 0.625)},
    "relu": {"l1_coeff": 0.3},
}


@pytest.fixture(scope="module")
def trained(planted):
    """One SAE per architecture, trained for STEPS plain-Adam steps (a couple of seconds each on CPU)."""
    out = {}
    for arch, extra in ARCH_SETTINGS.items():
        cfg = SAEConfig(arch=arch, d_in=D_IN, n_latents=N_LATENTS, k=K, dead_after_samples=5000, **extra)
        sae = build_sae(cfg, seed=0)
        norms = []
        history = train_steps(
            sae,
            planted.batches(BATCH, STEPS, seed=1),
            lr=3e-3,
            on_step=lambda step, _out, sae=sae, norms=norms: norms.append(sae.W_dec.detach().norm(dim=1)),
        )
        out[arch] = (sae, history, torch.stack(norms))
    return out


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_family_recovers_planted_atoms(trained, held_out, arch):
    sae, history, _ = trained[arch]
    recovery_A = max_cosine(held_out.dictionary, sae.W_dec)[0]
    assert float(recovery_A.mean()) >= 0.9, f"{arch}: mean max cosine {float(recovery_A.mean()):.3f}"
    assert history["recon"][-1] < 0.2 * history["recon"][0]


@pytest.mark.parametrize("arch", ["relu", "matryoshka"])
def test_relu_and_matryoshka_learn(trained, held_out, arch):
    sae, _, _ = trained[arch]
    with torch.no_grad():
        x_hat = sae(held_out.x)
        l0 = float((sae.encode(held_out.x) > 0).sum(1).float().mean())
    assert _fve(held_out.x, x_hat) > 0.8
    assert l0 < N_LATENTS / 4, f"{arch}: L0 {l0:.1f} is not sparse"  # sparsity is part of learning


def test_topk_codes_have_exactly_k_active(trained, held_out):
    sae, _, _ = trained["topk"]
    with torch.no_grad():
        codes = sae.encode(held_out.x)
    assert torch.all((codes > 0).sum(1) <= K) and float((codes > 0).sum(1).float().mean()) > K - 0.1


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_threshold_gives_l0_near_k(trained, held_out, arch):
    sae, _, _ = trained[arch]
    assert float(sae.threshold) > 0, "the inference threshold was never estimated"
    assert int(sae.n_steps) == STEPS
    with torch.no_grad():
        codes = sae.encode(held_out.x)
    l0 = float((codes > 0).sum(1).float().mean())
    assert abs(l0 - K) <= 0.2 * K, f"{arch}: inference L0 {l0:.2f} vs k={K}"
    # Inference is the threshold rule, not a top-k: samples differ in their active counts.
    z = sae.encode_pre(held_out.x)
    theta = float(sae.threshold / sae.input_scale)
    torch.testing.assert_close(codes, torch.relu(z) * (torch.relu(z) > theta))


def test_threshold_waits_for_start_step(planted):
    cfg = SAEConfig(arch="batchtopk", d_in=D_IN, n_latents=N_LATENTS, k=K, threshold_start_step=5)
    sae = build_sae(cfg, seed=0)
    seen = []
    train_steps(sae, planted.batches(64, 7), lr=1e-3, on_step=lambda s, o: seen.append(float(sae.threshold)))
    assert seen[:4] == [-1.0] * 4 and seen[4] > 0 and seen[5] != seen[4]


def test_decoder_rows_stay_unit_norm(trained):
    for arch, (_, _, norms_SF) in trained.items():
        assert norms_SF.shape == (STEPS, N_LATENTS)
        torch.testing.assert_close(norms_SF, torch.ones_like(norms_SF), atol=1e-5, rtol=0, msg=arch)


def test_init_ties_encoder_to_decoder():
    sae = build_sae(SAEConfig(arch="relu", d_in=6, n_latents=10, k=2), seed=3)
    torch.testing.assert_close(sae.W_enc, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10))
    assert torch.all(sae.b_enc == 0)
    other = build_sae(SAEConfig(arch="relu", d_in=6, n_latents=10, k=2), seed=3)
    torch.testing.assert_close(other.W_dec, sae.W_dec)  # the seed fixes the init


def test_matryoshka_error_falls_with_prefix_length(trained, held_out):
    sae, _, _ = trained["matryoshka"]
    sae.eval()
    with torch.no_grad():
        errors_G = sae.loss(held_out.x)["recon_prefix"]
    assert errors_G.shape == (3,)
    assert torch.all(errors_G[1:] < errors_G[:-1]), errors_G.tolist()
    with torch.no_grad():
        assert float(sae.loss(held_out.x)["recon"]) == pytest.approx(float(errors_G[-1]), rel=1e-5)


def test_training_init_sets_scale_and_b_dec(planted):
    sae = build_sae(SAEConfig(arch="topk", d_in=D_IN, n_latents=N_LATENTS, k=K), seed=0)
    first = next(planted.batches(BATCH, 1, seed=7))
    train_steps(sae, [first], lr=0.0)
    scaled = first * sae.input_scale
    assert float(scaled.pow(2).sum(1).mean()) == pytest.approx(D_IN, rel=1e-4)  # E||s x||^2 = d_in
    torch.testing.assert_close(sae.b_dec, geometric_median(scaled), atol=1e-4, rtol=1e-4)


def test_auxk_loss_formula():
    torch.manual_seed(0)
    e = torch.randn(4, 3)
    W_dec = torch.eye(3)
    z = torch.tensor([[5.0, 1.0, -1.0]]).repeat(4, 1)
    dead = torch.tensor([False, True, True])
    # k_aux = 1: latent 1 (value 1) explains the residual along e_1 only.
    loss = auxk_loss(e, z, dead, 1, W_dec)
    e_hat = torch.zeros(4, 3)
    e_hat[:, 1] = 1.0
    want = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(loss, want)


def test_auxk_revives_dead_latents(planted):
    cfg = SAEConfig(arch="topk", d_in=D_IN, n_latents=N_LATENTS, k=K, dead_after_samples=10**9, sparse_kernel="dense")
    sae = build_sae(cfg, seed=0)
    x = next(planted.batches(BATCH, 1))
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[::2] = True
    sae.samples_since_fired[dead] = 10**9
    sae.train()
    out = sae.loss(x)
    assert float(out["aux"]) > 0
    out["loss"].backward()
    chosen = out["fired_F"]
    grad_rows = sae.W_enc.grad.norm(dim=1) > 0
    assert bool((grad_rows & dead & ~chosen).any()), "no dead, unselected latent got an AuxK gradient"
    # Without dead latents there is no AuxK term and unselected latents get no encoder gradient.
    sae.zero_grad()
    sae.samples_since_fired.zero_()
    out = sae.loss(x)
    assert float(out["aux"]) == 0
    out["loss"].backward()
    assert torch.all(sae.W_enc.grad[~out["fired_F"]] == 0)


def test_dead_latent_tracking_and_eval_is_side_effect_free(planted):
    cfg = SAEConfig(arch="topk", d_in=D_IN, n_latents=N_LATENTS, k=K, dead_after_samples=100)
    sae = build_sae(cfg, seed=0)
    x = next(planted.batches(64, 1))
    sae.train()
    fired = sae.loss(x)["fired_F"]
    assert torch.equal(sae.samples_since_fired == 0, fired)
    assert torch.all(sae.samples_since_fired[~fired] == 64)
    sae.loss(x)
    assert torch.equal(sae.dead_latents, sae.samples_since_fired >= 100)
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.eval()
    sae.loss(x)
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in state.items())


def test_encode_decode_api(trained, held_out):
    sae, _, _ = trained["batchtopk"]
    x = held_out.x[:50]
    codes = sae.encode(x)
    sparse = sae.encode(x, sparse=True)
    assert sparse.is_sparse and sparse.is_coalesced() and sparse.shape == (50, N_LATENTS)
    torch.testing.assert_close(sparse.to_dense(), codes)
    torch.testing.assert_close(sae.decode(sparse), sae.decode(codes))
    torch.testing.assert_close(sae(x), sae.decode(codes))
    x_BTD = x.reshape(5, 10, D_IN)  # steering passes every token: leading dims are kept
    torch.testing.assert_close(sae(x_BTD).reshape(50, D_IN), sae(x))
    torch.testing.assert_close(sae.encode_pre(x_BTD).reshape(50, -1), sae.encode_pre(x))
    out = sae.loss(x)
    assert set(out) >= {"loss", "recon", "aux", "l1", "l0", "x_hat", "fired_F"}
    torch.testing.assert_close(out["x_hat"], sae(x))  # eval-mode loss uses the inference encoder


# ---------------------------------------------------- bad inputs are refused, naming the value and what is expected
def _cfg(**kw) -> SAEConfig:
    base = dict(arch="batchtopk", d_in=8, n_latents=32, k=4)
    return SAEConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def sae():
    sae = build_sae(_cfg(), seed=0)
    sae.threshold.fill_(0.05)
    return sae


def test_unestimated_threshold_falls_back_to_topk_with_a_warning():
    fresh = build_sae(_cfg(), seed=0)
    with pytest.warns(UserWarning, match="threshold is not estimated yet"):
        codes = fresh.encode(torch.randn(20, 8))
    assert torch.all((codes > 0).sum(1) <= 4) and int((codes > 0).sum()) > 20


@pytest.mark.parametrize("method", ["encode", "encode_pre", "forward", "loss"])
def test_wrong_width_names_expected_and_got(sae, method):
    with pytest.raises(ValueError, match=r"d_in=8; got shape \(5, 7\)"):
        getattr(sae, method)(torch.randn(5, 7))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["encode", "loss"])
def test_non_finite_batch_is_refused(sae, method, bad):
    x = torch.randn(6, 8)
    x[3, 2] = bad
    with pytest.raises(ValueError, match=r"NaN .* inf values \(first bad row 3\)"):
        getattr(sae, method)(x)


def test_dtypes_are_cast_or_refused(sae):
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.encode(x.half()), sae.encode(x.half().float()))  # fp16 shards: cast
    assert sae.encode(x.double()).dtype == torch.float32
    with pytest.raises(TypeError, match=r"floating-point activations, got dtype torch.int64"):
        sae.encode(torch.ones(5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"expected a torch.Tensor"):
        sae.encode([[0.0] * 8])
    with pytest.raises(ValueError, match=r"shape \[B, d_in\]"):
        sae.loss(torch.randn(2, 3, 8))  # loss needs a flat batch
    with pytest.raises(ValueError, match=r"n_latents=32; got shape \(5, 31\)"):
        sae.decode(torch.rand(5, 31))
