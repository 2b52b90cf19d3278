"""The config nodes (vlmsae.config.nodes): a bad SAEConfig is refused naming the value and what is expected; the
model and embedder nodes refuse unknown and missing fields, naming them."""

from __future__ import annotations

import pytest

from vlmsae.config import to_typed
from vlmsae.sae import SAEConfig, build_sae


def _cfg(**kw) -> SAEConfig:
    base = dict(arch="batchtopk", d_in=8, n_latents=32, k=4)
    return SAEConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(arch="topkk"), r"arch must be one of relu, topk, batchtopk, matryoshka, jumprelu; got 'topkk'"),
        (dict(k=33), r"k=33 is larger than n_latents=32"),
        (dict(arch="topk", k=0), r"k must be a positive integer; got 0"),
        (dict(d_in=0), r"d_in must be a positive integer; got 0"),
        (dict(n_latents=2.5), r"n_latents must be a positive integer; got 2.5"),
        (dict(arch="matryoshka", group_fractions=[0.5, 0.4]), r"must sum to 1 .* sums to 0.9"),
        (dict(arch="matryoshka", group_fractions=[0.5, -0.5, 1.0]), r"fractions > 0; got \[0.5, -0.5, 1.0\]"),
        (dict(arch="matryoshka", group_fractions=[0.01, 0.99]), r"empty group with n_latents=32"),
        (dict(group_fractions=[0.5, 0.5]), r"only used by arch=matryoshka"),
        (dict(threshold_beta=1.0), r"threshold_beta must be in \[0, 1\)"),
        (dict(sparse_kernel="fast"), r"sparse_kernel must be one of auto, sparse, dense; got 'fast'"),
        (dict(aux_k=0), r"aux_k must be a positive integer or None"),
        (dict(l1_coeff=-1.0), r"l1_coeff must be a finite number >= 0; got -1.0"),
    ],
)
def test_bad_config_is_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _cfg(**kwargs)


def test_config_is_frozen_and_relu_ignores_k():
    cfg = _cfg()
    with pytest.raises(AttributeError):
        cfg.k = 3  # type: ignore[misc]
    assert SAEConfig(arch="relu", d_in=8, n_latents=4, k=20).k == 20  # k unused by ReLU-L1: no error


def test_to_typed_uses_expansion_and_rejects_unknown_keys():
    node = {"arch": "matryoshka", "expansion": 4, "n_latents": None, "k": 3, "group_fractions": [0.25, 0.75]}
    cfg = to_typed(node, SAEConfig).resolved(16)
    assert (cfg.n_latents, cfg.group_sizes) == (64, [16, 48])
    with pytest.raises(ValueError, match=r"Unknown sae field\(s\) \['kk'\]"):
        to_typed({"arch": "topk", "expansion": 2, "kk": 3}, SAEConfig)


def test_group_sizes_follow_the_paper():
    fractions = [0.002, 0.009, 0.035, 0.189, 0.765]  # METHOD §4: iNat ranks, 1536 latents
    cfg = SAEConfig(arch="matryoshka", d_in=768, n_latents=1536, k=20, group_fractions=fractions)
    assert cfg.group_sizes == [3, 13, 53, 290, 1177]
    default = SAEConfig(arch="matryoshka", d_in=1024, n_latents=65536, k=20)
    assert default.group_sizes == [4096, 8192, 16384, 36864]
    sae = build_sae(SAEConfig(arch="matryoshka", d_in=4, n_latents=16, k=2, group_fractions=[0.25, 0.25, 0.5]))
    assert sae.group_sizes == [4, 4, 8]
    assert sae.group_of_latent.tolist() == [0] * 4 + [1] * 4 + [2] * 8


# ------------------------------------------------------------------------------ model and embedder nodes
def test_library_nodes_refuse_unknown_and_missing_fields_naming_them():
    from vlmsae.models import ModelSpec
    from vlmsae.models.embedders import EmbedderSpec
    from vlmsae.sae import SAEConfig, build_sae

    with pytest.raises(ValueError, match=r"Unknown model field\(s\) \['extra'\].*model.seed=1, not model.extra.seed"):
        to_typed({"name": "x", "backend": "open_clip", "arch": "a", "extra": {"seed": 1}}, ModelSpec)
    with pytest.raises(ValueError, match=r"Unknown embedder field\(s\) \['extra'\]"):
        to_typed({"name": "x", "extra": {}}, EmbedderSpec)
    with pytest.raises(ValueError, match=r"model needs \['arch'\].*model.arch"):
        ModelSpec(name="x", backend="open_clip")
    with pytest.raises(ValueError, match=r"SAE needs d_in and n_latents.*resolved\(d_in\)"):
        build_sae(SAEConfig(arch="topk"))
    with pytest.raises(ValueError, match=r"sae.d_in=8 but the activations are 16 wide"):
        SAEConfig(arch="topk", d_in=8).resolved(16)
    with pytest.raises(ValueError, match=r"sae.expansion must be a positive integer when sae.n_latents is unset"):
        SAEConfig(arch="topk", expansion=None).resolved(16)
    with pytest.raises(ValueError, match=r"expansion must be a positive integer; got 0"):
        SAEConfig(arch="topk", expansion=0)
    # An explicit n_latents decides the size; expansion then records the ratio (None when not whole).
    assert SAEConfig(arch="topk", n_latents=40, expansion=16).resolved(8).expansion == 5
    assert SAEConfig(arch="topk", d_in=8, n_latents=44).expansion is None


def test_embedder_cache_id_changes_with_preprocessing_overrides():
    from vlmsae.models.embedders import EmbedderSpec

    base = EmbedderSpec(pretrained="openai")
    assert base.cache_id() == "clip_b32|open_clip|ViT-B-32|openai|"  # unchanged for every existing cache
    assert EmbedderSpec(pretrained="openai", quick_gelu=False).cache_id() != base.cache_id()


def test_data_keys_have_one_meaning_and_the_split_seed_is_refused_naming_the_new_keys():
    from vlmsae.config.nodes import DataSchema
    from vlmsae.data.images import synthetic_options_of

    data = to_typed({"source": "synthetic", "synthetic_seed": 3, "shuffle_seed": 5}, DataSchema)
    assert (data.synthetic_seed, data.shuffle_seed, data.images_per_forward) == (3, 5, 64)
    with pytest.raises(ValueError, match=r"data.seed=1 .*data.shuffle_seed.*data.synthetic_seed"):
        to_typed({"source": "synthetic", "seed": 1}, DataSchema)
    # a data node recorded in an older run_info.json still names the same generated images
    assert synthetic_options_of({"source": "synthetic", "seed": 3})["seed"] == 3
    assert synthetic_options_of({"source": "synthetic", "synthetic_seed": 3, "seed": None})["seed"] == 3
