"""dictionary_learning JumpReluAutoEncoder: an ae.pt state dict written here, converted, vs the library's forward."""

from __future__ import annotations

import pytest
import torch

from vlmsae.sae import JumpReLUSAE
from vlmsae.sae.interop.dl_jumprelu import load_dictionary_learning_jumprelu

D, F = 10, 32


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {  # JumpReluAutoEncoder.state_dict(): W_enc [d, F], W_dec [F, d], raw threshold [F]
        "W_enc": torch.randn(D, F, generator=g) * 0.5,
        "b_enc": torch.randn(F, generator=g) * 0.3,
        "W_dec": torch.randn(F, D, generator=g) * 0.4,
        "b_dec": torch.randn(D, generator=g),
        "threshold": torch.rand(F, generator=g) * 0.8,
    }


def _config(**trainer) -> dict:
    base = {
        "trainer_class": "JumpReluTrainer", "dict_class": "JumpReluAutoEncoder", "activation_dim": D,
        "dict_size": F, "layer": 11, "lm_name": "openai/clip-vit-large-patch14-336", "bandwidth": 0.001,
    }  # fmt: skip
    return {"trainer": {**base, **trainer}, "buffer": {"d_submodule": D}}


def _reference(sd, x):
    """JumpReluAutoEncoder.encode/decode with apply_b_dec_to_input=False (load_dictionary's default)."""
    pre = x @ sd["W_enc"] + sd["b_enc"]
    f = torch.relu(pre * (pre > sd["threshold"]))
    return f, f @ sd["W_dec"] + sd["b_dec"]


def test_matches_library_forward(tmp_path):
    sd = _state_dict()
    torch.save(sd, tmp_path / "ae.pt")  # the bare state dict dictionary_learning writes
    sd = torch.load(tmp_path / "ae.pt", map_location="cpu", weights_only=True)
    sae = load_dictionary_learning_jumprelu(sd, _config())
    assert type(sae) is JumpReLUSAE and not sae.training
    x = torch.randn(400, D, generator=torch.Generator().manual_seed(5)) * 1.5
    codes_ref, x_hat_ref = _reference(sd, x)
    pre = x @ sd["W_enc"] + sd["b_enc"]
    assert ((pre > 0) & (pre <= sd["threshold"])).any(), "the thresholds must gate something in this test"
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), codes_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.threshold.detach(), sd["threshold"])
    assert sae.source["layer"] == 11 and sae.source["model"] == "clip_l14_336" and sae.source["tokens"] is None
    assert sae.source["format"] == "dictionary_learning"


def test_config_without_model_info():
    sae = load_dictionary_learning_jumprelu(_state_dict(1), _config(layer="", lm_name=""))
    assert sae.source["layer"] is None and sae.source["model"] is None


def test_contradictions_are_refused():
    sd = _state_dict()
    with pytest.raises(ValueError, match=r"threshold has shape \(31,\).*\(32,\)"):
        load_dictionary_learning_jumprelu({**sd, "threshold": sd["threshold"][:-1]}, _config())
    with pytest.raises(ValueError, match=r"lacks \['threshold'\]"):
        load_dictionary_learning_jumprelu({k: v for k, v in sd.items() if k != "threshold"}, _config())
    with pytest.raises(ValueError, match=r"unexpected \['k'\]"):
        load_dictionary_learning_jumprelu({**sd, "k": torch.tensor(4)}, _config())
    with pytest.raises(ValueError, match="trainer.dict_size=64 contradicts"):
        load_dictionary_learning_jumprelu(sd, _config(dict_size=64))
