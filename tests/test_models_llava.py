"""The hf_llava backend taps LLaVA's vision tower at the same index as everything else (SPEC 1, 5)."""

from __future__ import annotations

from pathlib import Path

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
            new = key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") else key
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
