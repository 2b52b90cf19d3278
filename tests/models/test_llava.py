"""The tiny LLaVA: built from configs with an offline processor, saved, loaded back like real weights;
vision blocks found by name; the tapped block index matches LLaVA's vision_feature_layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmsae.models.llava import build_tiny_llava, load_llava, tapped_block_index, vision_blocks, vision_tower


@pytest.fixture(scope="module")
def tiny_dpath(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny_llava", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dpath):
    return load_llava(tiny_dpath, dtype="float32")


def test_build_saves_a_complete_offline_folder(tiny_dpath):
    names = {p.name for p in tiny_dpath.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not any(p.name.startswith(".") for p in tiny_dpath.parent.iterdir()), "temp folder left behind"
    mtime = (tiny_dpath / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llava(tiny_dpath) == tiny_dpath  # idempotent: an existing folder is reused
    assert (tiny_dpath / "model.safetensors").stat().st_mtime_ns == mtime


def test_load_round_trip_and_seeded(tiny, tiny_dpath, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, processor = tiny
    assert isinstance(model, LlavaForConditionalGeneration)
    assert next(model.parameters()).dtype == torch.float32
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == model.config.image_token_id
    assert processor.tokenizer.padding_side == "left"
    # Same seed -> same weights; other seed -> different weights.
    again, _ = load_llava(build_tiny_llava(tmp_path / "same", seed=0), dtype="float32")
    other, _ = load_llava(build_tiny_llava(tmp_path / "other", seed=1), dtype="float32")
    w = model.lm_head.weight
    assert torch.equal(w, again.lm_head.weight)
    assert not torch.equal(w, other.lm_head.weight)
    half, _ = load_llava(tiny_dpath, dtype="bf16", device_map="cpu")  # the accelerate path a 7B model takes
    assert next(half.parameters()).dtype == torch.bfloat16
    assert next(half.parameters()).device.type == "cpu"


def test_processor_expands_image_token_and_model_generates(tiny):
    from PIL import Image

    from vlmsae.steering import ONE_WORD_PROMPT, chat_prompt

    model, processor = tiny
    prompt = chat_prompt(processor, ONE_WORD_PROMPT)
    assert prompt.startswith("USER: <image>") and prompt.endswith("ASSISTANT:")
    inputs = processor(images=[Image.new("RGB", (50, 40), "red")], text=[prompt], return_tensors="pt")
    n_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n_patches  # CLS dropped ("default")
    assert "<unk>" not in processor.batch_decode(inputs["input_ids"])[0]  # every prompt word is in the vocabulary
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_vision_blocks_and_tapped_index_match_hidden_states(tiny):
    model, processor = tiny
    blocks = vision_blocks(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == model.config.vision_config.num_hidden_layers == 4
    assert tapped_block_index(model) == 2  # vision_feature_layer=-2 on 4 blocks
    # The index fact of SPEC 1: hidden_states[L + 1] is block L's output.
    seen = {}
    handle = blocks[2].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        pixels = torch.randn(1, 3, 32, 32)
        hs = vision_tower(model)(pixels, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    assert torch.equal(hs[model.config.vision_feature_layer], seen["h"])
    assert torch.equal(hs[2 + 1], seen["h"])


def test_tapped_index_llava15_shape():
    """24 blocks with vision_feature_layer=-2 -> block 22, as LLaVA-1.5 (SPEC 5)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=24, num_attention_heads=2,
                              image_size=8, patch_size=4)
    text = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=3))
    assert len(vision_blocks(model)) == 24
    assert tapped_block_index(model) == 22
    model.config.vision_feature_layer = -1
    assert tapped_block_index(model) == 23
    model.config.vision_feature_layer = 0
    with pytest.raises(ValueError, match="embedding output"):
        tapped_block_index(model)
    model.config.vision_feature_layer = [-2, -5]
    with pytest.raises(ValueError, match="single tapped layer"):
        tapped_block_index(model)


def test_vision_blocks_transformers_4_layout():
    """4.4x nests the encoder one level deeper: ``vision_tower.vision_model.encoder.layers``."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    class VisionModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = VisionModel()

    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = Tower()
            self.language_model = nn.ModuleList([nn.Linear(2, 2) for _ in range(5)])  # must not be picked

    old = Old()
    assert vision_blocks(old) is old.vision_tower.vision_model.encoder.layers


def test_offline_missing_model_error_names_model_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OSError) as err:
        load_llava("llava-hf/llava-1.5-7b-hf", dtype="float16")
    msg = str(err.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "local" in msg
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_llava(tmp_path, dtype="float8")
