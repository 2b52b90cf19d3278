"""Checkpoints: save -> load gives identical outputs; the input scale is folded so raw inputs just work; bad
checkpoint folders are refused naming the problem."""

from __future__ import annotations

import json

import pytest
import torch

from vlmsae import __version__
from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.sae import ARCHS, SAEConfig, build_sae, load, load_any, load_sae, save_sae, set_input_scale_, train_steps

D_IN = 16


def _random_sae(arch: str, scale: float = 1.0):
    """An SAE with every parameter and buffer randomised, so nothing is checked by accident."""
    extra = {"group_fractions": (0.25, 0.75)} if arch == "matryoshka" else {}
    sae = build_sae(SAEConfig(arch=arch, d_in=D_IN, n_latents=64, k=4, **extra), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(64, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        sae.W_enc.add_(0.1 * torch.randn(64, D_IN, generator=g))
        sae.threshold.fill_(0.4)
    set_input_scale_(sae, scale)
    return sae.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_identical_outputs(tmp_path, arch):
    sae = _random_sae(arch)
    x = torch.randn(40, D_IN) * 2
    dpath = save_sae(sae, tmp_path / "sae", trained_on={"model": "tiny", "layer": 2, "tokens": "cls"})
    assert sorted(p.name for p in dpath.iterdir()) == ["config.json", "sae.safetensors"]
    loaded = load_sae(dpath)
    assert type(loaded) is type(sae) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded(x), sae(x))
    assert loaded.cfg == sae.cfg and loaded.group_sizes == sae.group_sizes
    info = json.loads((dpath / "config.json").read_text())
    assert info["arch"] == arch and info["d_in"] == D_IN and info["n_latents"] == 64 and info["k"] == 4
    assert info["group_sizes"] == ([16, 48] if arch == "matryoshka" else [64])
    assert info["threshold"] == pytest.approx(0.4)
    assert info["trained_on"] == {"model": "tiny", "layer": 2, "tokens": "cls"}
    assert info["vlmsae_version"] == __version__ and info["git_commit"]
    assert info["input_scale"]["folded"] is True
    assert load is load_any


def test_checkpoint_holds_no_pickle(tmp_path):
    dpath = save_sae(_random_sae("batchtopk"), tmp_path)
    raw = (dpath / "sae.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_scale_fold_same_reconstruction_on_raw_inputs(tmp_path):
    """Train with a real input scale (raw norms ~ 20, s ~ 0.2), then check the folded and saved SAE on raw data."""
    planted = PlantedDictionary.random(d_in=D_IN, n_atoms=24, k=2, scale=5.0, offset_norm=20.0, seed=3)
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=D_IN, n_latents=48, k=2, threshold_start_step=20), seed=0)
    train_steps(sae, planted.batches(128, 60, seed=4), lr=3e-3)
    scale = float(sae.input_scale)
    assert abs(scale - 1) > 0.5, f"test needs a non-trivial scale, got {scale}"
    x = planted.sample(300, seed=5).x
    with torch.no_grad():
        x_hat, codes = sae(x), sae.encode(x)
        loaded = load_sae(save_sae(sae, tmp_path))
        assert float(sae.input_scale) == scale  # saving folds a copy, never the live module
        assert float(loaded.input_scale) == 1.0
        torch.testing.assert_close(loaded(x), x_hat, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loaded.encode(x), codes, atol=1e-4, rtol=1e-4)
        # Folding changes only biases and threshold: the directions are untouched.
        assert torch.equal(loaded.W_dec, sae.W_dec) and torch.equal(loaded.W_enc, sae.W_enc)
        torch.testing.assert_close(loaded.b_dec, sae.b_dec / scale)
        torch.testing.assert_close(loaded.threshold, sae.threshold / scale)
        # The fold is needed: the unscaled weights on raw inputs reconstruct far worse.
        unfolded = build_sae(sae.cfg)
        unfolded.load_state_dict({**sae.state_dict(), "input_scale": torch.tensor(1.0)})
        err_unfolded = float((unfolded.eval()(x) - x).pow(2).sum(1).mean())
        err_folded = float((loaded(x) - x).pow(2).sum(1).mean())
        assert err_unfolded > 5 * err_folded


def test_fold_in_place_keeps_outputs():
    sae = _random_sae("matryoshka", scale=0.01)
    x = torch.randn(30, D_IN) * 100
    with torch.no_grad():
        before = sae(x), sae.encode(x), sae.encode_pre(x)
        sae.fold_input_scale_()
        after = sae(x), sae.encode(x), sae.encode_pre(x)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert float(sae.input_scale) == 1.0


def test_saved_threshold_none_before_estimation(tmp_path):
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=D_IN, n_latents=32, k=2), seed=0)
    info = json.loads((save_sae(sae, tmp_path) / "config.json").read_text())
    assert info["threshold"] is None
    assert float(load_sae(tmp_path).threshold) < 0


@pytest.mark.parametrize("arch", ["matryoshka", "batchtopk"])
def test_checkpoints_written_before_the_config_node_merge_still_load(repo_root, tmp_path, arch):
    """tests/fixtures/sae_v1/: config.json + weights saved by the code whose SAEConfig had no ``expansion`` and
    required ``d_in``/``n_latents``, and that named the training record "source"; they load into the same SAE
    (the record as ``sae.trained_on``), and a re-save round-trips under the new key."""
    dpath = repo_root / "tests" / "fixtures" / "sae_v1" / arch
    old = json.loads((dpath / "config.json").read_text())
    assert "expansion" not in old["config"] and "trained_on" not in old  # really the old layout
    sae = load_sae(dpath)
    assert sae.trained_on == old["source"] == {"model": "tiny", "layer": 2, "tokens": "cls"}
    assert (sae.arch, sae.d_in, sae.n_latents, sae.cfg.k) == (arch, 4, 8, 2)
    assert sae.cfg.expansion == 2 and sae.cfg.group_sizes == ([2, 6] if arch == "matryoshka" else [8])
    assert sae.cfg == SAEConfig(
        arch=arch, d_in=4, n_latents=8, k=2, group_fractions=(0.25, 0.75) if arch == "matryoshka" else None
    )
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    again = load_sae(save_sae(sae, tmp_path / "again"))
    assert again.cfg == sae.cfg and again.trained_on == sae.trained_on
    assert "source" not in json.loads((tmp_path / "again" / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(again.encode(x), sae.encode(x))


# ------------------------------------------------------------------------------ bad checkpoint folders
@pytest.fixture(scope="module")
def sae():
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=8, n_latents=32, k=4), seed=0)
    sae.threshold.fill_(0.05)
    return sae


def test_bad_checkpoint_folders(tmp_path, sae):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_sae(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a vlmsae SAE config"):
        load_sae(tmp_path)
    good = save_sae(sae, tmp_path / "good")
    (good / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_sae(good)
    (good / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no sae.safetensors"):
        load_sae(good)
