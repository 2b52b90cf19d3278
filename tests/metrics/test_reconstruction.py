"""Reconstruction metrics: closed forms, streaming == whole-batch, SAE runner, zero-shot splice."""

from __future__ import annotations

import math

import pytest
import torch

from vlmsae.metrics.reconstruction import (
    ReconstructionAccumulator,
    _active_per_latent,
    _check_pair,
    fve,
    normalized_mse,
    zero_shot_fidelity,
)

# The closed forms and the SAE runner the accumulator is checked against (nothing in vlmsae calls them).


def mse(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    x, x_hat = _check_pair(x_BD, x_hat_BD)
    return float((x - x_hat).pow(2).mean())


def sq_err(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """Squared error summed over dims, mean over samples (METHOD §2's reconstruction loss)."""
    x, x_hat = _check_pair(x_BD, x_hat_BD)
    return float((x - x_hat).pow(2).sum(1).mean())


def l0(codes_BF: torch.Tensor) -> float:
    """Mean number of nonzero latents per sample (dense [..., F] or sparse [B, F] codes)."""
    counts_F, n = _active_per_latent(codes_BF)
    return float(counts_F.sum()) / max(n, 1)


@torch.no_grad()
def reconstruction_metrics(sae: torch.nn.Module, batches, max_batches: int | None = None) -> dict:
    """Run ``sae`` (inference encoder) over activation batches [B, D]; metrics as :class:`ReconstructionAccumulator`."""
    acc = ReconstructionAccumulator(getattr(sae, "n_latents", None))
    for i, x_BD in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        codes_BF = sae.encode(x_BD.float(), sparse=True)
        acc.update(x_BD.float(), sae.decode(codes_BF), codes_BF)
    return acc.result()


def test_closed_forms() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    x_hat = torch.tensor([[1.0, 3.0], [3.0, 6.0]])
    # variance around the mean [2, 4]: 1+4+1+4 = 10; error 1
    assert fve(x, x_hat) == pytest.approx(0.9)
    assert mse(x, x_hat) == pytest.approx(0.25)
    assert sq_err(x, x_hat) == pytest.approx(0.5)
    assert normalized_mse(x, x_hat) == pytest.approx(1 / 50)
    assert fve(x, x) == 1.0 and fve(x, x.mean(0).expand_as(x)) == pytest.approx(0.0)
    codes = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert l0(codes) == pytest.approx(1.0) and l0(codes.to_sparse()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        fve(x, x_hat[:1])


def test_streaming_matches_whole_batch_with_large_mean() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g) + 1e4  # big shared mean: naive sum-of-squares would cancel
    x_hat = x + 0.3 * torch.randn(300, 8, generator=g)
    codes = torch.relu(torch.randn(300, 5, generator=g))
    codes[:, 4] = 0.0  # dead
    codes[:, 3] = 1.0  # dense
    acc = ReconstructionAccumulator(5, dense_threshold=0.6)
    for i0 in range(0, 300, 37):
        acc.update(
            x[i0 : i0 + 37], x_hat[i0 : i0 + 37], codes[i0 : i0 + 37].to_sparse() if i0 % 2 else codes[i0 : i0 + 37]
        )
    out = acc.result()
    assert out["fve"] == pytest.approx(fve(x, x_hat), rel=1e-9)
    assert 0.85 < out["fve"] < 0.95
    assert out["mse"] == pytest.approx(mse(x, x_hat), rel=1e-9)
    assert out["normalized_mse"] == pytest.approx(normalized_mse(x, x_hat), rel=1e-9)
    assert out["l0"] == pytest.approx(l0(codes))
    assert out["dead_fraction"] == pytest.approx(1 / 5) and out["dense_fraction"] == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="empty"):
        ReconstructionAccumulator().result()


def test_accumulators_of_disjoint_streams_merge_exactly() -> None:
    """What the trainer does over DDP ranks: per-rank sums, all-gathered as tensors, merged."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g) * 2 + 50
    x_hat = x + 0.5 * torch.randn(200, 6, generator=g)
    codes = torch.relu(torch.randn(200, 7, generator=g))
    codes[:, 6] = 0.0
    whole = ReconstructionAccumulator(7, dense_threshold=0.4)
    whole.update(x, x_hat, codes)
    ranks = [ReconstructionAccumulator(7, dense_threshold=0.4, d_in=6) for _ in range(3)]
    for r, (i0, i1) in enumerate(((0, 50), (50, 170), (170, 200))):
        ranks[r].update(x[i0:i1], x_hat[i0:i1], codes[i0:i1])
    ranks.append(ReconstructionAccumulator(7, dense_threshold=0.4, d_in=6))  # a rank that saw no rows
    merged = ReconstructionAccumulator(dense_threshold=0.4)
    for acc in ranks:
        merged.merge(ReconstructionAccumulator.from_state(acc.state_dict(), dense_threshold=0.4))
    got, want = merged.result(), whole.result()
    for key in ("fve", "mse", "normalized_mse", "l0", "dead_fraction", "dense_fraction"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert got["n_samples"] == 200 and torch.equal(got["freq_F"], want["freq_F"])
    assert got["fve"] == pytest.approx(fve(x, x_hat), rel=1e-9) and got["dead_fraction"] == pytest.approx(1 / 7)


def test_reconstruction_metrics_runs_an_sae() -> None:
    from vlmsae.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(arch="topk", d_in=16, n_latents=64, k=4), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(50, 16, generator=g) for _ in range(4)]
    out = reconstruction_metrics(sae, iter(batches))
    x = torch.cat(batches)
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    assert out["n_samples"] == 200
    assert out["fve"] == pytest.approx(fve(x, x_hat), rel=1e-6, abs=1e-9)
    assert out["l0"] == pytest.approx(l0(codes)) and out["l0"] <= 4
    assert out["dead_fraction"] == pytest.approx(float(((codes != 0).sum(0) == 0).double().mean()))
    assert reconstruction_metrics(sae, iter(batches), max_batches=1)["n_samples"] == 50


def _tiny_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from vlmsae.models.tiny import build_tiny_open_clip

    dpath = build_tiny_open_clip(tmp_path / "tiny_clip")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{dpath}")
    return model.eval(), open_clip


def test_zero_shot_fidelity_identity_and_sae(tmp_path) -> None:
    from vlmsae.sae import SAEConfig, build_sae

    model, open_clip = _tiny_clip(tmp_path)
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(6, 3, 32, 32, generator=g) for _ in range(2)]
    text = open_clip.tokenize(["a photo of a cat", "a photo of a dog", "a red square"], context_length=16)
    with torch.no_grad():
        before = model.encode_image(images[0])
    ident = zero_shot_fidelity(model, torch.nn.Identity(), 1, images, text, labels=[0] * 12)
    assert ident["kl"] == pytest.approx(0.0, abs=1e-6) and ident["top1_agreement"] == 1.0
    assert ident["accuracy_original"] == ident["accuracy_spliced"]
    assert ident["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()))
    sae = build_sae(SAEConfig(arch="topk", d_in=64, n_latents=128, k=2), seed=0).eval()
    spliced = zero_shot_fidelity(model, sae, 1, images, text)
    assert spliced["kl"] > 1e-4 and not math.isnan(spliced["kl"])
    cls_only = zero_shot_fidelity(model, sae, 1, images, text, tokens="cls")
    assert cls_only["kl"] != pytest.approx(spliced["kl"])
    last = zero_shot_fidelity(
        model, build_sae(SAEConfig(arch="topk", d_in=32, n_latents=64, k=2), seed=0), "last", images, text
    )
    assert last["kl"] > 0
    with torch.no_grad():  # hooks are removed afterwards
        assert torch.equal(model.encode_image(images[0]), before)
