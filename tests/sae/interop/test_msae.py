"""MSAE checkpoints: ``.pth`` files written as MSAE's train.py writes them (config in the file name, numpy scalar
``target_norm``), loaded through vlmsae and compared with MSAE's inference wrapper re-implemented here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmsae.sae.interop import msae

D, F = 16, 64
DATASET = "cc3m_ViT-B~32_train_image_2905936_16"


def _save(dpath, fname: str, tied: bool = False, seed: int = 0, mean_center: bool = True):
    """MSAE train.py: torch.save({model, mean_center, scaling_factor, target_norm}, '<params>_<dataset>.pth')."""
    g = torch.Generator().manual_seed(seed)
    model = {
        "pre_bias": torch.randn(D, generator=g) * 0.5,
        "encoder": torch.randn(D, F, generator=g) / D**0.5,
        "latent_bias": torch.randn(F, generator=g) * 0.1,
        "latents_activation_frequency": torch.zeros(F, dtype=torch.int64),
    }
    if not tied:
        model["decoder"] = torch.randn(F, D, generator=g) / D**0.5
    data = torch.randn(256, D, generator=g) * 3 + 1
    mean = data.mean(0) if mean_center else torch.zeros(D)  # SAEDataset.mean: zeros when not mean-centring
    target_norm = np.sqrt(D)  # np.float64, as SAEDataset stores it
    scaling_factor = float(target_norm / (data - mean).pow(2).sum(-1).mean())  # / E||x - mean||^2, as in MSAE
    blob = {"model": model, "mean_center": mean, "scaling_factor": scaling_factor, "target_norm": target_norm}
    torch.save(blob, dpath / fname)
    return blob, data


def _reference(blob, x, tied: bool, soft_cap: float = 0.0):
    """MSAE SAE.forward(x, topk=-1): preprocess, dense forward_eval ReLU codes, decode, postprocess."""
    m, s = blob["model"], blob["scaling_factor"]
    xn = (x - blob["mean_center"]) * s
    pre = (xn - m["pre_bias"]) @ m["encoder"] + m["latent_bias"]
    full = torch.relu(pre)
    if soft_cap > 0:
        full = soft_cap * torch.tanh(full / soft_cap)
    dec = m["encoder"].t() if tied else m["decoder"]
    recon = full @ dec + m["pre_bias"]
    return full, recon / s + blob["mean_center"]


@pytest.mark.parametrize(
    ("fname", "tied", "soft_cap"),
    [
        (f"{F}_{D}_TopKReLU_8_RW_False_False_0.0_{DATASET}.pth", False, 0.0),  # Matryoshka, reverse weighting
        (f"{F}_{D}_TopKReLU_8_False_False_0.0_{DATASET}.pth", False, 0.0),  # TopKSAE
        (f"{F}_{D}_BatchTopKReLU_4_UW_True_False_0.0_{DATASET}.pth", True, 0.0),  # tied decoder
        (f"{F}_{D}_ReLU_003_False_False_30.0_{DATASET}.pth", False, 30.0),  # ReLU SAE with a soft cap
    ],
)
def test_load_matches_msae_forward(tmp_path, fname, tied, soft_cap):
    blob, data = _save(tmp_path, fname, tied=tied)
    sae = msae.load(tmp_path)
    x = data[:32]
    codes_ref, x_hat_ref = _reference(blob, x, tied, soft_cap)
    codes = sae.encode(x)
    torch.testing.assert_close(codes, codes_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(codes), x_hat_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    assert (codes > 0).sum(-1).float().mean() > 8  # dense ReLU codes, not the training TopK
    src = sae.trained_on
    assert (src["model"], src["pretrained"], src["layer"], src["tokens"]) == ("clip_b32", "openai", "last", "cls")
    assert src["format"] == "msae" and src["library"]["target_norm"] == pytest.approx(np.sqrt(D))
    assert src["library"]["tied"] is tied and src["library"]["latent_soft_cap"] == soft_cap


def test_parse_name():
    info = msae.parse_name("6144_512_TopKReLU_64_RW_False_False_0.0_cc3m_ViT-B~16_train_image_2905936_512.pth")
    assert (info["n_latents"], info["n_inputs"], info["act"], info["arg"], info["weighting"]) == (
        6144,
        512,
        "TopKReLU",
        "64",
        "RW",
    )
    assert (info["clip"], info["modality"], info["tied"], info["soft_cap"]) == ("ViT-B/16", "image", False, 0.0)
    assert msae.parse_name("ae.pt") is None and msae.parse_name("sae.pt") is None


def test_plain_weights_only_needs_the_numpy_allowlist(tmp_path):
    """The np.float64 target_norm is why the reader allows numpy scalars; plain weights_only refuses the file."""
    fname = f"{F}_{D}_TopKReLU_8_False_False_0.0_{DATASET}.pth"
    _save(tmp_path, fname)
    with pytest.raises(Exception, match="numpy"):
        torch.load(tmp_path / fname, weights_only=True)
    assert msae.load(tmp_path / fname).n_latents == F


def test_refusals(tmp_path):
    _save(tmp_path, f"{F}_{D}_TopKabsReLU_8_False_False_0.0_{DATASET}.pth")
    with pytest.raises(ValueError, match="TopKabsReLU"):
        msae.load(tmp_path)
    (tmp_path / f"{F}_{D}_TopKabsReLU_8_False_False_0.0_{DATASET}.pth").unlink()
    _save(tmp_path, f"{F}_{D}_TopKReLU_8_False_True_0.0_{DATASET}.pth")
    with pytest.raises(ValueError, match="normalize=True"):
        msae.load(tmp_path)
    _save(tmp_path, f"{F * 2}_{D}_TopKReLU_8_False_False_0.0_{DATASET}.pth")  # name says 128 latents, weights 64
    with pytest.raises(ValueError, match="several MSAE files"):
        msae.load(tmp_path)
    with pytest.raises(ValueError, match=r"encoder has shape \(16, 64\); expected \(16, 128\)"):
        msae.load(tmp_path / f"{F * 2}_{D}_TopKReLU_8_False_False_0.0_{DATASET}.pth")


class _Evil:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_needing_code_is_refused(tmp_path):
    marker = tmp_path / "executed"
    fname = f"{F}_{D}_TopKReLU_8_False_False_0.0_{DATASET}.pth"
    blob, _ = _save(tmp_path, fname)
    torch.save({**blob, "extra": _Evil(marker)}, tmp_path / fname)
    with pytest.raises(ValueError, match="nothing in it was executed"):
        msae.load(tmp_path)
    assert not marker.exists()


def test_detect(tmp_path):
    assert not msae.detect(tmp_path)
    torch.save({"W_enc": torch.zeros(2)}, tmp_path / "ae.pt")
    assert not msae.detect(tmp_path)
    _save(tmp_path, f"{F}_{D}_TopKReLU_8_False_False_0.0_{DATASET}.pth")
    assert msae.detect(tmp_path)


def test_a_soft_capped_sae_is_not_written_as_its_base_arch(tmp_path):
    """save_sae and export would write the soft-capped module as plain ReLU and change its codes: refused."""
    from vlmsae.sae import save_sae
    from vlmsae.sae.interop import export_sae

    (tmp_path / "in").mkdir()
    (tmp_path / "plain").mkdir()
    _save(tmp_path / "in", f"{F}_{D}_ReLU_003_False_False_30.0_{DATASET}.pth", tied=False)
    sae = msae.load(tmp_path / "in")
    with pytest.raises(ValueError, match=r"save_sae: .*cannot be written: MSAE soft-capped codes"):
        save_sae(sae, tmp_path / "out")
    with pytest.raises(ValueError, match=r"export to saelens: .*cannot be written"):
        export_sae(sae, "saelens", tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
    _save(tmp_path / "plain", f"{F}_{D}_TopKReLU_8_False_False_0.0_{DATASET}.pth", tied=False)
    save_sae(msae.load(tmp_path / "plain"), tmp_path / "plain_out")  # no soft cap: a plain ReLU SAE, written
    assert (tmp_path / "plain_out" / "sae.safetensors").is_file()
