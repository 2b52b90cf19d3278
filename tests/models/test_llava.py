"""The tiny LLaVA: built from configs with an offline processor, saved, loaded back like real weights;
vision blocks found by name; the tapped block index matches LLaVA's vision_feature_layer; the hf_llava backend
taps the vision tower at the same index as everything else, reading only the vision tensors (METHOD §1, 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vlmsae.models import get_model_spec, load_tap
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
    model, _processor = tiny
    blocks = vision_blocks(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == model.config.vision_config.num_hidden_layers == 4
    assert tapped_block_index(model) == 2  # vision_feature_layer=-2 on 4 blocks
    # The index fact of METHOD §1: hidden_states[L + 1] is block L's output.
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
    """24 blocks with vision_feature_layer=-2 -> block 22, as LLaVA-1.5 (METHOD §5)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=24, num_attention_heads=2, image_size=8, patch_size=4
    )
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


# ------------------------------------------------------------------------------ the hf_llava tap
# The hf_llava backend taps LLaVA's vision tower at the same index as everything else (METHOD §1, 5).
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


# --- The extraction tap loads the vision tower's tensors only (issue #12 item 8) ---------------------------------

LM_MODULE_WORDS = ("language_model", "lm_head", "multi_modal_projector")


def _to_transformers4_layout(src, dst):
    """Rewrite a (sharded) tiny LLaVA into the key layout of the Hub's llava-1.5-7b-hf, which transformers 4.x
    wrote: ``vision_tower.vision_model.<...>`` (5.x writes ``vision_tower.<...>``), with the non-persistent
    ``position_ids`` buffer stored as old CLIP checkpoints did."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for fpath in src.iterdir():
        if fpath.suffix != ".safetensors":
            shutil.copy(fpath, dst / fpath.name)
            continue
        renamed = {}
        for key, value in load_file(str(fpath)).items():
            new = (
                key.replace("vision_tower.", "vision_tower.vision_model.", 1)
                if key.startswith("vision_tower.")
                else key
            )
            renamed[new] = value
            if new.endswith("embeddings.position_embedding.weight"):
                renamed["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(value.shape[0])[None]
        save_file(renamed, str(dst / fpath.name), metadata={"format": "pt"})
        weight_map.update({key: fpath.name for key in renamed})
    (dst / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def sharded_llavas(tmp_path_factory):
    """The tiny LLaVA saved in shards with an index (as the Hub's 7B checkpoint), in the 5.x and the 4.x key layout."""
    from vlmsae.models.llava import build_tiny_llava

    root = tmp_path_factory.mktemp("sharded")
    v5 = build_tiny_llava(root / "v5", seed=0, max_shard_size="20KB")
    return {"v5": v5, "v4": _to_transformers4_layout(v5, root / "v4")}


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_llava_tap_reads_only_vision_tensors(sharded_llavas, layout, monkeypatch):
    import json

    import safetensors

    from vlmsae.models import llava

    dpath = sharded_llavas[layout]
    weight_map = json.loads((dpath / "model.safetensors.index.json").read_text())["weight_map"]
    vision_shards = {shard for key, shard in weight_map.items() if key.startswith("vision_tower.")}
    assert len(set(weight_map.values()) - vision_shards) >= 3, "the test needs shards without vision tensors"
    opened, read = [], []
    real_safe_open = safetensors.safe_open

    class SpySafeOpen:  # records which files are opened and which tensors are read from them
        def __init__(self, fpath, framework, **kwargs):
            opened.append(Path(fpath).name)
            self._handle = real_safe_open(fpath, framework, **kwargs)

        def __enter__(self):
            self._handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_tensor(self, key):
            read.append(key)
            return self._handle.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", SpySafeOpen)
    tap = load_tap(get_model_spec("tiny_llava", local_path=str(dpath)))
    monkeypatch.undo()

    assert opened and set(opened) <= vision_shards  # the language-model shards are never opened
    assert read and all(key.startswith("vision_tower.") for key in read)
    assert not any(key.endswith("position_ids") for key in read)  # a stored non-persistent buffer is skipped
    names = [name for name, _ in tap.named_modules()] + [name for name, _ in tap.named_parameters()]
    assert not any(word in name for name in names for word in LM_MODULE_WORDS)

    model, _ = llava.load_llava(dpath, dtype="float32")  # the full model: transformers' own key conversion
    tower = llava.vision_tower(model)
    n_tap = sum(p.numel() for p in tap.parameters())
    assert n_tap == sum(p.numel() for p in tower.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, tap.image_size, tap.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states
    for layer in range(tap.n_layers):
        torch.testing.assert_close(tap.forward_to(x, layer), hidden[layer + 1], rtol=0, atol=0)


def test_llava_vision_tower_dtype_and_bad_checkpoints(sharded_llavas, tmp_path):
    import shutil

    from vlmsae.models.llava import load_llava_vision_tower

    tower, image_processor = load_llava_vision_tower(sharded_llavas["v5"], dtype="bf16")
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    assert type(image_processor).__name__ == "CLIPImageProcessor"
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sharded_llavas["v5"] / name, no_weights / name)
    with pytest.raises(FileNotFoundError, match="safetensors only.*never unpickled"):
        load_llava_vision_tower(no_weights, dtype="float32")
    shutil.copy(sharded_llavas["v5"] / "model.safetensors.index.json", no_weights)
    with pytest.raises(FileNotFoundError, match="names the shard 'model-000.*missing"):
        load_llava_vision_tower(no_weights, dtype="float32")
