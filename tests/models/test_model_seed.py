"""``model.seed`` is honoured where it decides the weights, and refused where it would be silently ignored."""

from __future__ import annotations

import pytest
import torch


def _acts(spec) -> torch.Tensor:
    from vlmsae.models import load_tap

    tap = load_tap(spec)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return tap.forward_to(images, 2)


def test_tiny_model_seed_gives_other_weights_and_its_own_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    from vlmsae.models import get_model_spec, tiny_model_dpath

    seed0 = _acts(get_model_spec("tiny"))
    seed7 = _acts(get_model_spec("tiny", seed=7))
    assert not torch.allclose(seed0, seed7), "model.seed=7 was ignored: the same activations as seed 0"
    torch.testing.assert_close(_acts(get_model_spec("tiny")), seed0, rtol=0, atol=0)  # seed 0 again: the same
    torch.testing.assert_close(_acts(get_model_spec("tiny", seed=7)), seed7, rtol=0, atol=0)
    assert tiny_model_dpath("tiny") != tiny_model_dpath("tiny", 7)
    assert (tiny_model_dpath("tiny", 7) / "open_clip_config.json").is_file()
    # a folder given as model.local_path holds one seed's weights: another seed is refused, not ignored
    with pytest.raises(ValueError, match=r"built with seed 7, not model.seed=3: pass model.seed=7"):
        _acts(get_model_spec("tiny", seed=3, local_path=str(tiny_model_dpath("tiny", 7))))


def test_seed_on_a_model_with_loaded_weights_is_refused():
    from vlmsae.models import get_model_spec, load_tap

    with pytest.raises(ValueError, match=r"model.seed=7 means nothing for model 'clip_b32'.*model.pretrained=null"):
        load_tap(get_model_spec("clip_b32", seed=7))  # refused before any download


def test_random_open_clip_weights_are_drawn_from_the_seed():
    """``model.pretrained=null``: the random network is the seed's, so a job can rebuild the one an SAE read."""
    from vlmsae.models.open_clip_backend import OpenClipWeights, create_open_clip

    def weights(seed: int) -> torch.Tensor:
        source = OpenClipWeights("RN50", None, None, None, {}, "test", seed=seed)
        torch.manual_seed(123)  # the caller's RNG state must not matter, and is left as it was
        model, _ = create_open_clip(source)
        assert torch.rand(1).item() == expected_next
        return model.visual.attnpool.c_proj.weight.detach().clone()

    torch.manual_seed(123)
    expected_next = torch.rand(1).item()

    a, b, c = weights(0), weights(0), weights(7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
