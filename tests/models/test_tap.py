"""Taps: stop-early forwards equal the full model's residual stream, tiny models round-trip through the
real loading path, open_clip and transformers agree on the layer index, errors name the fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vlmsae.config import to_typed
from vlmsae.models import ModelSpec, get_model_spec, list_models, load_tap, resolve_layer, select_tokens

torch.set_num_threads(1)


def _tiny_spec(tmp_dpath, name="tiny", **kw) -> ModelSpec:
    return get_model_spec(name, local_path=str(tmp_dpath / name), **kw)


@pytest.fixture(scope="module")
def tiny_dpath(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tap(tiny_dpath):
    return load_tap(_tiny_spec(tiny_dpath))


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_tiny_open_clip_saved_and_loaded_through_real_path(tiny_dpath, tap):
    import open_clip

    folder = tiny_dpath / "tiny"
    assert (folder / "open_clip_config.json").exists() and (folder / "open_clip_model.safetensors").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # no pickles
    # An independent load of the same folder with open_clip's own API gives the same weights.
    ref = open_clip.create_model(f"local-dir:{folder}").eval()
    for (name, p_tap), (_, p_ref) in zip(tap.visual.state_dict().items(), ref.visual.state_dict().items()):
        assert torch.equal(p_tap, p_ref), name
    x = _images(3)
    torch.testing.assert_close(tap.forward_to(x, "last"), ref.encode_image(x), rtol=0, atol=1e-6)
    # Deterministic from the seed: a second build elsewhere has identical weights.
    other = load_tap(_tiny_spec(tiny_dpath / "again"))
    assert torch.equal(other.forward_to(x, 2), tap.forward_to(x, 2))
    assert (tap.n_layers, tap.width, tap.embed_dim, tap.has_cls, tap.n_tokens) == (4, 64, 32, True, 17)


def test_forward_to_equals_full_forward_and_stops_early(tap):
    x = _images(2)
    outputs, calls = {}, []
    blocks = tap.visual.transformer.resblocks
    hooks = [
        b.register_forward_hook(lambda m, i, o, idx=idx: outputs.__setitem__(idx, o.detach().clone()))
        for idx, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            tap.visual(x)  # the full forward of open_clip records every block's output
        for layer in range(tap.n_layers):
            torch.testing.assert_close(tap.forward_to(x, layer), outputs[layer], rtol=0, atol=0)
        counter = [b.register_forward_hook(lambda m, i, o, idx=idx: calls.append(idx)) for idx, b in enumerate(blocks)]
        tap.forward_to(x, 1)
        for h in counter:
            h.remove()
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]  # blocks 2 and 3 never ran
    torch.testing.assert_close(tap.forward_to(x, -1), outputs[3], rtol=0, atol=0)


# Test-only (it proves the index fact below), so it lives here, not in vlmsae.
def open_clip_visual_to_hf(visual: Any, projection_dim: int | None = None):
    """Copy an open_clip (native ViT) vision tower into a transformers ``CLIPVisionModelWithProjection``.

    Layout map: conv1 -> patch_embedding, class/positional embeddings, ln_pre -> pre_layrnorm [sic],
    each block's packed ``in_proj`` qkv -> q/k/v_proj, out_proj, ln_1/ln_2 -> layer_norm1/2,
    mlp.c_fc/c_proj -> fc1/fc2, ln_post -> post_layernorm, proj ([width, E], applied as x @ proj)
    -> visual_projection ([E, width]). The activation (quick_gelu for OpenAI weights) is read from
    the blocks. Used to prove the two backends tap the same residual stream (METHOD §1 index fact).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    patch = visual.conv1.kernel_size[0]
    heads = blocks[0].attn.num_heads
    mlp_width = blocks[0].mlp.c_fc.out_features
    act = blocks[0].mlp.gelu
    act_name = "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu"
    proj = visual.proj
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mlp_width,
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        image_size=visual.image_size[0],
        patch_size=patch,
        projection_dim=projection_dim or proj.shape[1],
        hidden_act=act_name,
        layer_norm_eps=visual.ln_pre.eps,
    )
    hf = CLIPVisionModelWithProjection(config).eval()
    vm = hf.vision_model
    with torch.no_grad():
        vm.embeddings.patch_embedding.weight.copy_(visual.conv1.weight)
        vm.embeddings.class_embedding.copy_(visual.class_embedding)
        vm.embeddings.position_embedding.weight.copy_(visual.positional_embedding)
        vm.pre_layrnorm.load_state_dict(visual.ln_pre.state_dict())
        for blk, layer in zip(blocks, vm.encoder.layers):
            q_w, k_w, v_w = blk.attn.in_proj_weight.chunk(3, dim=0)
            q_b, k_b, v_b = blk.attn.in_proj_bias.chunk(3, dim=0)
            for lin, w, b in (
                (layer.self_attn.q_proj, q_w, q_b),
                (layer.self_attn.k_proj, k_w, k_b),
                (layer.self_attn.v_proj, v_w, v_b),
            ):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            layer.self_attn.out_proj.load_state_dict(blk.attn.out_proj.state_dict())
            layer.layer_norm1.load_state_dict(blk.ln_1.state_dict())
            layer.layer_norm2.load_state_dict(blk.ln_2.state_dict())
            layer.mlp.fc1.load_state_dict(blk.mlp.c_fc.state_dict())
            layer.mlp.fc2.load_state_dict(blk.mlp.c_proj.state_dict())
        vm.post_layernorm.load_state_dict(visual.ln_post.state_dict())
        hf.visual_projection.weight.copy_(proj.T)
    return hf


def test_open_clip_and_transformers_tap_the_same_stream(tap):
    """SPEC 1 index fact: HF hidden_states[L+1] == open_clip resblocks[L] output; both backends agree."""
    from vlmsae.models.hf_backend import HFVisionTap

    hf = open_clip_visual_to_hf(tap.visual)
    assert hf.config.hidden_act == "quick_gelu"
    x = _images(2)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
    hf_tap = HFVisionTap(get_model_spec("tiny_hf"), hf, hf.vision_model.encoder.layers, None, hf.visual_projection)
    for layer in range(tap.n_layers):
        ref = tap.forward_to(x, layer)
        torch.testing.assert_close(out.hidden_states[layer + 1], ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hf_tap.forward_to(x, layer), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.image_embeds, tap.forward_to(x, "last"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hf_tap.forward_to(x, "last"), tap.forward_to(x, "last"), rtol=1e-4, atol=1e-5)


def test_tiny_hf_clip_round_trip_and_hidden_states(tiny_dpath):
    from transformers import CLIPVisionModelWithProjection

    hf_tap = load_tap(_tiny_spec(tiny_dpath, "tiny_hf"))
    folder = tiny_dpath / "tiny_hf"
    assert (folder / "config.json").exists() and (folder / "preprocessor_config.json").exists()
    ref = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    x = _images(2)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
    for layer in range(hf_tap.n_layers):
        torch.testing.assert_close(hf_tap.forward_to(x, layer), out.hidden_states[layer + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hf_tap.forward_to(x, "last"), out.image_embeds, rtol=1e-5, atol=1e-6)


def test_preprocess_makes_model_sized_tensors(tap):
    from PIL import Image

    image = Image.new("RGB", (50, 40), (10, 200, 30))
    assert tap.preprocess(image).shape == (3, 32, 32)
    assert tap.preprocess(image.convert("L")).shape == (3, 32, 32)  # grayscale is converted


def test_select_tokens_variants():
    acts = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    rows, tok, img = select_tokens(acts, "cls")
    assert torch.equal(rows, acts[:, 0]) and tok.tolist() == [0, 0] and img.tolist() == [0, 1]
    rows, tok, img = select_tokens(acts, "patches")
    assert rows.shape == (8, 3) and tok.tolist() == [1, 2, 3, 4] * 2 and img.tolist() == [0] * 4 + [1] * 4
    assert torch.equal(rows[5], acts[1, 2])
    rows, tok, img = select_tokens(acts, "all")
    assert rows.shape == (10, 3) and tok.tolist() == list(range(5)) * 2
    rows, tok, img = select_tokens(acts, "mean")
    torch.testing.assert_close(rows, acts[:, 1:].mean(1))
    assert tok.tolist() == [-1, -1]
    rows, tok, img = select_tokens(acts, "mean", has_cls=False)
    torch.testing.assert_close(rows, acts.mean(1))
    rows, tok, img = select_tokens(acts, "patches", has_cls=False)
    assert tok.tolist() == list(range(5)) * 2
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    rows, tok, img = select_tokens(acts, "random_k", k=2, generator=g1)
    _rows2, tok2, _ = select_tokens(acts, "random_k", k=2, generator=g2)
    assert torch.equal(tok, tok2) and img.tolist() == [0, 0, 1, 1]
    assert len(set(tok[:2].tolist())) == 2  # distinct tokens per image
    for i in range(4):
        assert torch.equal(rows[i], acts[img[i], tok[i]])
    emb = torch.randn(3, 4)
    rows, tok, img = select_tokens(emb, "cls")
    assert torch.equal(rows, emb) and tok.tolist() == [-1] * 3


def test_select_tokens_errors():
    acts = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="no CLS token.*tokens=mean"):
        select_tokens(acts, "cls", has_cls=False)
    with pytest.raises(ValueError, match="k must be in 1..4"):
        select_tokens(acts, "random_k", k=5)
    with pytest.raises(ValueError, match="Unknown token selection 'foo'.*random_k"):
        select_tokens(acts, "foo")


def test_layer_resolution_and_errors(tap):
    assert resolve_layer(-2, 24) == 22 and resolve_layer("last", 24) == "last" and resolve_layer("11", 24) == 11
    with pytest.raises(ValueError, match=r"out of range.*4 blocks.*0\.\.3"):
        tap.forward_to(_images(1), 4)
    with pytest.raises(ValueError, match="Unknown layer 'penultimate'.*'last'"):
        tap.forward_to(_images(1), "penultimate")


def test_unknown_model_and_arch_errors(tiny_dpath):
    with pytest.raises(ValueError, match=r"Unknown model 'clip_l15'.*valid choices.*clip_l14"):
        get_model_spec("clip_l15")
    assert {"tiny", "tiny_hf", "tiny_llava", "clip_l14_336", "siglip_so400m"} <= set(list_models())
    with pytest.raises(ValueError, match=r"Unknown open_clip architecture 'ViT-L-15'.*ViT-L-14"):
        load_tap(ModelSpec(name="x", backend="open_clip", arch="ViT-L-15", pretrained="openai"))
    with pytest.raises(ValueError, match=r"Unknown pretrained tag 'nope'.*openai"):
        load_tap(ModelSpec(name="x", backend="open_clip", arch="ViT-B-32", pretrained="nope"))
    with pytest.raises(ValueError, match="Unknown model backend 'jax'"):
        ModelSpec(name="x", backend="jax", arch="a")
    with pytest.raises(ValueError, match=r"Unknown model field\(s\) \['widht'\]"):
        to_typed({"name": "x", "backend": "open_clip", "arch": "a", "widht": 3}, ModelSpec)
    with pytest.raises(FileNotFoundError, match="model.local_path=.*does not exist"):
        load_tap(ModelSpec(name="x", backend="open_clip", arch="ViT-B-32", local_path=str(tiny_dpath / "none.pt")))


def test_missing_weights_offline_names_model_and_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(RuntimeError, match=r"(?s)'clip_b32'.*ViT-B-32.*openai.*model.local_path="):
        load_tap(get_model_spec("clip_b32", cache_dir=str(tmp_path)))
    with pytest.raises(OSError, match=r"(?s)'clip_l14_336_hf'.*model.local_path="):
        load_tap(get_model_spec("clip_l14_336_hf", cache_dir=str(tmp_path)))


def test_local_checkpoint_file_loads_like_a_tag(tiny_dpath, tap):
    """``local_path`` = a bare open_clip checkpoint for a registered arch takes the `pretrained=<file>` path."""
    import json

    import open_clip

    folder = tiny_dpath / "tiny"
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    open_clip.add_model_config(_write_arch(tiny_dpath, cfg))
    spec = ModelSpec(
        name="tiny_file",
        backend="open_clip",
        arch="vlmsae-test-arch",
        image_size=32,
        n_layers=4,
        width=64,
        embed_dim=32,
        local_path=str(folder / "open_clip_model.safetensors"),
        quick_gelu=True,
    )
    file_tap = load_tap(spec)
    x = _images(2)
    torch.testing.assert_close(file_tap.forward_to(x, 1), tap.forward_to(x, 1), rtol=0, atol=0)


def _write_arch(dpath, cfg):
    import json

    fpath = dpath / "vlmsae-test-arch.json"
    fpath.write_text(json.dumps(cfg))
    return fpath


def test_timm_trunk_without_cls_siglip_style():
    """SigLIP in open_clip is a timm trunk with no CLS token: the tap runs its blocks and stops early."""
    import timm
    from torch import nn

    from vlmsae.models.open_clip_backend import OpenClipTap

    class Visual(nn.Module):  # the attributes of open_clip.timm_model.TimmModel the tap uses
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.trunk = timm.create_model(
                "vit_base_patch16_siglip_224",
                pretrained=False,
                depth=3,
                embed_dim=32,
                num_heads=2,
                img_size=32,
                num_classes=0,
                global_pool="map",
            )
            self.output_dim = 32

        def forward(self, x):
            return self.trunk(x)

    visual = Visual().eval()
    spec = ModelSpec(name="tiny_siglip", backend="open_clip", arch="x", n_layers=3, width=32, has_cls=False)
    siglip_tap = OpenClipTap(spec, visual, preprocess=None)
    assert (siglip_tap.has_cls, siglip_tap.n_layers, siglip_tap.width, siglip_tap.n_tokens) == (False, 3, 32, 4)
    x = _images(2)
    outputs = {}
    hooks = [
        b.register_forward_hook(lambda m, i, o, idx=idx: outputs.__setitem__(idx, o.detach().clone()))
        for idx, b in enumerate(visual.trunk.blocks)
    ]
    with torch.no_grad():
        emb = visual(x)
    for h in hooks:
        h.remove()
    for layer in range(3):
        torch.testing.assert_close(siglip_tap.forward_to(x, layer), outputs[layer], rtol=0, atol=0)
    torch.testing.assert_close(siglip_tap.forward_to(x, "last"), emb, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no CLS token"):
        select_tokens(siglip_tap.forward_to(x, 1), "cls", has_cls=siglip_tap.has_cls)


def test_registered_tiny_models_materialise_under_vlmsae_home(tmp_path, monkeypatch, tap):
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path))
    home_tap = load_tap("tiny")  # by name, as `model=tiny` composes it
    assert (tmp_path / "models" / "tiny" / "open_clip_model.safetensors").exists()
    x = _images(1)
    assert torch.equal(home_tap.forward_to(x, 0), tap.forward_to(x, 0))  # same seed, same model anywhere


@pytest.mark.parametrize("name", ["clip_b32", "clip_l14", "clip_l14_336"])
def test_registered_open_clip_configs_match_the_architectures(name):
    """The YAML's n_layers / width / embed_dim / image_size are what open_clip builds for that arch."""
    import open_clip

    spec = get_model_spec(name)
    cfg = open_clip.get_model_config(spec.arch)
    vision = cfg["vision_cfg"]
    assert (vision["layers"], vision["width"], cfg["embed_dim"], vision["image_size"]) == (
        spec.n_layers,
        spec.width,
        spec.embed_dim,
        spec.image_size,
    )
    assert spec.pretrained in open_clip.list_pretrained_tags_by_model(spec.arch)
