"""Weights loaded from a file keep their real preprocessing and activation (open_clip backend, embedders).

open_clip gives a checkpoint file its default preprocessing (CLIP mean/std, shortest-side resize + centre
crop) and plain GELU; the registered pretrained config of the weights' tag says otherwise (SigLIP: mean =
std = 0.5, squash resize; OpenAI: QuickGELU). These tests check that a file, a folder holding it, or
``pretrained=<file>`` + ``pretrained_tag`` resolve to exactly what the tag gives, without instantiating
the big models, and end to end on a tiny registered architecture.
"""

from __future__ import annotations

import pytest
import torch

from vlmsae.config import conf_dir, to_typed
from vlmsae.models import ModelSpec, get_model_spec, load_tap
from vlmsae.models.embedders import EmbedderSpec, load_embedder
from vlmsae.models.open_clip_backend import registered_preprocess, resolve_open_clip_weights

torch.set_num_threads(1)
CONF_MODEL_DPATH = conf_dir() / "model"
CONF_EMBEDDER_DPATH = conf_dir() / "embedder"


def _registered_confs() -> list[tuple[str, dict]]:
    """``(group/name, conf)`` for every conf/model and conf/embedder entry that loads an open_clip tag."""
    from omegaconf import OmegaConf

    out = []
    for dpath in (CONF_MODEL_DPATH, CONF_EMBEDDER_DPATH):
        for fpath in sorted(dpath.glob("*.yaml")):
            raw = OmegaConf.to_container(OmegaConf.load(fpath), resolve=True)
            if raw.get("backend") == "open_clip" and not raw.get("tiny"):
                out.append((f"{dpath.name}/{fpath.stem}", raw))
    return out


CONFS = _registered_confs()


def test_the_registered_confs_are_all_covered():
    names = {name for name, _ in CONFS}
    assert {
        "model/clip_b32",
        "model/clip_l14",
        "model/clip_l14_336",
        "model/siglip_so400m",
        "embedder/clip_b32",
    } <= names


def _expected(arch: str, tag: str) -> tuple[bool, dict]:
    """What open_clip's own registry says for (arch, tag): the oracle, read without vlmsae's code."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg

    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    assert tag_cfg, f"{arch}/{tag} is not registered"
    defaults = asdict(PreprocessCfg())
    pre = {key: tag_cfg.get(key, defaults[key]) for key in ("mean", "std", "interpolation", "resize_mode")}
    pre = {key: tuple(v) if isinstance(v, (list, tuple)) else v for key, v in pre.items()}
    return bool(tag_cfg.get("quick_gelu", False)), pre


def _transform(arch: str, preprocess: dict):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    return image_transform_v2(PreprocessCfg(size=size, **preprocess), is_train=False)


def _wide_image(seed: int = 0, size=(96, 40)):
    """A non-square image, so a centre crop and a squash give different tensors."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("name,conf", CONFS, ids=[name for name, _ in CONFS])
def test_file_weights_resolve_like_their_tag(name, conf, tmp_path):
    """Every way of loading a conf's weights from disk gets the tag's activation and preprocessing."""
    group, arch, tag = name.split("/")[0], conf["arch"], conf["pretrained"]
    expected_gelu, expected_pre = _expected(arch, tag)
    fpath = tmp_path / "weights.safetensors"
    fpath.write_bytes(b"")  # never read: resolving loads nothing
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "open_clip_model.safetensors").write_bytes(b"")

    def resolve(**kw):
        fields = {"pretrained": tag, **kw}
        return resolve_open_clip_weights(
            conf["name"],
            arch,
            fields["pretrained"],
            fields.get("local_path"),
            fields.get("pretrained_tag"),
            where=group,
        )

    by_tag = resolve()
    assert (by_tag.pretrained, by_tag.tag) == (tag, tag)
    sources = {
        "local_path=file": resolve(local_path=str(fpath)),
        "local_path=folder": resolve(local_path=str(tmp_path / "folder")),
        "pretrained=file+pretrained_tag": resolve(pretrained=str(fpath), pretrained_tag=tag),
    }
    for how, src in sources.items():
        assert src.model_name == arch and src.pretrained.endswith(
            "open_clip_model.safetensors" if "folder" in how else "weights.safetensors"
        ), how
        assert src.tag == tag, how
        assert src.quick_gelu == by_tag.quick_gelu == expected_gelu, how
        assert src.preprocess == by_tag.preprocess == expected_pre, how
        kwargs, tag_kwargs = src.create_kwargs(), by_tag.create_kwargs()
        assert kwargs.pop("pretrained") != tag_kwargs.pop("pretrained")
        assert kwargs == tag_kwargs, how  # what reaches open_clip differs only in where the weights are
    # The transforms built from both apply identically, and like the one open_clip builds for the tag.
    image = _wide_image()
    ref = _transform(arch, expected_pre)(image)
    for src in (by_tag, *sources.values()):
        assert torch.equal(_transform(arch, src.preprocess)(image), ref)
    assert ref.shape[-1] == conf.get("image_size", ref.shape[-1])
    # The facts the bug broke, spelled out so a degenerate registry cannot make the test vacuous.
    if tag == "openai":
        assert expected_gelu is True
    if "SigLIP" in arch:
        assert expected_pre["mean"] == expected_pre["std"] == (0.5, 0.5, 0.5)
        assert expected_pre["resize_mode"] == "squash" and expected_gelu is False
        defaults = _transform(arch, registered_preprocess(arch, None)[1])  # what a file got before
        assert not torch.allclose(defaults(image), ref)


def test_file_without_a_tag_is_an_error_listing_the_tags(tmp_path):
    fpath = tmp_path / "w.safetensors"
    fpath.write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)'clip_b32'.*no.*model\.pretrained_tag=<tag>.*'openai'.*local_path"):
        resolve_open_clip_weights("clip_b32", "ViT-B-32", pretrained=str(fpath))
    with pytest.raises(ValueError, match=r"(?s)embedder\.pretrained_tag=<tag>.*'openai'"):
        resolve_open_clip_weights("e", "ViT-B-32", pretrained=None, local_path=str(fpath), where="embedder")
    with pytest.raises(ValueError, match=r"Unknown pretrained tag 'nope' \(model.pretrained_tag\).*valid tags.*openai"):
        resolve_open_clip_weights("m", "ViT-B-32", pretrained=str(fpath), pretrained_tag="nope")
    with pytest.raises(ValueError, match=r"Unknown pretrained tag 'nope' \(model.pretrained\).*openai"):
        resolve_open_clip_weights("m", "ViT-B-32", pretrained="nope", local_path=str(fpath))
    with pytest.raises(ValueError, match=r"pretrained='openai' and model.pretrained_tag='laion2b_s34b_b79k'.*drop one"):
        resolve_open_clip_weights("m", "ViT-B-32", pretrained="openai", pretrained_tag="laion2b_s34b_b79k")
    # With local_path, pretrained_tag names the file's config over the conf's pretrained tag.
    src = resolve_open_clip_weights(
        "m", "ViT-B-32", pretrained="openai", local_path=str(fpath), pretrained_tag="laion2b_s34b_b79k"
    )
    assert (src.tag, src.quick_gelu) == ("laion2b_s34b_b79k", False)


def test_overrides_are_validated_and_win(tmp_path):
    fpath = tmp_path / "w.safetensors"
    fpath.write_bytes(b"")
    custom = {
        "quick_gelu": False,
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [1, 1, 1],
        "image_interpolation": "bilinear",
        "image_resize_mode": "longest",
    }
    src = resolve_open_clip_weights("m", "ViT-B-32", pretrained=str(fpath), overrides=custom)  # no tag needed
    assert src.quick_gelu is False and src.tag is None
    assert src.preprocess == {
        "mean": (0.1, 0.2, 0.3),
        "std": (1.0, 1.0, 1.0),
        "interpolation": "bilinear",
        "resize_mode": "longest",
    }
    assert src.create_kwargs()["quick_gelu"] is False  # turns QuickGELU off even for a -quickgelu arch
    src = resolve_open_clip_weights("m", "ViT-B-32", pretrained="openai", overrides={"quick_gelu": False})
    assert src.quick_gelu is False and src.preprocess == _expected("ViT-B-32", "openai")[1]
    with pytest.raises(ValueError, match=r"model.image_resize_mode='crop'.*'squash'"):
        resolve_open_clip_weights("m", "ViT-B-32", pretrained="openai", overrides={"image_resize_mode": "crop"})
    with pytest.raises(ValueError, match=r"model.image_std=\[0.5\] must be three"):
        resolve_open_clip_weights("m", "ViT-B-32", pretrained="openai", overrides={"image_std": [0.5]})
    with pytest.raises(ValueError, match=r"model.quick_gelu='yes' must be true or false"):
        resolve_open_clip_weights("m", "ViT-B-32", pretrained="openai", overrides={"quick_gelu": "yes"})


def test_folder_config_decides_for_open_clip_folders(tmp_path):
    """A folder with open_clip_config.json (the tiny model, a hub download) is described by that file."""
    import json

    from vlmsae.models.tiny import build_tiny_open_clip

    dpath = build_tiny_open_clip(tmp_path / "tiny")
    config = json.loads((dpath / "open_clip_config.json").read_text())
    config["preprocess_cfg"].update(resize_mode="squash", mean=[0.5, 0.5, 0.5])
    (dpath / "open_clip_config.json").write_text(json.dumps(config))
    src = resolve_open_clip_weights("t", "vlmsae-tiny-vit", local_path=str(dpath))
    assert src.model_name == f"local-dir:{dpath}" and src.pretrained is None
    assert src.quick_gelu is True and src.preprocess["resize_mode"] == "squash"
    assert src.preprocess["mean"] == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- end to end on a tiny registered arch

ARCH, TAG = "vlmsae-test-registered", "squashed"


@pytest.fixture(scope="module")
def registered_tiny(tmp_path_factory):
    """A tiny arch registered in open_clip with a tag whose config is unlike the defaults in every way.

    The tag's ``file`` entry is open_clip's own way to point a tag at weights on disk, so the tag path
    runs exactly as it would after a download.
    """
    import open_clip
    import open_clip.factory
    import open_clip.pretrained
    from safetensors.torch import save_file

    from vlmsae.models.tiny import tiny_open_clip_cfg

    model_cfg = tiny_open_clip_cfg()
    model_cfg.pop("quick_gelu")  # the architecture alone says GELU; only the tag says QuickGELU
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg, quick_gelu=True).eval()
    fpath = tmp_path_factory.mktemp("registered") / "weights.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(fpath))
    tag_cfg = {
        "file": str(fpath),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear",
        "resize_mode": "squash",
        "quick_gelu": True,
    }
    mp = pytest.MonkeyPatch()
    mp.setitem(open_clip.factory._MODEL_CONFIGS, ARCH, model_cfg)
    mp.setitem(open_clip.pretrained._PRETRAINED, ARCH, {TAG: tag_cfg})
    yield fpath
    mp.undo()


def _spec(**kw) -> ModelSpec:
    return ModelSpec(
        name="reg", backend="open_clip", arch=ARCH, image_size=32, n_layers=4, width=64, embed_dim=32, **kw
    )


def test_file_weights_end_to_end_equal_the_tag_path(registered_tiny):
    import open_clip

    fpath = registered_tiny
    taps = {
        "tag": load_tap(_spec(pretrained=TAG)),
        "local_path": load_tap(_spec(pretrained=TAG, local_path=str(fpath))),
        "pretrained=file": load_tap(_spec(pretrained=str(fpath), pretrained_tag=TAG)),
    }
    # open_clip's own tag path, told to use the activation the tag was trained with.
    ref, _, ref_preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=TAG, force_quick_gelu=True)
    ref = ref.eval()
    image = _wide_image(1)
    ref_x = ref_preprocess(image).unsqueeze(0)
    default_x = open_clip.image_transform(32, is_train=False)(image).unsqueeze(0)
    assert not torch.allclose(ref_x, default_x)  # the tag's preprocessing is not open_clip's default
    with torch.no_grad():
        ref_emb = ref.encode_image(ref_x)
    for how, tap in taps.items():
        x = tap.preprocess(image).unsqueeze(0)
        assert torch.equal(x, ref_x), how
        assert type(tap.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU", how
        torch.testing.assert_close(tap.forward_to(x, "last"), ref_emb, rtol=0, atol=1e-6, msg=how)
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):  # GELU: what a file got before
        gelu, _, _ = open_clip.create_model_and_transforms(ARCH, pretrained=TAG)
    with torch.no_grad():
        assert not torch.allclose(gelu.eval().encode_image(ref_x), ref_emb, atol=1e-4)


def test_embedder_file_weights_equal_the_tag_path(registered_tiny):
    fpath = registered_tiny
    images = [_wide_image(2), _wide_image(3, size=(30, 70))]
    by_tag = load_embedder(EmbedderSpec(name="reg", arch=ARCH, pretrained=TAG, device="cpu")).embed(images)
    by_file = load_embedder(
        EmbedderSpec(name="reg", arch=ARCH, pretrained=str(fpath), pretrained_tag=TAG, device="cpu")
    ).embed(images)
    by_local = load_embedder(
        EmbedderSpec(name="reg", arch=ARCH, pretrained=TAG, local_path=str(fpath), device="cpu")
    ).embed(images)
    torch.testing.assert_close(by_file, by_tag, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_local, by_tag, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"embedder\.pretrained_tag=<tag>.*'squashed'"):
        load_embedder(EmbedderSpec(name="reg", arch=ARCH, pretrained=str(fpath), device="cpu"))


def test_embedder_cache_id_separates_file_weights_by_tag(tmp_path):
    base = dict(name="clip_b32", arch="ViT-B-32", pretrained="openai")
    assert EmbedderSpec(**base).cache_id() == "clip_b32|open_clip|ViT-B-32|openai|"  # tag-loaded caches stay valid
    local = EmbedderSpec(**base, local_path="/w/clip.pt").cache_id()
    assert local != EmbedderSpec(name="clip_b32", arch="ViT-B-32", local_path="/w/clip.pt").cache_id()
    assert "tag=openai" in local  # embeddings cached before file weights got the tag's preprocessing are not reused


def test_model_pretrained_tag_composes_through_hydra(compose_cfg, tmp_path):
    fpath = tmp_path / "w.safetensors"
    fpath.write_bytes(b"")
    cfg = compose_cfg("extract", ["model=siglip_so400m", f"model.pretrained={fpath}", "model.pretrained_tag=webli"])
    spec = to_typed(cfg.model, ModelSpec)
    assert spec.pretrained_tag == "webli"
    src = resolve_open_clip_weights(spec.name, spec.arch, spec.pretrained, spec.local_path, spec.pretrained_tag)
    assert src.preprocess["resize_mode"] == "squash" and src.pretrained == str(fpath)
    assert get_model_spec("clip_l14", local_path=str(fpath)).pretrained == "openai"  # the conf names the tag
