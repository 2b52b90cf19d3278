"""The hf_llava backend taps LLaVA's vision tower at the same index as everything else (SPEC 1, 5)."""

from __future__ import annotations

import pytest
import torch

from vlmsae.models import get_model_spec, load_tap

torch.set_num_threads(1)


def test_tiny_llava_tap_equals_vision_tower_hidden_states(tmp_path):
    from vlmsae.models import llava

    spec = get_model_spec("tiny_llava", local_path=str(tmp_path / "tiny_llava"))
    tap = load_tap(spec)
    assert (tmp_path / "tiny_llava" / "config.json").exists()  # saved, then loaded with from_pretrained
    model, _ = llava.load_llava(tmp_path / "tiny_llava", dtype="float32")
    tower = llava.vision_tower(model)
    x = torch.randn(2, 3, tap.image_size, tap.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states
    assert tap.n_layers == len(llava.vision_blocks(model)) and tap.n_tokens == hidden[0].shape[1]
    for layer in range(tap.n_layers):
        torch.testing.assert_close(tap.forward_to(x, layer), hidden[layer + 1], rtol=1e-5, atol=1e-6)
    # LLaVA's vision_feature_layer=-2 is block n-2: the same rows as layer=-2 here.
    assert llava.tapped_block_index(model) == tap.resolve_layer(-2)
    with pytest.raises(ValueError, match="layer=last.*not defined.*block index"):
        tap.forward_to(x, "last")
